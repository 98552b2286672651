//! The baseline the relay's latency is judged against: a bare
//! NOTIFY → publish bridge in the manner of pg-amqp-bridge. Writers call
//! `pg_notify` with the message; the bridge publishes each notification as
//! it arrives (persistent, publisher confirms, no waiting on one confirm
//! before the next publish). Nothing is stored, nothing retried, and a
//! notification sent while the bridge is down is lost: it is the floor,
//! not an alternative.

use anyhow::Context;
use futures::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection};
use serde::Deserialize;
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::setup::{self, Fixture};

pub const CHANNEL: &str = "outbox_bench_bridge";
/// The bridge's connection calls itself so (`cost` finds its backend).
pub const APPLICATION_NAME: &str = "outbox-bench-bridge";
/// What a writer sends: `{"id": "<uuid>", "payload": {...}}`.
pub const NOTIFY: &str = "SELECT pg_notify('outbox_bench_bridge', $1)";

#[derive(Deserialize)]
struct Notified {
    id: uuid::Uuid,
    payload: serde_json::Value,
}

pub struct Bridge {
    _client: tokio_postgres::Client,
    connection: Connection,
    task: JoinHandle<()>,
}

impl Bridge {
    pub async fn start(fixture: &Fixture) -> anyhow::Result<Bridge> {
        let connection = setup::connect_amqp(&fixture.amqp_url).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let mut config: tokio_postgres::Config = fixture.db_url.parse()?;
        config.application_name(APPLICATION_NAME);
        let (client, mut session) = config
            .connect(NoTls)
            .await
            .map_err(outbox::PgError)
            .context("cannot connect to PostgreSQL")?;
        let exchange = fixture.exchange.clone();
        let task = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| session.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                if let AsyncMessage::Notification(notification) = message {
                    publish(&channel, &exchange, notification.payload()).await;
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await
            .context("bridge LISTEN")?;
        Ok(Bridge {
            _client: client,
            connection,
            task,
        })
    }

    pub async fn stop(self) {
        self.task.abort();
        let _ = self.connection.close(200, "bench done".into()).await;
    }
}

/// Publishes one notification; its confirm is awaited on a task of its own,
/// so the next notification is not held up.
async fn publish(channel: &Channel, exchange: &str, notified: &str) {
    let Ok(notified) = serde_json::from_str::<Notified>(notified) else {
        tracing::warn!("bridge: a notification that is not the bench's JSON");
        return;
    };
    let properties = BasicProperties::default()
        .with_message_id(notified.id.to_string().into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    let body = notified.payload.to_string();
    let published = channel
        .basic_publish(
            exchange.into(),
            "".into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            properties,
        )
        .await;
    match published {
        Ok(confirm) => {
            tokio::spawn(async move {
                if let Err(error) = confirm.await {
                    tracing::warn!("bridge: confirm failed: {error}");
                }
            });
        }
        Err(error) => tracing::warn!("bridge: publish failed: {error}"),
    }
}
