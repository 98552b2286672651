//! Capture functions per table: never one rewriting another table's after a
//! restore, one for a partitioned table and all its partitions.

use outbox_tests::*;

use super::{capture_function, captured_as};

/// After a dump and restore, tables get new oids, so capture_<oid> may name
/// the function another table's trigger calls.
#[tokio::test]
async fn a_capture_never_rewrites_another_tables_function() {
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    client
        .batch_execute(
            "CREATE TABLE a (id int); CREATE TABLE b (id int); \
             SELECT outbox.capture('a', 'shop'); SELECT outbox.capture('b', 'shop')",
        )
        .await
        .expect("two captures");
    let (fa, fb) = (
        capture_function(&client, "a").await,
        capture_function(&client, "b").await,
    );
    // The oids swapped: each trigger calls the function named after the
    // other table.
    client
        .batch_execute(&format!(
            "ALTER FUNCTION {fa}() RENAME TO swapping; \
             ALTER FUNCTION {fb}() RENAME TO {name_a}; \
             ALTER FUNCTION outbox.swapping() RENAME TO {name_b}",
            name_a = fa.trim_start_matches("outbox."),
            name_b = fb.trim_start_matches("outbox."),
        ))
        .await
        .expect("rename as a restore would");
    client
        .batch_execute("SELECT outbox.capture('a', 'shop', routing_key => 'a.{op}')")
        .await
        .expect("change a's capture");
    assert_eq!(captured_as(&client, "b").await, "public.b", "b's untouched");
    assert_eq!(captured_as(&client, "a").await, "public.a");

    // Both triggers call one function: capturing b again separates them,
    // even with the same options, and removing b leaves a's in place.
    let fa = capture_function(&client, "a").await;
    client
        .batch_execute(&format!(
            "SELECT outbox.capture('b', 'shop', routing_key => 'a.{{op}}'); \
             CREATE OR REPLACE TRIGGER outbox_capture AFTER INSERT OR UPDATE OR DELETE ON b \
             FOR EACH ROW EXECUTE FUNCTION {fa}()"
        ))
        .await
        .expect("share a's function");
    let changed: bool = client
        .query_one(
            "SELECT outbox.capture('b', 'shop', routing_key => 'a.{op}')",
            &[],
        )
        .await
        .expect("capture b again")
        .get(0);
    assert!(changed, "b's trigger called a's function");
    assert_eq!(captured_as(&client, "b").await, "public.b");
    client
        .batch_execute(&format!(
            "CREATE OR REPLACE TRIGGER outbox_capture AFTER INSERT OR UPDATE OR DELETE ON b \
             FOR EACH ROW EXECUTE FUNCTION {fa}(); SELECT outbox.capture_remove('b')"
        ))
        .await
        .expect("remove b while it shares a's function");
    assert_eq!(
        captured_as(&client, "a").await,
        "public.a",
        "a's still there"
    );
}

/// A partitioned table's trigger is cloned onto its partitions, all
/// calling one function: that is one capture, not a function shared with
/// other tables. Capturing it again changes nothing, changing it leaves one
/// function, owned by the table's role, and it is listed once.
#[tokio::test]
async fn a_partitioned_table_is_one_capture_with_one_function() {
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    client
        .batch_execute(
            "CREATE TABLE p (id int) PARTITION BY RANGE (id); \
             CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (0) TO (100); \
             CREATE TABLE p2 PARTITION OF p FOR VALUES FROM (100) TO (200)",
        )
        .await
        .expect("a partitioned table");
    let capture = |routing_key: &'static str| {
        let client = &client;
        async move {
            client
                .query_one("SELECT outbox.capture('p', 'shop', $1)", &[&routing_key])
                .await
                .expect("capture")
                .get::<_, bool>(0)
        }
    };
    assert!(capture("{op}").await);
    assert!(!capture("{op}").await, "the same capture again");
    assert!(capture("p.{op}").await, "another routing key");
    let functions: Vec<String> = client
        .query(
            "SELECT p.proowner::regrole::text FROM pg_proc p \
             WHERE p.pronamespace = 'outbox'::regnamespace AND p.proname ~ '^capture_[0-9]'",
            &[],
        )
        .await
        .expect("functions")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(functions.len(), 1, "{functions:?}");
    assert!(functions[0].starts_with("outbox_capture_"), "{functions:?}");
    let listed: Vec<String> = client
        .query("SELECT source FROM outbox.captures", &[])
        .await
        .expect("captures")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(listed, ["public.p"]);
    assert_eq!(captured_as(&client, "p").await, "public.p");
}
