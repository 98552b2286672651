//! The dispatch consumer against the real PostgreSQL and RabbitMQ: each
//! order lands once, duplicates and redeliveries change nothing, poison and
//! exhausted retries go to the dead-letter queue while good messages keep
//! flowing, an unavailable database or a cut broker connection pauses
//! without acking, a killed consumer's deliveries land once elsewhere.
//! (`::dispatch` is the crate; plain `dispatch` is the harness module.)
//!
//! Split by theme: `migrations`, `delivery` (each order once), `poison`
//! (dead letters and retries), `outages` (database, broker, killed consumer).

use ::dispatch::Settings;
use outbox_consumer::Topology;
use outbox_tests::dispatch::*;
use outbox_tests::*;

mod delivery;
mod migrations;
mod outages;
mod poison;

/// A running consumer on its own database, and a publisher to its exchange.
struct Fixture {
    db: TestDb,
    names: Topology,
    consumer: RunningDispatch,
    publisher: Publisher,
}

impl Fixture {
    async fn start() -> Fixture {
        let db = dispatch_db().await;
        let settings = test_settings(&db);
        Fixture::start_with(db, settings).await
    }

    async fn start_with(db: TestDb, settings: Settings) -> Fixture {
        let names = topology(&settings);
        let consumer = RunningDispatch::start(settings).await;
        let publisher = Publisher::new(&names.exchange).await;
        Fixture {
            db,
            names,
            consumer,
            publisher,
        }
    }

    async fn wait_for_deliveries(&self, expected: i64) {
        wait_until(&format!("{expected} deliveries"), || async {
            deliveries(&self.db).await == expected
        })
        .await;
    }

    /// Stops the consumer; then nothing may wait in its queues: every
    /// message was acked, none given back, and no retry is pending.
    async fn stop_with_queues_empty(self) -> TestDb {
        self.consumer.stop().await;
        for queue in [&self.names.queue, &self.names.retry_queue] {
            assert_eq!(ready(queue).await, 0, "{queue} is not empty");
        }
        self.db
    }
}

/// A database with the dispatch schema.
async fn dispatch_db() -> TestDb {
    let db = TestDb::empty().await;
    let mut client = db.connect().await;
    ::dispatch::migrate(&mut client)
        .await
        .expect("migrate dispatch");
    db
}

async fn deliveries(db: &TestDb) -> i64 {
    count(db, "SELECT count(*) FROM dispatch.deliveries").await
}

async fn inbox(db: &TestDb) -> i64 {
    count(db, "SELECT count(*) FROM dispatch.inbox").await
}
