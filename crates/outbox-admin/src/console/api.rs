//! The routes: the page's files at `/`, the JSON API under `/api/v1/`
//! (described by `/api/v1/openapi.json`). Errors are `{"error": "one line"}`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use deadpool_postgres::Object;
use futures::future::BoxFuture;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Console, assets, auth};
use crate::reconcile::Inbox;
use crate::{Error, Filter, MessageRef, Outcome, Session, TimeArg};
use outbox_service::db;
use tokio_util::sync::CancellationToken;

type Shared = State<Arc<Console>>;

/// An error as the API answers it.
struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let mut response = (self.0, Json(json!({ "error": self.1 }))).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

impl From<Error> for Failure {
    fn from(error: Error) -> Failure {
        let status = match &error {
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::NotAllowed(_) => StatusCode::FORBIDDEN,
            Error::Database { .. } | Error::Stopped(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::warn!(%error, "console request failed");
        }
        Failure(status, error.to_string())
    }
}

/// Query parameters by name.
type Params = BTreeMap<String, String>;

/// A query string that does not parse is a 400 in JSON like every error.
fn parameters<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, Failure> {
    query
        .map(|Query(query)| query)
        .map_err(|rejection| bad(rejection.body_text()))
}

fn bad(why: impl Into<String>) -> Failure {
    Failure(StatusCode::BAD_REQUEST, why.into())
}

type Answer = Result<Json<Value>, Failure>;

fn answer(value: impl serde::Serialize) -> Answer {
    serde_json::to_value(value)
        .map(Json)
        .map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

pub(super) fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/", get(assets::index))
        .route("/app.js", get(assets::script))
        .route("/style.css", get(assets::style))
        .route("/api/v1/openapi.json", get(assets::openapi))
        .route("/api/v1/overview", get(overview))
        .route("/api/v1/lag", get(lag))
        .route("/api/v1/dead-letters", get(dead_letters))
        .route("/api/v1/dead-letters/{id}", get(dead_letter))
        .route("/api/v1/dead-letters/requeue", post(requeue))
        .route("/api/v1/dead-letters/discard", post(discard))
        .route("/api/v1/blocked-keys", get(blocked_keys))
        .route("/api/v1/replay", post(replay))
        .route("/api/v1/scheduled", get(scheduled))
        .route("/api/v1/reconcile", get(reconcile))
        .route("/api/v1/captures", get(captures))
        .route("/api/v1/audit", get(audit))
        .fallback(|| async { Failure(StatusCode::NOT_FOUND, "no such page or endpoint".into()) })
        .method_not_allowed_fallback(|| async {
            Failure(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed here".into(),
            )
        })
        .layer(middleware::from_fn_with_state(
            console.clone(),
            this_machine,
        ))
        .with_state(console)
}

/// See [`auth::local_host`].
async fn this_machine(
    State(console): Shared,
    request: axum::extract::Request,
    next: middleware::Next,
) -> Response {
    if console.local_only && !auth::local_host(request.headers()) {
        return Failure(
            StatusCode::MISDIRECTED_REQUEST,
            "this console answers requests for 127.0.0.1 or localhost only".into(),
        )
        .into_response();
    }
    next.run(request).await
}

async fn client(console: &Console) -> Result<Object, Failure> {
    console.pool.get().await.map_err(|e| {
        Failure(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot reach PostgreSQL: {}", db::pool_error(&e)),
        )
    })
}

/// `limit` from a query, 1 to 10,000, 100 when absent.
fn limit(query: &mut Params) -> Result<i64, Failure> {
    match query.remove("limit") {
        None => Ok(100),
        Some(text) => text
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=10_000).contains(n))
            .ok_or_else(|| bad(format!("limit `{text}` must be a number from 1 to 10000"))),
    }
}

const FILTER_FIELDS: [&str; 7] = [
    "ids",
    "exchange",
    "routing_key",
    "ordering_key",
    "error",
    "since",
    "until",
];

