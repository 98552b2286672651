//! Which rows an operation acts on: ids, exchange, routing key, ordering
//! key, error text and a time range, all optional, all ANDed. The same
//! filter comes from a command line, a query string or a JSON body, and
//! becomes one parameterised SQL condition (no value is ever spliced into
//! SQL text).

use std::str::FromStr;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

use crate::Error;

/// A message named by its `message_id` (UUID) or its row `id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageRef {
    Id(i64),
    MessageId(Uuid),
}

impl FromStr for MessageRef {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if let Ok(id) = text.parse::<i64>() {
            return Ok(MessageRef::Id(id));
        }
        text.parse::<Uuid>()
            .map(MessageRef::MessageId)
            .map_err(|_| format!("`{text}` is neither a message_id (UUID) nor a row id"))
    }
}

impl std::fmt::Display for MessageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MessageRef::Id(id) => write!(f, "{id}"),
            MessageRef::MessageId(uuid) => write!(f, "{uuid}"),
        }
    }
}

/// JSON: a number (row id) or a string (row id or UUID).
impl<'de> Deserialize<'de> for MessageRef {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(i64),
            Text(String),
        }
        match Raw::deserialize(de)? {
            Raw::Number(id) => Ok(MessageRef::Id(id)),
            Raw::Text(text) => text.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A row id as a number, a message_id as a string: as a caller sends them.
impl Serialize for MessageRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            MessageRef::Id(id) => s.serialize_i64(*id),
            MessageRef::MessageId(uuid) => s.collect_str(uuid),
        }
    }
}

/// A field given as `null` is refused, not read as "any": a caller that
/// meant a value must not widen a change to every row. Absent is "any".
fn not_null<'de, D, T>(de: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(de).map(Some)
}

/// `ids: []` would otherwise mean "no id filter", every row: a list
/// emptied by mistake must not widen a change to the whole table.
fn some_ids<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Vec<MessageRef>, D::Error> {
    let ids = Vec::<MessageRef>::deserialize(de)?;
    if ids.is_empty() {
        return Err(serde::de::Error::custom(
            "ids is empty: name at least one message, or leave ids out to match every row",
        ));
    }
    Ok(ids)
}

/// A point in time: a duration ago (`90s`, `2h`, `7d`) or a timestamp the
/// server understands (`2026-11-27 03:00+00`).
#[derive(Debug, Clone, PartialEq)]
pub enum TimeArg {
    Ago(Duration),
    At(String),
}

impl FromStr for TimeArg {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if text.is_empty() {
            return Err("a time is required, e.g. `2h` or `2026-11-27T03:00:00Z`".into());
        }
        if text == "0" {
            return Ok(TimeArg::Ago(Duration::ZERO));
        }
        Ok(match humantime::parse_duration(text) {
            Ok(ago) => TimeArg::Ago(ago),
            // Left to PostgreSQL, which knows more formats (and time zones).
            Err(_) => TimeArg::At(text.to_string()),
        })
    }
}

impl std::fmt::Display for TimeArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TimeArg::Ago(ago) => write!(f, "{}", humantime::format_duration(*ago)),
            TimeArg::At(text) => f.write_str(text),
        }
    }
}

impl<'de> Deserialize<'de> for TimeArg {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        String::deserialize(de)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for TimeArg {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Times a filter may name: `infinity`, or a year before 1970, would not
/// convert to a `SystemTime` or print.
const IN_RANGE: &str = "WHERE t >= '1970-01-01 00:00:00+00' AND t < '10000-01-01 00:00:00+00'";

impl TimeArg {
    /// The instant, computed by the server so that "2h ago" and the rows'
    /// timestamps come from the same clock.
    pub async fn resolve(&self, client: &Client) -> Result<SystemTime, Error> {
        let row = match self {
            TimeArg::Ago(ago) => {
                let ms = ago.as_millis() as f64;
                client
                    .query_typed(
                        &format!("SELECT t FROM (SELECT now() - $1 * interval '1 millisecond' AS t) x {IN_RANGE}"),
                        &[(&ms, Type::FLOAT8)],
                    )
                    .await
            }
            TimeArg::At(text) => {
                client
                    .query_typed(
                        &format!("SELECT t FROM (SELECT $1::text::timestamptz AS t) x {IN_RANGE}"),
                        &[(text, Type::TEXT)],
                    )
                    .await
            }
        }
        .map_err(|e| {
            // Class 22 (data exception): the text is no timestamp.
            if e.code().is_some_and(|code| code.code().starts_with("22")) {
                self.not_a_time()
            } else {
                crate::db("read the time")(e)
            }
        })?;
        row.first()
            .map(|r| r.get(0))
            .ok_or_else(|| self.not_a_time())
    }

