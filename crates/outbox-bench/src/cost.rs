//! What a measurement cost, for the latency profile: CPU time of the relay
//! (its threads in this process, see `setup::Relay`) and of the PostgreSQL
//! backends serving the publisher (the relay's or the bridge's, by their
//! application name), read from /proc, with the relay's claims and
//! wake-ups over the same span.

use std::collections::HashMap;
use std::time::Instant;

use tokio_postgres::Client;

use crate::capture::{Captured, ClaimCounts};
use crate::processes::cpu_seconds_of_pid;
use crate::setup::{self, Fixture};

/// The relay's connections say so (`outbox_service::db`), and so does the
/// bridge's (`bridge::APPLICATION_NAME`).
const PUBLISHERS: [&str; 2] = ["outbox-relay", crate::bridge::APPLICATION_NAME];
const BACKENDS: &str = "SELECT pid FROM pg_stat_activity \
     WHERE datname = current_database() AND application_name = ANY ($1)";

/// Reads CPU times at the start and the end of a span.
pub struct CpuMeter {
    client: Client,
    captured: Captured,
}

/// CPU times at one instant.
pub struct CpuSnapshot {
    at: Instant,
    relay: f64,
    /// Per backend serving the publisher: CPU seconds so far.
    backends: HashMap<i32, f64>,
}

/// What a span cost.
#[derive(Debug, Default, Clone, Copy)]
pub struct Cost {
    pub seconds: f64,
    /// CPU seconds of the relay's threads.
    pub relay: f64,
    /// CPU seconds of the backends serving the publisher.
    pub pg_publisher: f64,
    pub claims: ClaimCounts,
}

impl CpuMeter {
    pub async fn start(fixture: &Fixture, captured: &Captured) -> anyhow::Result<CpuMeter> {
        Ok(CpuMeter {
            client: setup::connect(&fixture.db_url).await?,
            captured: captured.clone(),
        })
    }

    /// CPU times now; the claim counts start afresh.
    pub async fn snapshot(&self) -> anyhow::Result<CpuSnapshot> {
        self.captured.take_claims();
        Ok(CpuSnapshot {
            at: Instant::now(),
            relay: setup::relay_cpu_seconds()?,
            backends: self.backends().await?,
        })
    }

    /// What the span since `start` cost. A backend that ended meanwhile is
    /// not counted (the publisher's connections live through a
    /// measurement); one that began is counted from zero.
    pub async fn since(&self, start: &CpuSnapshot) -> anyhow::Result<Cost> {
        let mut cost = Cost {
            seconds: start.at.elapsed().as_secs_f64(),
            relay: setup::relay_cpu_seconds()? - start.relay,
            claims: self.captured.take_claims(),
            ..Cost::default()
        };
        for (pid, cpu) in self.backends().await? {
            let before = start.backends.get(&pid).copied().unwrap_or(0.0);
            cost.pg_publisher += (cpu - before).max(0.0);
        }
        Ok(cost)
    }

    async fn backends(&self) -> anyhow::Result<HashMap<i32, f64>> {
        let names = PUBLISHERS.map(String::from);
        let rows = self.client.query(BACKENDS, &[&names.as_slice()]).await?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                let pid: i32 = row.get(0);
                Some((pid, cpu_seconds_of_pid(u32::try_from(pid).ok()?)?))
            })
            .collect())
    }
}

impl Cost {
    /// Adds another span's cost.
    pub fn absorb(&mut self, other: &Cost) {
        self.seconds += other.seconds;
        self.relay += other.relay;
        self.pg_publisher += other.pg_publisher;
        let (mine, theirs) = (&mut self.claims, &other.claims);
        mine.claims += theirs.claims;
        mine.empty += theirs.empty;
        mine.rows += theirs.rows;
        mine.notified += theirs.notified;
        mine.other_wakeups += theirs.other_wakeups;
    }

    /// Microseconds of `cpu` seconds per message of `messages`.
    pub fn micros_per_message(cpu: f64, messages: usize) -> f64 {
        cpu * 1e6 / messages.max(1) as f64
    }

    pub fn claims_per_second(&self) -> f64 {
        self.claims.claims as f64 / self.seconds.max(1e-9)
    }

    pub fn rows_per_claim(&self) -> f64 {
        self.claims.rows as f64 / self.claims.claims.max(1) as f64
    }
}