/// A filter from query parameters (`ids` comma-separated); an unknown
/// parameter is an error, not ignored.
fn query_filter(query: Params) -> Result<Filter, Failure> {
    let mut fields = serde_json::Map::new();
    for (name, value) in query {
        // A blank form field means "any"; an unknown name is refused even blank.
        if value.is_empty() && FILTER_FIELDS.contains(&name.as_str()) {
            continue;
        }
        let value = if name == "ids" {
            Value::Array(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|id| !id.is_empty())
                    .map(|id| Value::String(id.to_string()))
                    .collect(),
            )
        } else {
            Value::String(value)
        };
        fields.insert(name, value);
    }
    serde_json::from_value::<Filter>(Value::Object(fields))
        .map(Filter::normalized)
        .map_err(|e| bad(format!("bad filter: {e}")))
}

async fn overview(State(console): Shared) -> Answer {
    let client = client(&console).await?;
    let status = crate::status::read(&client, console.database.clone()).await?;
    let mut value = serde_json::to_value(status).map_err(|e| bad(e.to_string()))?;
    if let Value::Object(map) = &mut value {
        map.insert("read_only".into(), json!(console.tokens.is_empty()));
        map.insert("show_payloads".into(), json!(console.show_payloads));
    }
    Ok(Json(value))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LagQuery {
    minutes: Option<i32>,
}

async fn lag(State(console): Shared, query: Result<Query<LagQuery>, QueryRejection>) -> Answer {
    let query = parameters(query)?;
    let minutes = query.minutes.unwrap_or(60);
    if !(1..=1_440).contains(&minutes) {
        return Err(bad(format!("minutes `{minutes}` must be from 1 to 1440")));
    }
    let client = client(&console).await?;
    let minutes = crate::history::lag(&client, minutes).await?;
    answer(json!({ "minutes": minutes }))
}

async fn dead_letters(
    State(console): Shared,
    query: Result<Query<Params>, QueryRejection>,
) -> Answer {
    let mut query = parameters(query)?;
    let limit = limit(&mut query)?;
    let filter = query_filter(query)?;
    let client = client(&console).await?;
    answer(crate::dead::list(&client, &filter, limit).await?)
}

async fn dead_letter(State(console): Shared, Path(id): Path<String>) -> Answer {
    let which: MessageRef = id.parse().map_err(bad)?;
    let client = client(&console).await?;
    answer(crate::dead::show(&client, which, console.show_payloads).await?)
}

async fn blocked_keys(
    State(console): Shared,
    query: Result<Query<Params>, QueryRejection>,
) -> Answer {
    let mut query = parameters(query)?;
    let limit = limit(&mut query)?;
    no_more(&query)?;
    let client = client(&console).await?;
    answer(json!({ "keys": crate::dead::blocked_keys(&client, limit).await? }))
}

async fn scheduled(State(console): Shared, query: Result<Query<Params>, QueryRejection>) -> Answer {
    let mut query = parameters(query)?;
    let limit = limit(&mut query)?;
    no_more(&query)?;
    let client = client(&console).await?;
    let stats = crate::state::schedule_stats(&**client)
        .await
        .map_err(crate::db("read outbox.scheduled"))?;
    let messages = crate::scheduled::list(&client, limit).await?;
    answer(json!({ "stats": stats, "messages": messages }))
}

async fn captures(State(console): Shared) -> Answer {
    let client = client(&console).await?;
    answer(json!({ "captures": crate::captures::list(&client).await? }))
}

async fn audit(State(console): Shared, query: Result<Query<Params>, QueryRejection>) -> Answer {
    let mut query = parameters(query)?;
    let limit = limit(&mut query)?;
    no_more(&query)?;
    let client = client(&console).await?;
    answer(json!({ "entries": crate::audit::list(&client, limit).await? }))
}

/// Refuses parameters an endpoint does not take.
fn no_more(query: &Params) -> Result<(), Failure> {
    match query.keys().next() {
        Some(name) => Err(bad(format!("unknown parameter `{name}`"))),
        None => Ok(()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReconcileQuery {
    since: Option<TimeArg>,
    until: Option<TimeArg>,
    exchange: Option<String>,
}

async fn reconcile(
    State(console): Shared,
    query: Result<Query<ReconcileQuery>, QueryRejection>,
) -> Answer {
    let query = parameters(query)?;
    let Some((target, table)) = &console.inbox else {
        return answer(json!({
            "configured": false,
            "hint": "start the console with OUTBOX_CONSOLE_INBOX_URL (and OUTBOX_CONSOLE_INBOX_TABLE) \
                     naming the consumer's database to check what it processed"
        }));
    };
    let outbox = client(&console).await?;
    let consumer = db::connect(target).await.map_err(|e| {
        Failure(
            StatusCode::SERVICE_UNAVAILABLE,
            outbox::chain_line(e.as_ref()),
        )
    })?;
    let inbox = Inbox {
        client: &consumer,
        described: target.describe(),
        table,
    };
    let since = query
        .since
        .unwrap_or(TimeArg::Ago(std::time::Duration::from_secs(3600)));
    let until = query
        .until
        .unwrap_or(TimeArg::Ago(std::time::Duration::from_secs(60)));
    let exchange = query.exchange.filter(|e| !e.is_empty());
    let report =
        crate::reconcile::reconcile(&outbox, &inbox, &since, &until, exchange.as_deref()).await?;
    let mut value = serde_json::to_value(report).map_err(|e| bad(e.to_string()))?;
    if let Value::Object(map) = &mut value {
        map.insert("configured".into(), json!(true));
    }
    Ok(Json(value))
}

/// The body of every change.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Change {
    /// Absent or empty: every row in scope. An object: `[]` or `null`
    /// would otherwise pass for an empty filter.
    #[serde(default, deserialize_with = "object")]
    filter: Filter,
    /// Required: a change that forgot to say is not made.
    dry_run: bool,
}

fn object<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Filter, D::Error> {
    match Value::deserialize(de)? {
        value @ Value::Object(_) => serde_json::from_value(value).map_err(serde::de::Error::custom),
        _ => Err(serde::de::Error::custom("filter must be an object")),
    }
}

type Operation =
    for<'a> fn(Session<'a>, &'a Filter, crate::Bulk) -> BoxFuture<'a, Result<Outcome, Error>>;

async fn change(
    console: Arc<Console>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    operation: Operation,
) -> Answer {
    let body = body.map_err(|rejection| Failure(rejection.status(), rejection.body_text()))?;
    let actor = auth::actor(&console.tokens, &headers).map_err(|(s, why)| Failure(s, why))?;
    let change: Change =
        serde_json::from_slice(&body).map_err(|e| bad(format!("bad request body: {e}")))?;
    let filter = change.filter.normalized();
    let bulk = crate::Bulk {
        dry_run: change.dry_run,
        ..console.bulk
    };
    // Its own task: a client that goes away does not stop a change half
    // way, with no audit row.
    let task = console.clone().changes.spawn(async move {
        // Two connections: the change's, and its audit row's.
        let work = client(&console).await?;
        let trail = client(&console).await?;
        let stop = CancellationToken::new();
        let session = Session {
            work: &work,
            trail: &trail,
            actor: &actor,
            stop: &stop,
        };
        operation(session, &filter, bulk)
            .await
            .map_err(Failure::from)
    });
    let outcome = task
        .await
        .map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    answer(outcome)
}

async fn requeue(
    State(console): Shared,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Answer {
    change(console, headers, body, |s, f, b| {
        Box::pin(crate::dead::requeue(s, f, b))
    })
    .await
}

async fn discard(
    State(console): Shared,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Answer {
    change(console, headers, body, |s, f, b| {
        Box::pin(crate::dead::discard(s, f, b))
    })
    .await
}

async fn replay(
    State(console): Shared,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Answer {
    change(console, headers, body, |s, f, b| {
        Box::pin(crate::replay::replay(s, f, b))
    })
    .await
}
