//! Installing the schemas: refinery from Rust, the `outbox-relay migrate`
//! binary, and plain psql.

use std::process::Command;

use outbox_tests::*;

/// Every migration in `sql/outbox`, in version order (`V1__outbox`, ...):
/// what a fresh database gets.
fn outbox_migrations() -> Vec<String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../sql/outbox");
    let mut names: Vec<(u32, String)> = std::fs::read_dir(dir)
        .expect("read sql/outbox")
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            let stem = name.strip_suffix(".sql")?.to_string();
            let version = stem.strip_prefix('V')?.split_once("__")?.0.parse().ok()?;
            Some((version, stem))
        })
        .collect();
    names.sort();
    names.into_iter().map(|(_, stem)| stem).collect()
}

async fn outbox_tables(db: &TestDb) -> Vec<String> {
    let client = db.connect().await;
    client
        .query(
            "SELECT table_schema || '.' || table_name FROM information_schema.tables \
             WHERE table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1",
            &[],
        )
        .await
        .expect("list tables")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test]
async fn migrating_an_empty_database_twice_applies_once() {
    let db = TestDb::empty().await;
    let mut client = db.connect().await;

    let first = outbox::migrate(&mut client).await.expect("first migrate");
    assert_eq!(first, outbox_migrations());
    let second = outbox::migrate(&mut client).await.expect("second migrate");
    assert!(second.is_empty(), "second run applied {second:?}");

    // Everything we own lives in schema `outbox`; `public` stays untouched.
    assert_eq!(
        outbox_tables(&db).await,
        vec![
            "outbox.admin_log",
            "outbox.captures",
            "outbox.dead_letters",
            "outbox.key_sequences",
            "outbox.messages",
            "outbox.pending",
            "outbox.scheduled",
            "outbox.scheduled_messages",
            "outbox.schema_history"
        ]
    );
}

#[tokio::test]
async fn concurrent_migrations_both_succeed() {
    let db = TestDb::empty().await;
    let (mut a, mut b) = (db.connect().await, db.connect().await);
    let (ra, rb) = tokio::join!(outbox::migrate(&mut a), outbox::migrate(&mut b));
    let mut applied = [ra.expect("a"), rb.expect("b")];
    applied.sort();
    assert_eq!(applied, [vec![], outbox_migrations()]);
}

#[tokio::test]
async fn psql_installs_the_same_schema_and_migrate_then_adopts_it() {
    if Command::new("psql").arg("--version").output().is_err() {
        eprintln!("psql not installed: skipping");
        return;
    }
    let db = TestDb::empty().await;
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../sql/outbox");
    for _ in 0..2 {
        for migration in outbox_migrations() {
            let sql = format!("{dir}/{migration}.sql");
            let status = Command::new("psql")
                .args([&db.url, "-q", "-v", "ON_ERROR_STOP=1", "-f", &sql])
                .status()
                .expect("run psql");
            assert!(status.success(), "psql -f {sql} failed");
        }
    }
    let client = db.connect().await;
    let id: uuid::Uuid = client
        .query_one("SELECT outbox.enqueue('ex', 'rk', '{\"a\": 1}')", &[])
        .await
        .expect("enqueue after psql install")
        .get(0);
    drop(client);

    let mut client = db.connect().await;
    let applied = outbox::migrate(&mut client)
        .await
        .expect("migrate after psql");
    assert_eq!(applied, outbox_migrations());
    let kept: i64 = client
        .query_one(
            "SELECT count(*) FROM outbox.messages WHERE message_id = $1",
            &[&id],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        kept, 1,
        "migrate must keep rows written after a psql install"
    );
}

fn relay_migrate(url: &str) -> std::process::Output {
    Command::new(workspace_binary("outbox-relay"))
        .arg("migrate")
        .env("OUTBOX_DATABASE_URL", url)
        .output()
        .expect("run outbox-relay")
}

#[tokio::test]
async fn relay_migrate_binary_is_idempotent() {
    let db = TestDb::empty().await;
    let first = relay_migrate(&db.url);
    assert!(first.status.success(), "{first:?}");
    assert!(String::from_utf8_lossy(&first.stdout).contains("applied V1__outbox"));
    let second = relay_migrate(&db.url);
    assert!(second.status.success(), "{second:?}");
    assert!(String::from_utf8_lossy(&second.stdout).contains("up to date"));
}

