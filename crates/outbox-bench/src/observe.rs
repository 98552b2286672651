//! Where the bench watches messages arrive, by `message_id`:
//! - [`Consumer`]: the bench queue (bound to the same exchange as the
//!   dispatch queue), the instant each message reached a consumer;
//! - [`Delivered`]: a trigger in the dispatch database NOTIFYs the bench of
//!   each delivery row; notifications go out at commit, so the instant one
//!   arrives is the delivery row's commit, late by one loopback hop at most.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context;
use futures::StreamExt;
use lapin::Connection;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_postgres::{AsyncMessage, NoTls};
use uuid::Uuid;

use crate::setup::{self, Fixture};

/// When each message first arrived.
#[derive(Default)]
pub struct Arrivals {
    pub first: HashMap<Uuid, Instant>,
    /// Arrivals of a `message_id` that had arrived already.
    pub duplicates: u64,
}

impl Arrivals {
    /// Microseconds from `committed` to the first arrival of `id`, if it
    /// arrived; an arrival before the writer saw its commit return counts as 0.
    pub fn micros_since(&self, id: &Uuid, committed: Instant) -> Option<u64> {
        let arrived = self.first.get(id)?;
        Some(arrived.saturating_duration_since(committed).as_micros() as u64)
    }

    fn note(&mut self, id: Uuid, at: Instant) {
        match self.first.entry(id) {
            Entry::Vacant(first) => {
                first.insert(at);
            }
            Entry::Occupied(_) => self.duplicates += 1,
        }
    }
}

/// Arrivals filled in by a background task.
#[derive(Clone, Default)]
pub struct Shared(Arc<Mutex<Arrivals>>);

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, Arrivals> {
        // A panic while noting leaves a map that is still usable.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn count(&self) -> usize {
        self.lock().first.len()
    }

    /// What arrived so far; starts over empty.
    pub fn take(&self) -> Arrivals {
        std::mem::take(&mut *self.lock())
    }
}

/// Consumes the bench queue (auto-ack) and notes arrival instants.
pub struct Consumer {
    pub arrivals: Shared,
    connection: Connection,
    task: JoinHandle<()>,
}

impl Consumer {
    pub async fn start(fixture: &Fixture) -> anyhow::Result<Consumer> {
        let connection = setup::connect_amqp(&fixture.amqp_url).await?;
        let channel = connection.create_channel().await?;
        let mut deliveries = channel
            .basic_consume(
                fixture.queue.as_str().into(),
                "outbox-bench".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .context("cannot consume the bench queue")?;
        let arrivals = Shared::default();
        let sink = arrivals.clone();
        let task = tokio::spawn(async move {
            while let Some(next) = deliveries.next().await {
                let arrived = Instant::now();
                let delivery = match next {
                    Ok(delivery) => delivery,
                    Err(error) => {
                        // The report then shows fewer received than sent.
                        tracing::warn!("bench consumer stopped: {error}");
                        break;
                    }
                };
                let id = delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .and_then(|id| id.as_str().parse::<Uuid>().ok());
                if let Some(id) = id {
                    sink.lock().note(id, arrived);
                }
            }
        });
        Ok(Consumer {
            arrivals,
            connection,
            task,
        })
    }

    /// Stops consuming; returns what arrived.
    pub async fn stop(self) -> Arrivals {
        let _ = self.connection.close(200, "bench done".into()).await;
        self.task.abort();
        self.arrivals.take()
    }
}

/// Listens for the dispatch database's delivery notifications.
pub struct Delivered {
    pub arrivals: Shared,
    /// Holds the session (and so the LISTEN) open.
    _client: tokio_postgres::Client,
    task: JoinHandle<()>,
}

impl Delivered {
    pub async fn start(dispatch_db_url: &str) -> anyhow::Result<Delivered> {
        let (client, mut connection) = tokio_postgres::connect(dispatch_db_url, NoTls)
            .await
            .map_err(outbox::PgError)
            .context("cannot connect to PostgreSQL")?;
        let arrivals = Shared::default();
        let sink = arrivals.clone();
        let task = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(next) = messages.next().await {
                let arrived = Instant::now();
                let message = match next {
                    Ok(message) => message,
                    Err(error) => {
                        tracing::warn!("delivery listener stopped: {error}");
                        break;
                    }
                };
                if let AsyncMessage::Notification(notification) = message
                    && let Ok(id) = notification.payload().parse::<Uuid>()
                {
                    sink.lock().note(id, arrived);
                }
            }
        });
        // The task drives the connection, so LISTEN only once it runs.
        client
            .batch_execute(&format!("LISTEN {}", setup::DELIVERED_CHANNEL))
            .await
            .map_err(outbox::PgError)
            .context("cannot LISTEN")?;
        Ok(Delivered {
            arrivals,
            _client: client,
            task,
        })
    }

    pub fn stop(self) -> Arrivals {
        self.task.abort();
        self.arrivals.take()
    }
}
