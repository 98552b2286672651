//! A hostile user's rows, queues and roles (issue 13): each test here
//! failed on the relay before its fix. A row's own problem is that row's
//! attempt and then a dead letter; it never fails a claim, counts as an
//! outage or re-publishes other rows. A stuck queue holds one slot, not
//! the window. A frozen relay gives its rows and its locks back. No other
//! session can stall the relay or silence the writers' wake-ups.
//!
//! Split by theme: `rows` (a row's own problem), `payloads` (big payloads,
//! `serial_`), `frozen` (stuck queues and frozen relays), `locks` (other
//! sessions' locks).

use std::collections::HashSet;
use std::process::Child;
use std::time::{Duration, Instant};

use outbox_relay::Settings;
use outbox_tests::broker::message_id;
use outbox_tests::dispatch::count;
use outbox_tests::relay::{RunningRelay, test_settings};
use outbox_tests::*;
use tokio_postgres::Client;
use uuid::Uuid;

mod frozen;
mod locks;
mod payloads;
mod rows;

const ARRIVAL: Duration = Duration::from_secs(30);

/// A relay process, killed (and continued first, if stopped) on drop.
struct RelayProcess(Child);

impl RelayProcess {
    fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([signal, &self.0.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal}");
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        self.signal("-CONT");
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn enqueue(client: &Client, exchange: &str, payload: &str, key: Option<&str>) -> Uuid {
    client
        .query_one(
            "SELECT outbox.enqueue($1, '', $2::text::jsonb, '{}', $3)",
            &[&exchange, &payload, &key],
        )
        .await
        .expect("enqueue")
        .get(0)
}

/// Waits until `sql` counts `expected`, failing after `limit`.
async fn wait_for_count(db: &TestDb, sql: &str, expected: i64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let found = count(db, sql).await;
        if found == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sql}: {found}, not {expected}, after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Counts the sessions of this test's database holding wake-up lock
/// `(1869968482, objid)`; other tests' relays hold it in theirs.
fn wake_lock_holders(objid: i32) -> String {
    format!(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
         AND classid = 1869968482 AND objid = {objid} AND objsubid = 2 AND granted \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
}

/// A relay whose sweep is a minute away, so that only wake-ups (or its
/// own fast polling) move rows, once it is the one listener and idle.
async fn start_idle_relay(db: &TestDb) -> RunningRelay {
    let relay = RunningRelay::start(Settings {
        sweep_interval_ms: Some(60_000),
        ..test_settings(db)
    })
    .await;
    wait_for_count(db, &wake_lock_holders(2), 1, ARRIVAL).await;
    // Let its first drain end: a row committed during a drain that found
    // nothing waits for the sweep (the race docs/guarantees.md describes), and no
    // outside sign tells when that drain is over.
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay
}

fn distinct_ids(deliveries: &[lapin::message::Delivery]) -> HashSet<Uuid> {
    deliveries.iter().map(message_id).collect()
}