    fn not_a_time(&self) -> Error {
        Error::BadRequest(format!(
            "`{self}` is not a time (or not between 1970 and 9999): give a duration ago \
             (`30m`, `2h`, `7d`) or a timestamp (`2026-11-27T03:00:00Z`)"
        ))
    }
}

/// Every field optional; an empty filter matches every row in scope. Unknown
/// fields are refused: a misspelt field must not widen a bulk action to
/// every row.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// Row ids or message_ids; when present, at least one.
    #[serde(
        default,
        deserialize_with = "some_ids",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ids: Vec<MessageRef>,
    #[serde(
        default,
        deserialize_with = "not_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub exchange: Option<String>,
    #[serde(
        default,
        deserialize_with = "not_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub routing_key: Option<String>,
    #[serde(
        default,
        deserialize_with = "not_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub ordering_key: Option<String>,
    /// Part of the last error, any case.
    #[serde(
        default,
        deserialize_with = "not_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub error: Option<String>,
    /// From this time (dead letters: when they died; replay: when published).
    #[serde(
        default,
        deserialize_with = "not_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub since: Option<TimeArg>,
    /// Before this time.
    #[serde(
        default,
        deserialize_with = "not_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub until: Option<TimeArg>,
}

impl Filter {
    /// An empty error text means "any" (it is part of every text). An
    /// empty exchange or routing key is kept: it names the default one.
    pub fn normalized(mut self) -> Filter {
        if self.error.as_deref() == Some("") {
            self.error = None;
        }
        self
    }

    pub fn is_empty(&self) -> bool {
        *self == Filter::default()
    }

    /// The filter with its times resolved, ready to bind as `$1`–`$8` of
    /// [`Bound::condition`].
    pub async fn bind(&self, client: &Client) -> Result<Bound, Error> {
        let since = match &self.since {
            Some(time) => Some(time.resolve(client).await?),
            None => None,
        };
        let until = match &self.until {
            Some(time) => Some(time.resolve(client).await?),
            None => None,
        };
        if let (Some(since), Some(until)) = (since, until)
            && since >= until
        {
            return Err(Error::BadRequest(format!(
                "since ({}) must be before until ({}): the window is empty",
                crate::format_time(since),
                crate::format_time(until)
            )));
        }
        let mut ids = Vec::new();
        let mut message_ids = Vec::new();
        for r in &self.ids {
            match r {
                MessageRef::Id(id) => ids.push(*id),
                MessageRef::MessageId(uuid) => message_ids.push(*uuid),
            }
        }
        Ok(Bound {
            // NULL (not an empty array) means "no id filter".
            ids: (!self.ids.is_empty()).then_some(ids),
            message_ids,
            exchange: self.exchange.clone(),
            routing_key: self.routing_key.clone(),
            ordering_key: self.ordering_key.clone(),
            error: self.error.clone(),
            since,
            until,
        })
    }
}

/// A [`Filter`] as statement parameters.
#[derive(Debug)]
pub struct Bound {
    ids: Option<Vec<i64>>,
    message_ids: Vec<Uuid>,
    exchange: Option<String>,
    routing_key: Option<String>,
    ordering_key: Option<String>,
    error: Option<String>,
    since: Option<SystemTime>,
    until: Option<SystemTime>,
}

impl Bound {
    /// The condition on `outbox.messages` for parameters `$1`–`$8`, the
    /// time range on `time_column`.
    pub fn condition(time_column: &str) -> String {
        format!(
            "($1::bigint[] IS NULL OR id = ANY($1) OR message_id = ANY($2)) \
             AND ($3::text IS NULL OR exchange = $3) \
             AND ($4::text IS NULL OR routing_key = $4) \
             AND ($5::text IS NULL OR ordering_key = $5) \
             AND ($6::text IS NULL OR strpos(lower(coalesce(last_error, '')), lower($6)) > 0) \
             AND ($7::timestamptz IS NULL OR {time_column} >= $7) \
             AND ($8::timestamptz IS NULL OR {time_column} < $8)"
        )
    }

