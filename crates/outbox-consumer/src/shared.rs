//! What a consumer's tasks share: the state every stage of a delivery's
//! path reads ([`Shared`]: the handler, the pool, the inbox, the config,
//! health, meters, shutdown and the sequencer's bounds), built once by
//! `consumer`, and how a task of a session ends ([`Outcome`]).

use deadpool_postgres::Pool;
use outbox_service::health::Health;
use tokio_util::sync::CancellationToken;

use crate::broker::BrokerError;
use crate::config::ConsumerConfig;
use crate::inbox::Inbox;
use crate::meters::Meters;
use crate::sequencer::Bounds;

/// What the lanes of all sessions share.
pub(crate) struct Shared<H> {
    pub handler: H,
    pub pool: Pool,
    pub inbox: Inbox,
    pub config: ConsumerConfig,
    pub health: Health,
    pub meters: Meters,
    pub shutdown: CancellationToken,
    /// How long and how many keyed messages may wait for earlier ones.
    pub bounds: Bounds,
}

/// How a lane (or a retried copy's task) ended, for the session.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Shutdown, or the session dropped it: nothing for the session to do.
    Settled,
    /// The broker failed under us: the session must reconnect.
    BrokerFailed(BrokerError),
}
