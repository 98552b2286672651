//! `outbox-relay console`: the JSON API (auth, filters, dry runs, the
//! audit trail), bulk changes beside a draining relay, the console's
//! least-privilege role, and the web page in a real headless browser.

use outbox_tests::TestDb;
use tokio_postgres::Client;

mod api;
mod browser;
mod bulk;
mod hostile;
mod rights;

/// `n` messages to `exchange`, `{"n": i}`, every third keyed by
/// `key-{i % 5}`, all dead with `error` (as a relay leaves them after its
/// last attempt), in one statement each.
async fn dead_letters(client: &Client, exchange: &str, n: i64, error: &str) {
    client
        .execute(
            "SELECT outbox.enqueue($1, 'rk', jsonb_build_object('n', g), '{\"x-tenant\": \"acme\"}', \
                    CASE WHEN g % 3 = 0 THEN 'key-' || (g % 5) END) \
             FROM generate_series(1, $2::bigint) g",
            &[&exchange, &n],
        )
        .await
        .expect("enqueue");
    client
        .execute(
            "UPDATE outbox.messages SET dead_at = now(), attempts = 5, last_error = $2 \
             WHERE exchange = $1 AND dead_at IS NULL AND published_at IS NULL",
            &[&exchange, &error],
        )
        .await
        .expect("kill");
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    outbox_tests::dispatch::count(db, sql).await
}