    /// `$1`–`$8`, typed, for `query_typed`.
    pub fn params(&self) -> [(&(dyn ToSql + Sync), Type); 8] {
        [
            (&self.ids, Type::INT8_ARRAY),
            (&self.message_ids, Type::UUID_ARRAY),
            (&self.exchange, Type::TEXT),
            (&self.routing_key, Type::TEXT),
            (&self.ordering_key, Type::TEXT),
            (&self.error, Type::TEXT),
            (&self.since, Type::TIMESTAMPTZ),
            (&self.until, Type::TIMESTAMPTZ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_refs_are_row_ids_or_uuids() {
        assert_eq!("42".parse::<MessageRef>(), Ok(MessageRef::Id(42)));
        let uuid = Uuid::new_v4();
        assert_eq!(
            uuid.to_string().parse::<MessageRef>(),
            Ok(MessageRef::MessageId(uuid))
        );
        assert!("abc".parse::<MessageRef>().is_err());
    }

    #[test]
    fn times_are_durations_ago_or_timestamps() {
        assert_eq!(
            "2h".parse::<TimeArg>(),
            Ok(TimeArg::Ago(Duration::from_secs(7200)))
        );
        assert_eq!("0".parse::<TimeArg>(), Ok(TimeArg::Ago(Duration::ZERO)));
        assert_eq!(
            "2026-11-27T03:00:00Z".parse::<TimeArg>(),
            Ok(TimeArg::At("2026-11-27T03:00:00Z".into()))
        );
        assert!("".parse::<TimeArg>().is_err());
    }

    #[test]
    fn filters_from_json_refuse_unknown_fields() {
        let filter: Filter =
            serde_json::from_str(r#"{"ids": [42, "43"], "exchange": "orders", "since": "2h"}"#)
                .expect("a filter");
        assert_eq!(filter.ids, [MessageRef::Id(42), MessageRef::Id(43)]);
        assert_eq!(filter.since, Some(TimeArg::Ago(Duration::from_secs(7200))));
        let typo = serde_json::from_str::<Filter>(r#"{"exchnage": "orders"}"#);
        assert!(typo.is_err_and(|e| e.to_string().contains("unknown field `exchnage`")));
        assert!(serde_json::from_str::<Filter>(r#"{"ids": ["x"]}"#).is_err());
        assert!(serde_json::from_str::<Filter>(r#"{"exchange": null}"#).is_err());
        let empty = serde_json::from_str::<Filter>(r#"{"ids": []}"#);
        assert!(empty.is_err_and(|e| e.to_string().contains("ids is empty")));
        assert_eq!(
            serde_json::to_value(&filter).ok(),
            Some(serde_json::json!({"ids": [42, 43], "exchange": "orders", "since": "2h"}))
        );
        let blank: Filter = serde_json::from_str(r#"{"error": ""}"#).expect("a filter");
        assert!(blank.normalized().is_empty());
        // The default exchange is a name, not "any".
        let default: Filter = serde_json::from_str(r#"{"exchange": ""}"#).expect("a filter");
        assert!(!default.normalized().is_empty());
    }
}
