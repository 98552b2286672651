//! The order as the seed's clients send it, and its validation.

use serde::{Deserialize, Serialize};

/// `POST /orders` body. Field names follow the seed's Java `Order`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NewOrder {
    /// Given by the client, or generated when absent.
    pub order_id: Option<i64>,
    pub user_name: String,
    pub context: String,
    pub num: i32,
}

/// A stored order, and the payload of its outbox message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Order {
    pub order_id: i64,
    pub user_name: String,
    pub context: String,
    pub num: i32,
}

/// The seed's columns are varchar(200).
const MAX_TEXT: usize = 200;

/// Why an order is refused; the message is the reason of the 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidOrder {
    #[error("orderId must be positive, not {0}")]
    OrderId(i64),
    #[error("{0} must not be empty")]
    Empty(&'static str),
    #[error("{0} is longer than {MAX_TEXT} characters")]
    TooLong(&'static str),
    #[error("num must be at least 1, not {0}")]
    Num(i32),
}

impl NewOrder {
    /// Checks the fields.
    pub fn validate(&self) -> Result<(), InvalidOrder> {
        if let Some(id) = self.order_id
            && id <= 0
        {
            return Err(InvalidOrder::OrderId(id));
        }
        for (name, value) in [("userName", &self.user_name), ("context", &self.context)] {
            if value.trim().is_empty() {
                return Err(InvalidOrder::Empty(name));
            }
            if value.chars().count() > MAX_TEXT {
                return Err(InvalidOrder::TooLong(name));
            }
        }
        if self.num <= 0 {
            return Err(InvalidOrder::Num(self.num));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(json: &str) -> NewOrder {
        serde_json::from_str(json).expect("parses")
    }

    #[test]
    fn seed_order_is_valid() {
        let o =
            order(r#"{"orderId": 100001, "userName": "zhang", "context": "noodles", "num": 1}"#);
        assert_eq!(o.validate(), Ok(()));
    }

    #[test]
    fn bad_fields_are_explained() {
        let o = order(r#"{"userName": " ", "context": "x", "num": 1}"#);
        assert_eq!(o.validate(), Err(InvalidOrder::Empty("userName")));
        assert_eq!(
            o.validate().map_err(|e| e.to_string()),
            Err("userName must not be empty".into())
        );
        let o = order(r#"{"userName": "u", "context": "x", "num": 0}"#);
        assert_eq!(
            o.validate().map_err(|e| e.to_string()),
            Err("num must be at least 1, not 0".into())
        );
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let parsed: Result<NewOrder, _> =
            serde_json::from_str(r#"{"userName": "u", "context": "x", "num": 1, "price": 3}"#);
        assert!(parsed.is_err());
    }
}
