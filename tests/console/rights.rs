//! The console's least-privilege role (`outbox.grant_console`): it reads
//! the outbox and changes delivery state as the operator commands do, its
//! changes are traced to it in `outbox.admin_log`, and nobody but the
//! owner may rewrite that trail.

use outbox_tests::console::{RunningConsole, TOKEN};
use outbox_tests::*;
use serde_json::json;

use super::{count, dead_letters};

#[tokio::test]
async fn the_console_works_under_its_own_role_which_may_not_rewrite_the_trail() {
    let console_role = TestRole::create("console").await;
    let relay_role = TestRole::create("relay").await;
    let db = TestDb::with_outbox().await;
    let owner = db.connect().await;
    owner
        .batch_execute(&format!(
            "CREATE TABLE public.orders (id bigint PRIMARY KEY); \
             SELECT outbox.grant_console('{c}'); SELECT outbox.grant_console('{c}'); \
             SELECT outbox.grant_relay('{r}')",
            c = console_role.name,
            r = relay_role.name
        ))
        .await
        .expect("grant (twice: idempotent)");
    let exchange = unique_name("x");
    dead_letters(&owner, &exchange, 6, "NOT_FOUND - no exchange").await;
    owner
        .batch_execute(&format!(
            "SELECT outbox.enqueue('{exchange}', 'rk', '{{}}'); \
             UPDATE outbox.messages SET published_at = now() WHERE dead_at IS NULL"
        ))
        .await
        .expect("a published row");

    let console = RunningConsole::start(&console_role.url(&db), &[]).await;
    let (status, overview) = console.get("/api/v1/overview").await;
    assert_eq!(status, 200, "{overview}");
    assert_eq!(overview["dead"], 6, "{overview}");
    let dead: Vec<i64> = owner
        .query(
            "SELECT id FROM outbox.dead_letters ORDER BY id LIMIT 3",
            &[],
        )
        .await
        .expect("dead ids")
        .iter()
        .map(|row| row.get(0))
        .collect();
    for (path, filter) in [
        (
            "/api/v1/dead-letters/requeue",
            json!({"ids": [dead[0], dead[1]]}),
        ),
        ("/api/v1/dead-letters/discard", json!({"ids": [dead[2]]})),
        (
            "/api/v1/replay",
            json!({"exchange": exchange, "since": "1h"}),
        ),
    ] {
        for dry_run in [true, false] {
            let (status, outcome) = console
                .post(
                    path,
                    Some(TOKEN),
                    &json!({"filter": filter, "dry_run": dry_run}),
                )
                .await;
            assert_eq!(status, 200, "{path}: {outcome}");
            if !dry_run {
                assert!(outcome["changed"].as_i64() >= Some(1), "{path}: {outcome}");
            }
        }
    }
    for path in [
        "/api/v1/blocked-keys",
        "/api/v1/scheduled",
        "/api/v1/captures",
        "/api/v1/lag",
    ] {
        let (status, body) = console.get(path).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox.dead_letters").await,
        3
    );
    let traced = count(
        &db,
        &format!(
            "SELECT count(*) FROM outbox.admin_log WHERE db_role = '{}' AND actor = 'tester'",
            console_role.name
        ),
    )
    .await;
    assert_eq!(traced, 6, "three actions, each a dry run and a change");

    // Nothing beyond delivery state, and no rewriting of the trail.
    let as_console = connect(&console_role.url(&db)).await;
    refused(&as_console, "SELECT * FROM public.orders").await;
    refused(
        &as_console,
        "INSERT INTO outbox.messages (exchange, routing_key, payload) VALUES ('x', '', '')",
    )
    .await;
    refused(&as_console, "UPDATE outbox.messages SET payload = ''").await;
    refused(&as_console, "UPDATE outbox.admin_log SET actor = 'nobody'").await;
    refused(&as_console, "DELETE FROM outbox.admin_log").await;
    // The relay's role runs the operator commands: it adds to the trail,
    // and may not rewrite it either.
    let as_relay = connect(&relay_role.url(&db)).await;
    as_relay
        .batch_execute(
            "INSERT INTO outbox.admin_log (actor, via, action, dry_run) \
             VALUES ('ops', 'cli', 'requeue', true)",
        )
        .await
        .expect("the relay's role writes the trail");
    refused(&as_relay, "UPDATE outbox.admin_log SET actor = 'nobody'").await;
    refused(&as_relay, "DELETE FROM outbox.admin_log").await;
    refused(&as_relay, "TRUNCATE outbox.admin_log").await;
}

#[tokio::test]
async fn a_role_that_may_not_write_the_trail_changes_nothing() {
    let reader = TestRole::create("reader").await;
    let db = TestDb::with_outbox().await;
    let owner = db.connect().await;
    owner
        .batch_execute(&format!(
            "GRANT USAGE ON SCHEMA outbox TO {r}; \
             GRANT SELECT, UPDATE, DELETE ON outbox.messages TO {r}; \
             GRANT SELECT ON ALL TABLES IN SCHEMA outbox TO {r}; \
             REVOKE INSERT ON outbox.admin_log FROM {r}",
            r = reader.name
        ))
        .await
        .expect("grant");
    let exchange = unique_name("x");
    dead_letters(&owner, &exchange, 2, "NOT_FOUND - no exchange").await;
    let console = RunningConsole::start(&reader.url(&db), &[]).await;
    let (status, body) = console
        .post(
            "/api/v1/dead-letters/requeue",
            Some(TOKEN),
            &json!({"dry_run": false}),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("grant_console")),
        "{body}"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox.dead_letters").await,
        2
    );
}
