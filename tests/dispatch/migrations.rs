//! The dispatch migrations and the `dispatch migrate` binary.

use std::process::Command;

use outbox_tests::*;

#[tokio::test]
async fn dispatch_migrations_apply_twice() {
    let db = TestDb::empty().await;
    let mut client = db.connect().await;
    let first = ::dispatch::migrate(&mut client).await.expect("first");
    assert_eq!(first, ["V1__dispatch", "V3__roles", "V4__inbox_keys"]);
    let second = ::dispatch::migrate(&mut client).await.expect("second");
    assert!(second.is_empty(), "second run applied {second:?}");
    let tables: Vec<String> = client
        .query_one(
            "SELECT array_agg(table_name::text ORDER BY table_name) \
             FROM information_schema.tables WHERE table_schema = 'dispatch'",
            &[],
        )
        .await
        .expect("tables")
        .get(0);
    assert_eq!(
        tables,
        ["deliveries", "inbox", "inbox_keys", "schema_history"]
    );
    let bad_status = client
        .execute(
            "INSERT INTO dispatch.deliveries (order_id, rider, status, message_id) \
             VALUES (1, 'r', 7, gen_random_uuid())",
            &[],
        )
        .await;
    assert!(bad_status.is_err(), "status 7 must be rejected");
}

fn dispatch_command(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = Command::new(workspace_binary("dispatch"));
    command.args(args);
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("run dispatch")
}

/// `dispatch migrate` is idempotent; bad settings fail in one line.
#[tokio::test]
async fn dispatch_binary_migrates_and_reports_bad_settings_in_one_line() {
    let db = TestDb::empty().await;
    let url = ("DISPATCH_DATABASE_URL", db.url.as_str());
    let first = dispatch_command(&["migrate"], &[url]);
    assert!(first.status.success(), "{first:?}");
    assert!(String::from_utf8_lossy(&first.stdout).contains("applied V1__dispatch"));
    let second = dispatch_command(&["migrate"], &[url]);
    assert!(String::from_utf8_lossy(&second.stdout).contains("up to date"));

    let unreachable = ("DISPATCH_DATABASE_URL", "postgres://u:s3cret@127.0.0.1:1/x");
    let cases: [(&[(&str, &str)], &str); 4] = [
        (&[], "DISPATCH_DATABASE_URL"),
        (
            &[url, ("DISPATCH_QUEUE_TYPE", "stream")],
            "DISPATCH_QUEUE_TYPE",
        ),
        (
            &[url, ("DISPATCH_PREFECH", "4")],
            "unknown setting DISPATCH_PREFECH",
        ),
        (&[unreachable], "cannot connect to PostgreSQL"),
    ];
    for (env, expected) in cases {
        let output = dispatch_command(&[], env);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{env:?} must fail");
        assert!(stderr.contains(expected), "{env:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        assert!(!stderr.contains("s3cret"), "password leaked: {stderr}");
    }
}
