//! How long a fault held up the flow, read from the databases' own
//! timestamps (the same clock as the test's: one machine): polled on fresh
//! connections, since the ones before may have died with their server.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use outbox_tests::pipeline::Pipeline;
use tokio_postgres::NoTls;

/// How long a fault may hold up the flow before the test gives up.
const RESUME_LIMIT: Duration = Duration::from_secs(60);

/// Now, in seconds since the epoch, as the queries take it.
pub fn epoch_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Passes on an error of a server going away or coming back (connection,
/// shutdown, recovery: SQLSTATE classes 08, 57, 25); any other is a bug in
/// the query, and fails the test at once rather than at its deadline.
fn fatal(error: tokio_postgres::Error) -> tokio_postgres::Error {
    if let Some(code) = error.code().map(|code| code.code())
        && !["08", "57", "25"]
            .iter()
            .any(|class| code.starts_with(class))
    {
        panic!("{}", outbox::error_line(&error));
    }
    error
}

/// One float from `sql` with the fault's epoch as `$1`; `None` while the
/// server is away or the value is NULL.
async fn probe_value(url: &str, sql: &str, fault: f64) -> Option<f64> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.ok()?;
    tokio::spawn(connection);
    let row = client.query_one(sql, &[&fault]).await.map_err(fatal).ok()?;
    row.get::<_, Option<f64>>(0)
}

/// Polls `probe` until it has a value; fails after [`RESUME_LIMIT`].
async fn poll<F, Fut>(what: &str, mut probe: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<f64>>,
{
    let deadline = Instant::now() + RESUME_LIMIT;
    loop {
        if let Some(seconds) = probe().await {
            return seconds;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {RESUME_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Seconds after `fault` until `sql` (a delay after `$1`) has a value.
pub async fn seconds_until(url: &str, sql: &str, fault: f64, what: &str) -> f64 {
    poll(what, || probe_value(url, sql, fault)).await
}

/// Seconds after `fault` of the first `timestamp` in `table` later than
/// `after` seconds past it: on a promoted database, what ran there (the
/// last commits before the stop were replicated too).
pub async fn first_after(
    url: &str,
    table: &str,
    timestamp: &str,
    fault: f64,
    after: f64,
    what: &str,
) -> f64 {
    let sql = format!(
        "SELECT extract(epoch FROM min({timestamp}))::float8 - $1 FROM {table} \
         WHERE {timestamp} > to_timestamp($1::float8 + {after})"
    );
    seconds_until(url, &sql, fault, what).await
}

/// How long after `fault` the flow ran again: a message enqueued `after`
/// seconds past the fault (or later) confirmed and marked published, and
/// its effect committed (behind whatever queued up meanwhile).
pub async fn flow_resumed(pipeline: &Pipeline, fault: f64, after: f64, what: &str) -> (f64, f64) {
    let published = seconds_until(
        &pipeline.app.url,
        &format!(
            "SELECT extract(epoch FROM min(published_at))::float8 - $1 FROM outbox.messages \
             WHERE created_at > to_timestamp($1::float8 + {after})"
        ),
        fault,
        &format!("{what}: a message enqueued after the fault published"),
    )
    .await;
    let effect = poll(
        &format!("{what}: a message enqueued after the fault reached the dispatch database"),
        || first_effect_after(pipeline, fault, after),
    )
    .await;
    (published, effect)
}

/// The first effect of a message enqueued `after` seconds past `fault`, in
/// seconds after the fault.
async fn first_effect_after(pipeline: &Pipeline, fault: f64, after: f64) -> Option<f64> {
    let (app, connection) = tokio_postgres::connect(&pipeline.app.url, NoTls)
        .await
        .ok()?;
    tokio::spawn(connection);
    let ids: Vec<uuid::Uuid> = app
        .query(
            "SELECT message_id FROM outbox.messages \
             WHERE created_at > to_timestamp($1::float8 + $2::float8) ORDER BY id LIMIT 2000",
            &[&fault, &after],
        )
        .await
        .map_err(fatal)
        .ok()?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let (dispatch, connection) = tokio_postgres::connect(&pipeline.dispatch_db.url, NoTls)
        .await
        .ok()?;
    tokio::spawn(connection);
    let row = dispatch
        .query_one(
            "SELECT extract(epoch FROM min(processed_at))::float8 - $1 FROM dispatch.inbox \
             WHERE message_id = ANY($2)",
            &[&fault, &ids],
        )
        .await
        .map_err(fatal)
        .ok()?;
    row.get::<_, Option<f64>>(0)
}