/// Each failure is one line on stderr and a non-zero exit; no password leaks.
#[tokio::test]
async fn relay_migrate_reports_bad_input_in_one_line() {
    let db = TestDb::empty().await;
    let weak_role = unique_name("weak");
    let admin = connect(&admin_url()).await;
    admin
        .batch_execute(&format!("CREATE ROLE {weak_role} LOGIN"))
        .await
        .expect("create role");
    let unprivileged = db
        .url
        .replacen("://postgres@", &format!("://{weak_role}@"), 1);

    let cases = [
        (
            "postgres://app:s3cret@127.0.0.1:notaport/x",
            "invalid PostgreSQL URL",
        ),
        (
            "postgres://app:s3cret@127.0.0.1:1/x",
            "cannot connect to PostgreSQL",
        ),
        (unprivileged.as_str(), "permission denied"),
    ];
    for (url, expected) in cases {
        let output = relay_migrate(url);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{url} must fail");
        assert!(stderr.contains(expected), "{url}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        assert!(!stderr.contains("s3cret"), "password leaked: {stderr}");
    }
    admin
        .batch_execute(&format!("DROP ROLE {weak_role}"))
        .await
        .expect("drop role");
}

/// An install from before V7 (psql, files up to V6) with a writer granted
/// by V3's grant_writer and a table captured under V5's shared
/// outbox_capture: `outbox-relay migrate` leaves the writer unable to set
/// delivery state and the capture owned by a role of its table's own,
/// and both keep working.
#[tokio::test]
async fn migrate_makes_writers_and_captures_of_older_installs_safe() {
    if Command::new("psql").arg("--version").output().is_err() {
        eprintln!("psql not installed: skipping");
        return;
    }
    let writer_role = TestRole::create("writer").await;
    let db = TestDb::empty().await;
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../sql/outbox");
    for migration in outbox_migrations() {
        if migration.as_str() >= "V7" {
            break;
        }
        let sql = format!("{dir}/{migration}.sql");
        let status = Command::new("psql")
            .args([&db.url, "-q", "-v", "ON_ERROR_STOP=1", "-f", &sql])
            .status()
            .expect("run psql");
        assert!(status.success(), "psql -f {sql} failed");
    }
    let owner = db.connect().await;
    owner
        .batch_execute(&format!(
            "SELECT outbox.grant_writer('{}'); CREATE TABLE orders (id int); \
             SELECT outbox.capture('orders', 'shop', ordering_key => '{{id}}')",
            writer_role.name
        ))
        .await
        .expect("a writer and a capture as V6 made them");
    let function_owner = "SELECT p.proowner::regrole::text FROM pg_trigger t \
         JOIN pg_proc p ON p.oid = t.tgfoid WHERE t.tgrelid = 'orders'::regclass";
    let before: String = owner
        .query_one(function_owner, &[])
        .await
        .expect("owner")
        .get(0);
    assert_eq!(before, "outbox_capture");

    let migrated = relay_migrate(&db.url);
    assert!(migrated.status.success(), "{migrated:?}");

    let writer = connect(&writer_role.url(&db)).await;
    let error = writer
        .batch_execute(
            "INSERT INTO outbox.messages (exchange, payload, published_at) VALUES ('x', '', now())",
        )
        .await
        .expect_err("a writer sets published_at after migrate");
    assert_eq!(error.code().map(|c| c.code()), Some("42501"), "{error}");
    writer
        .batch_execute(
            "SELECT outbox.enqueue('x', '', '{}'); SELECT outbox.enqueue('x', '', '{}', '{}', 'k')",
        )
        .await
        .expect("the writer still enqueues");

    let after: String = owner
        .query_one(function_owner, &[])
        .await
        .expect("owner")
        .get(0);
    assert!(
        after.starts_with("outbox_capture_"),
        "the capture still runs as {after}"
    );
    let shared_insert: bool = owner
        .query_one(
            "SELECT has_table_privilege('outbox_capture', 'outbox.messages', 'INSERT')",
            &[],
        )
        .await
        .expect("privilege")
        .get(0);
    assert!(!shared_insert, "outbox_capture keeps table-level INSERT");
    owner
        .batch_execute("INSERT INTO orders VALUES (1)")
        .await
        .expect("a captured write");
    let captured: i64 = owner
        .query_one(
            "SELECT count(*) FROM outbox.messages WHERE headers ->> 'table' = 'public.orders'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(captured, 1, "the capture still captures");
    owner
        .batch_execute("SELECT outbox.capture_remove('orders')")
        .await
        .expect("remove");
    let left: i64 = owner
        .query_one(
            "SELECT count(*) FROM pg_roles WHERE rolname = $1",
            &[&after],
        )
        .await
        .expect("roles")
        .get(0);
    assert_eq!(left, 0, "capture_remove drops the table's role");
}
