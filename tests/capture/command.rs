//! The `capture` command: remove leaves nothing behind, bad input and
//! missing rights fail in one clear line.

use outbox_tests::*;
use tokio_postgres::Client;

use super::{assert_fails_in_one_line, capture_cli, create_orders};

/// Names of the table's triggers and of every function in schema `outbox`.
async fn footprint(client: &Client) -> (Vec<String>, Vec<String>) {
    let triggers = client
        .query(
            "SELECT tgname::text FROM pg_trigger WHERE tgrelid = 'public.orders'::regclass \
             ORDER BY 1",
            &[],
        )
        .await
        .expect("triggers")
        .iter()
        .map(|row| row.get(0))
        .collect();
    let functions = client
        .query(
            "SELECT p.oid::regprocedure::text FROM pg_proc p \
             JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'outbox' ORDER BY 1",
            &[],
        )
        .await
        .expect("functions")
        .iter()
        .map(|row| row.get(0))
        .collect();
    (triggers, functions)
}

#[tokio::test]
async fn remove_leaves_no_trigger_or_function_behind() {
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    create_orders(&client).await;
    client
        .batch_execute(
            "CREATE FUNCTION public.touch() RETURNS trigger LANGUAGE plpgsql \
             AS $$ BEGIN RETURN NEW; END $$; \
             CREATE TRIGGER app_touch BEFORE UPDATE ON orders \
             FOR EACH ROW EXECUTE FUNCTION public.touch()",
        )
        .await
        .expect("the app's own trigger");
    let before = footprint(&client).await;

    let added = capture_cli(&db.url, &["add", "orders", "--exchange", "shop"]).await;
    added.expect_code(0);
    let during = footprint(&client).await;
    assert_eq!(during.0, ["app_touch", "outbox_capture"]);
    assert_eq!(during.1.len(), before.1.len() + 1, "one generated function");

    let removed = capture_cli(&db.url, &["remove", "orders"]).await;
    assert!(
        removed
            .expect_code(0)
            .contains("stopped capturing public.orders")
    );
    assert_eq!(footprint(&client).await, before, "exactly as it was");
    let again = capture_cli(&db.url, &["remove", "orders"]).await;
    assert!(again.expect_code(0).contains("was not captured"));

    client
        .batch_execute("INSERT INTO orders VALUES (1, 'zhang', 'noodles', 1)")
        .await
        .expect("insert after remove");
    let queued: i64 = client
        .query_one("SELECT count(*) FROM outbox.messages", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(queued, 0, "nothing captured after remove");
    let listed = capture_cli(&db.url, &["list"]).await;
    assert!(listed.expect_code(0).contains("no table is captured"));
}

#[tokio::test]
async fn bad_templates_and_options_fail_in_one_clear_line() {
    let db = TestDb::with_outbox().await;
    create_orders(&db.connect().await).await;
    let cases: [(&[&str], &str); 5] = [
        (
            &["--routing-key", "orders.{nope}"],
            "table orders has no column \"nope\"",
        ),
        (&["--routing-key", "orders.{op"], "has an unmatched \"{\""),
        (&["--ordering-key", "id"], "names no column"),
        (&["--columns", "id,secret"], "has no column \"secret\""),
        (&[], "relation \"missing\" does not exist"),
    ];
    for (extra, expected) in cases {
        let table = if extra.is_empty() {
            "missing"
        } else {
            "orders"
        };
        let mut args = vec!["add", table, "--exchange", "shop"];
        args.extend_from_slice(extra);
        assert_fails_in_one_line(&capture_cli(&db.url, &args).await, expected);
    }
    let client = db.connect().await;
    let error = client
        .query_one(
            "SELECT outbox.capture('orders', 'shop', operations => '{insert,upsert}')",
            &[],
        )
        .await
        .expect_err("an unknown operation");
    assert!(
        outbox::error_line(&error)
            .contains("operations must be some of insert, update, delete (got insert, upsert)"),
        "{error:?}"
    );
    let triggers: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'orders'::regclass",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(triggers, 0, "a rejected capture attaches nothing");
}

#[tokio::test]
async fn capturing_a_table_the_role_cannot_read_fails_clearly() {
    // Declared before the database, so it is dropped after it.
    let role = TestRole::create("capture_weak").await;
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    create_orders(&client).await;
    client
        .batch_execute(&format!("GRANT USAGE ON SCHEMA outbox TO {}", role.name))
        .await
        .expect("grant");

    let output = capture_cli(&role.url(&db), &["add", "orders", "--exchange", "shop"]).await;
    assert_fails_in_one_line(
        &output,
        &format!(
            "role {} cannot read table orders (it needs SELECT and TRIGGER",
            role.name
        ),
    );
}

/// An outbox owner without CREATEROLE cannot make the table's role: capture
/// says in one line what an admin runs, and works once the admin did.
#[tokio::test]
async fn capture_without_createrole_says_what_an_admin_runs() {
    let owner = TestRole::create("capture_plain").await;
    let db = TestDb::empty().await;
    let admin = db.connect().await;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} OWNER TO {}",
            db.name, owner.name
        ))
        .await
        .expect("the owner's database");
    let mut as_owner = connect(&owner.url(&db)).await;
    outbox::migrate(&mut as_owner)
        .await
        .expect("migrate as the owner");
    create_orders(&as_owner).await;

    let output = capture_cli(&owner.url(&db), &["add", "orders", "--exchange", "shop"]).await;
    assert_fails_in_one_line(&output, "which role");
    let role = output
        .stderr
        .split("CREATE ROLE ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the role to create")
        .to_string();
    assert!(role.starts_with("outbox_capture_"), "{}", output.stderr);
    assert!(
        output
            .stderr
            .contains(&format!("GRANT {role} TO {}", owner.name)),
        "{}",
        output.stderr
    );

    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} NOLOGIN; GRANT {role} TO {}",
            owner.name
        ))
        .await
        .expect("the admin's step");
    capture_cli(&owner.url(&db), &["add", "orders", "--exchange", "shop"])
        .await
        .expect_code(0);
    as_owner
        .batch_execute("INSERT INTO orders VALUES (1, 'zhang', 'noodles', 1)")
        .await
        .expect("a captured write");
    let ran_as: String = admin
        .query_one(
            "SELECT p.proowner::regrole::text FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid \
             WHERE t.tgrelid = 'orders'::regclass",
            &[],
        )
        .await
        .expect("the function's owner")
        .get(0);
    assert_eq!(ran_as, role);
    capture_cli(&owner.url(&db), &["remove", "orders"])
        .await
        .expect_code(0);
}
