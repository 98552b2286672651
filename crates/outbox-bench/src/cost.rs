//! What a measurement cost, for the latency profile: CPU time of the relay
//! (its threads in this process, see `setup::Relay`) and of the PostgreSQL
//! backends of the run's database (the relay's, by their application name,
//! and the others: the writers', the bridge's), read from /proc, with the
//! relay's claims and wake-ups over the same span.

use std::collections::HashMap;
use std::time::Instant;

use tokio_postgres::Client;

use crate::capture::{Captured, ClaimCounts};
use crate::processes::cpu_seconds_of_pid;
use crate::setup::{self, Fixture};

/// The relay's connections say so (`outbox_service::db`).
const RELAY_APPLICATION: &str = "outbox-relay";
const BACKENDS: &str = "SELECT pid, application_name = $1 FROM pg_stat_activity \
     WHERE datname = current_database() AND pid <> pg_backend_pid()";

/// Reads CPU times at the start and the end of a span.
pub struct CpuMeter {
    client: Client,
    captured: Captured,
}

/// CPU times at one instant.
pub struct CpuSnapshot {
    at: Instant,
    relay: f64,
    /// Per backend: serves the relay, CPU seconds so far.
    backends: HashMap<i32, (bool, f64)>,
}

/// What a span cost.
#[derive(Debug, Default, Clone, Copy)]
pub struct Cost {
    pub seconds: f64,
    /// CPU seconds of the relay's threads.
    pub relay: f64,
    /// CPU seconds of the backends serving the relay.
    pub pg_relay: f64,
    /// CPU seconds of every other backend of the database.
    pub pg_others: f64,
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
            relay: setup::relay_cpu_seconds(),
            backends: self.backends().await?,
        })
    }

    /// What the span since `start` cost. A backend that ended meanwhile is
    /// not counted (the relay's and the writers' connections live through
    /// a measurement); one that began is counted from zero.
    pub async fn since(&self, start: &CpuSnapshot) -> anyhow::Result<Cost> {
        let mut cost = Cost {
            seconds: start.at.elapsed().as_secs_f64(),
            relay: setup::relay_cpu_seconds() - start.relay,
            claims: self.captured.take_claims(),
            ..Cost::default()
        };
        for (pid, (serves_relay, cpu)) in self.backends().await? {
            let before = start.backends.get(&pid).map_or(0.0, |b| b.1);
            let spent = (cpu - before).max(0.0);
            match serves_relay {
                true => cost.pg_relay += spent,
                false => cost.pg_others += spent,
            }
        }
        Ok(cost)
    }

    async fn backends(&self) -> anyhow::Result<HashMap<i32, (bool, f64)>> {
        let rows = self.client.query(BACKENDS, &[&RELAY_APPLICATION]).await?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                let pid: i32 = row.get(0);
                let serves_relay: bool = row.get::<_, Option<bool>>(1).unwrap_or(false);
                let cpu = cpu_seconds_of_pid(u32::try_from(pid).ok()?)?;
                Some((pid, (serves_relay, cpu)))
            })
            .collect())
    }
}

impl Cost {
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
