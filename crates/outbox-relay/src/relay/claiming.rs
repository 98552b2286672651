//! A claim runs beside the publishing: while its statement is out (17 ms
//! for 500 rows under a backlog's drain, 30 % of the drain's time), the
//! relay goes on settling confirms and publishing rows at hand. Awaited in
//! place, it held every confirm that came meanwhile unsettled and every
//! free slot of the window empty until it returned.

use std::future::Future;
use std::pin::Pin;

use tokio::time::Instant;

use super::Relay;
use crate::meters::DATABASE;
use crate::outage::Outage;
use crate::store::{Claim, ClaimLimits, Claimed, StoreError};

/// A claim on its way.
pub(super) struct Claiming {
    /// When it started: its rows' leases count from here.
    pub(super) at: Instant,
    /// Most rows it can bring.
    pub(super) rows: usize,
    /// Polled by the relay's own task, beside the window and the wake-ups
    /// (not spawned: an idle relay woken for one row then has no hop
    /// between tasks on its way to the publish).
    statement: Pin<Box<dyn Future<Output = Result<Claim, StoreError>> + Send>>,
}

/// What a drain's claims found so far.
#[derive(Default)]
pub(super) struct Progress {
    pub(super) claimed_any: bool,
    /// The last claim found everything claimable.
    pub(super) exhausted: bool,
    /// A key had unpublished rows at some claim: only then can a mark make
    /// rows claimable.
    pub(super) keys_seen: bool,
}

impl Relay {
    /// Starts a claim of up to `limit` rows and `bytes` of payload.
    pub(super) fn start_claim(&mut self, limit: usize, bytes: u64) {
        let at = Instant::now();
        if self.wakeup.locks_held() {
            // Likely a transaction that fired the trigger early: its row
            // has a low id and commits late.
            self.cursor.rewind();
        }
        let in_flight = self.published_unmarked(at);
        let after = self.cursor.start(at);
        let keys_from = self.next_key.clone();
        let (store, config) = (self.store.clone(), &self.config);
        let (lease, block_on_dead_head, followers) =
            (config.lease, config.block_on_dead_head, config.key_pipeline);
        let keyless_only = !self.keys_pending;
        let statement = Box::pin(async move {
            let limits = ClaimLimits {
                in_flight: &in_flight,
                after,
                keys_from: &keys_from,
                rows: limit as u32,
                bytes,
                lease,
                block_on_dead_head,
                followers,
                keyless_only,
            };
            store.claim(limits).await
        });
        self.claiming = Some(Claiming {
            at,
            rows: limit,
            statement,
        });
    }

    /// Records what a claim took, once it is back; returns its rows.
    pub(super) fn took(&mut self, at: Instant, claim: Claim, found: &mut Progress) -> Vec<Claimed> {
        self.cursor.claimed(at, &claim.rows, claim.exhausted);
        self.next_key = claim.next_key;
        self.keys_pending = claim.keys_pending;
        self.health.set(DATABASE, true);
        self.meters.claim_batch.record(claim.rows.len() as f64);
        found.keys_seen |=
            claim.keys_pending || claim.rows.iter().any(|r| r.ordering_key.is_some());
        found.exhausted = claim.exhausted;
        found.claimed_any |= !claim.rows.is_empty();
        claim.rows
    }

    /// After a drain (shutdown or an outage): waits for a claim still on
    /// its way and gives its rows back, so that they are not left leased.
    pub(super) async fn finish_claim(&mut self) {
        if let Some(claiming) = self.claiming.take()
            && let Ok(claim) = claiming.statement.await
        {
            let rows = self.took(claiming.at, claim, &mut Progress::default());
            self.give_back(rows);
        }
    }
}

/// The claim on its way, once back: `None` never resolves, for a branch
/// of `select!` that only runs while a claim is out.
pub(super) async fn back(claiming: &mut Option<Claiming>) -> Result<(Instant, Claim), Outage> {
    let Some(out) = claiming.as_mut() else {
        return std::future::pending().await;
    };
    let claim = (&mut out.statement).await;
    let at = out.at;
    *claiming = None;
    Ok((at, claim?))
}
