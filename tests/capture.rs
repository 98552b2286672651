//! Capture (`outbox.capture`, `outbox-relay capture add|list|remove`): an
//! app table's INSERTs, UPDATEs and DELETEs arrive through the real relay
//! and broker; rollbacks publish nothing; remove leaves the table as it was;
//! bad input fails in one clear line.

use std::collections::HashMap;
use std::time::Duration;

use lapin::ExchangeKind;
use lapin::types::AMQPValue;
use outbox_tests::broker::Topology;
use outbox_tests::relay::{CommandOutput, RunningRelay, relay_command, test_settings};
use outbox_tests::*;
use serde_json::{Value, json};
use tokio_postgres::Client;

const ARRIVAL: Duration = Duration::from_secs(60);

/// `outbox-relay capture ARGS` on the database at `url`.
async fn capture_cli(url: &str, args: &[&str]) -> CommandOutput {
    let mut command = vec!["capture"];
    command.extend_from_slice(args);
    relay_command(url, &command).await
}

/// Fails unless the command failed with exactly one line on stderr that
/// contains `expected`.
fn assert_fails_in_one_line(output: &CommandOutput, expected: &str) {
    assert_ne!(output.code, Some(0), "must fail: {output:?}");
    let stderr = &output.stderr;
    assert!(
        stderr.contains(expected),
        "expected {expected:?} in: {stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
}

async fn create_orders(client: &Client) {
    client
        .batch_execute(
            "CREATE TABLE public.orders (id bigint PRIMARY KEY, user_name text, \
             context text, num int)",
        )
        .await
        .expect("create orders");
}

fn header(delivery: &lapin::message::Delivery, name: &str) -> String {
    let headers = delivery.properties.headers().as_ref().expect("headers");
    match headers.inner().get(name) {
        Some(AMQPValue::LongString(value)) => value.to_string(),
        other => panic!("header {name}: {other:?}"),
    }
}

#[tokio::test]
async fn captured_changes_arrive_with_routing_keys_payloads_and_per_row_order() {
    let db = TestDb::with_outbox().await;
    let mut client = db.connect().await;
    create_orders(&client).await;
    let topology = Topology::new(ExchangeKind::Topic, "orders.#").await;

    let add = |table| {
        [
            "add",
            table,
            "--exchange",
            &topology.exchange,
            "--routing-key",
            "orders.{op}.{user_name}",
            "--ordering-key",
            "order-{id}",
        ]
    };
    let added = capture_cli(&db.url, &add("orders")).await;
    assert!(added.expect_code(0).contains("capturing public.orders"));
    // The same capture again, the table named another way: nothing changes.
    let again = capture_cli(&db.url, &add("public.orders")).await;
    assert!(again.expect_code(0).contains("nothing changed"));
    let listed = capture_cli(&db.url, &["list"]).await;
    assert!(listed.expect_code(0).contains("public.orders"));
    assert!(listed.stdout.contains("order-{id}"), "{listed:?}");

    // A rolled-back change leaves no message.
    let tx = client.transaction().await.expect("begin");
    tx.execute("INSERT INTO orders VALUES (99, 'ghost', 'never', 9)", &[])
        .await
        .expect("insert");
    tx.rollback().await.expect("rollback");

    // Order 1 and 2 change in interleaved transactions, order 3 in one
    // statement with order 2's update.
    let statements = [
        "INSERT INTO orders VALUES (1, 'zhang', 'noodles', 1), (2, 'li', 'rice', 2)",
        "UPDATE orders SET num = 10 WHERE id = 1",
        "UPDATE orders SET num = 20 WHERE id = 2; INSERT INTO orders VALUES (3, 'wang', 'tea', 3)",
        "UPDATE orders SET num = 11 WHERE id = 1",
        "DELETE FROM orders WHERE id IN (1, 3)",
    ];
    for statement in statements {
        client.batch_execute(statement).await.expect("app write");
    }
    let queued: i64 = client
        .query_one("SELECT count(*) FROM outbox.messages", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        queued, 8,
        "one message per changed row, none for the rollback"
    );

    let relay = RunningRelay::start(test_settings(&db)).await;
    let mut deliveries = topology.receive(8, ARRIVAL).await;
    deliveries.extend(topology.receive(1, Duration::from_millis(500)).await);
    relay.stop().await;
    assert_eq!(
        deliveries.len(),
        8,
        "each change exactly once, nothing else"
    );

    let mut per_order: HashMap<i64, Vec<(String, Value)>> = HashMap::new();
    for delivery in &deliveries {
        assert_eq!(header(delivery, "table"), "public.orders");
        let operation = header(delivery, "operation");
        let body: Value = serde_json::from_slice(&delivery.data).expect("JSON body");
        let row = if operation == "update" {
            &body["new"]
        } else {
            &body
        };
        let id = row["id"].as_i64().expect("id");
        let user = row["user_name"].as_str().expect("user_name");
        assert_eq!(
            delivery.routing_key.as_str(),
            format!("orders.{operation}.{user}")
        );
        per_order.entry(id).or_default().push((operation, body));
    }
    let row = |id: i64, user: &str, context: &str, num: i64| json!({"id": id, "user_name": user, "context": context, "num": num});
    let change = |old: Value, new: Value| json!({"old": old, "new": new});
    assert_eq!(
        per_order[&1],
        vec![
            ("insert".into(), row(1, "zhang", "noodles", 1)),
            (
                "update".into(),
                change(
                    row(1, "zhang", "noodles", 1),
                    row(1, "zhang", "noodles", 10)
                )
            ),
            (
                "update".into(),
                change(
                    row(1, "zhang", "noodles", 10),
                    row(1, "zhang", "noodles", 11)
                )
            ),
            ("delete".into(), row(1, "zhang", "noodles", 11)),
        ]
    );
    assert_eq!(
        per_order[&2],
        vec![
            ("insert".into(), row(2, "li", "rice", 2)),
            (
                "update".into(),
                change(row(2, "li", "rice", 2), row(2, "li", "rice", 20))
            ),
        ]
    );
    assert_eq!(
        per_order[&3],
        vec![
            ("insert".into(), row(3, "wang", "tea", 3)),
            ("delete".into(), row(3, "wang", "tea", 3)),
        ]
    );
    let keys: Vec<String> = client
        .query(
            "SELECT DISTINCT ordering_key FROM outbox.messages ORDER BY 1",
            &[],
        )
        .await
        .expect("keys")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(keys, ["order-1", "order-2", "order-3"]);
}

#[tokio::test]
async fn chosen_operations_and_columns_shape_the_message() {
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    create_orders(&client).await;
    let changed: bool = client
        .query_one(
            "SELECT outbox.capture('orders', 'shop', '{schema}.{table}.{id}', \
             operations => '{delete,insert}', columns => '{id,num}')",
            &[],
        )
        .await
        .expect("capture")
        .get(0);
    assert!(changed);
    client
        .batch_execute(
            "INSERT INTO orders VALUES (7, 'zhang', 'noodles', 1); \
             UPDATE orders SET num = 2; DELETE FROM orders",
        )
        .await
        .expect("app writes");
    let rows: Vec<(String, String, Value, Value, Option<String>)> = client
        .query(
            "SELECT exchange, routing_key, convert_from(payload, 'UTF8')::jsonb, headers, \
                    ordering_key FROM outbox.messages ORDER BY id",
            &[],
        )
        .await
        .expect("messages")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    assert_eq!(
        rows,
        vec![
            (
                "shop".into(),
                "public.orders.7".into(),
                json!({"id": 7, "num": 1}),
                json!({"table": "public.orders", "operation": "insert"}),
                None
            ),
            (
                "shop".into(),
                "public.orders.7".into(),
                json!({"id": 7, "num": 2}),
                json!({"table": "public.orders", "operation": "delete"}),
                None
            ),
        ],
        "no update captured, only the chosen columns"
    );
}

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

#[tokio::test]
async fn the_apps_own_role_needs_no_rights_on_the_outbox() {
    let role = TestRole::create("capture_app").await;
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    create_orders(&client).await;
    client
        .batch_execute(&format!(
            "GRANT SELECT, INSERT, UPDATE ON orders TO {0}; \
             SELECT outbox.capture('orders', 'shop')",
            role.name
        ))
        .await
        .expect("grant and capture");

    let app = connect(&role.url(&db)).await;
    app.batch_execute(
        "INSERT INTO orders VALUES (1, 'zhang', 'noodles', 1); \
         UPDATE orders SET num = 2",
    )
    .await
    .expect("the app's writes work as before");
    app.query_one("SELECT count(*) FROM outbox.messages", &[])
        .await
        .expect_err("the app role cannot read the outbox");
    let queued: i64 = client
        .query_one("SELECT count(*) FROM outbox.messages", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(queued, 2, "its changes were captured");
}

/// The generated function runs with rights of its own: a table owner's
/// cast (run when the trigger turns a column into text) must not run as
/// the outbox's owner, but as a role of the table's own.
#[tokio::test]
async fn a_table_owners_cast_runs_without_the_outbox_owners_rights() {
    let owner = TestRole::create("capture_owner").await;
    let db = TestDb::with_outbox().await;
    let admin = db.connect().await;
    admin
        .batch_execute(&format!("CREATE SCHEMA shop AUTHORIZATION {}", owner.name))
        .await
        .expect("the owner's schema");
    let as_owner = connect(&owner.url(&db)).await;
    as_owner
        .batch_execute(
            "CREATE TYPE shop.tag AS (v int); \
             CREATE FUNCTION shop.tag_text(shop.tag) RETURNS text LANGUAGE sql \
             AS $$ SELECT current_user::text $$; \
             CREATE CAST (shop.tag AS text) WITH FUNCTION shop.tag_text(shop.tag); \
             CREATE TABLE shop.items (id int, tag shop.tag)",
        )
        .await
        .expect("a type with a cast of the owner's");
    admin
        .batch_execute("SELECT outbox.capture('shop.items', 'shop', routing_key => '{tag}')")
        .await
        .expect("capture");
    as_owner
        .batch_execute("INSERT INTO shop.items VALUES (1, ROW(1))")
        .await
        .expect("the owner's write");
    let ran_as: String = admin
        .query_one("SELECT routing_key FROM outbox.messages", &[])
        .await
        .expect("the message")
        .get(0);
    // The table's own role (V7), not the outbox owner, nor one shared by
    // every captured table (V5's outbox_capture).
    let table_role: String = admin
        .query_one(
            "SELECT format('outbox_capture_%s_%s', d.oid, 'shop.items'::regclass::oid) \
             FROM pg_database d WHERE d.datname = current_database()",
            &[],
        )
        .await
        .expect("the table's role")
        .get(0);
    assert_eq!(ran_as, table_role, "the cast ran as {ran_as}");
}

#[tokio::test]
async fn templates_may_contain_a_dollar_quote_tag() {
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    create_orders(&client).await;
    client
        .batch_execute(
            "SELECT outbox.capture('orders', 'shop', routing_key => 'o.$capture$.{op}', \
             ordering_key => '$capture$ {id}'); \
             INSERT INTO orders VALUES (1, 'zhang', 'noodles', 1)",
        )
        .await
        .expect("capture and write");
    let row = client
        .query_one("SELECT routing_key, ordering_key FROM outbox.messages", &[])
        .await
        .expect("the message");
    assert_eq!(row.get::<_, String>(0), "o.$capture$.insert");
    assert_eq!(row.get::<_, String>(1), "$capture$ 1");
}

/// The `table` header of the message a write to `table` queues.
async fn captured_as(client: &Client, table: &str) -> String {
    client
        .batch_execute(&format!(
            "DELETE FROM outbox.messages; INSERT INTO {table} VALUES (1)"
        ))
        .await
        .expect("write");
    client
        .query_one("SELECT headers ->> 'table' FROM outbox.messages", &[])
        .await
        .expect("one message")
        .get(0)
}

/// The name of the function `table`'s capture trigger calls.
async fn capture_function(client: &Client, table: &str) -> String {
    client
        .query_one(
            "SELECT tgfoid::regproc::text FROM pg_trigger \
             WHERE tgrelid = $1::text::regclass AND tgname = 'outbox_capture'",
            &[&table],
        )
        .await
        .expect("the trigger")
        .get(0)
}

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

/// `owner` (a role of its own) makes schema `schema` with a table
/// `schema.items (id int, tag schema.tag)` whose `tag` turns into text by
/// a cast of the owner's, so the owner's code runs inside the generated
/// function; the admin captures the table with the tag as routing key.
/// `body` is that code: PL/pgSQL returning text, which becomes the routing
/// key of the captured message.
async fn hostile_table(admin: &Client, owner: &TestRole, db: &TestDb, schema: &str, body: &str) {
    admin
        .batch_execute(&format!(
            "CREATE SCHEMA {schema} AUTHORIZATION {}",
            owner.name
        ))
        .await
        .expect("the owner's schema");
    connect(&owner.url(db))
        .await
        .batch_execute(&format!(
            "CREATE TYPE {schema}.tag AS (v int); \
             CREATE FUNCTION {schema}.tag_text({schema}.tag) RETURNS text LANGUAGE plpgsql \
             AS $body$ {body} $body$; \
             CREATE CAST ({schema}.tag AS text) WITH FUNCTION {schema}.tag_text({schema}.tag); \
             CREATE TABLE {schema}.items (id int, tag {schema}.tag)"
        ))
        .await
        .expect("a type with a cast of the owner's");
    admin
        .batch_execute(&format!(
            "SELECT outbox.capture('{schema}.items', 'shop', routing_key => '{{tag}}')"
        ))
        .await
        .expect("capture");
}

/// Code a table owner slips into its capture (a cast run inside the
/// generated function) runs with that function's owner's rights. Those
/// must not reach another table's capture: with one owner for every
/// capture function it could ALTER or DROP ... CASCADE them all.
#[tokio::test]
async fn a_table_owners_cast_cannot_touch_another_tables_capture() {
    let owner_a = TestRole::create("capture_a").await;
    let owner_b = TestRole::create("capture_b").await;
    let db = TestDb::with_outbox().await;
    let admin = db.connect().await;
    admin
        .batch_execute(&format!(
            "CREATE SCHEMA shop_b AUTHORIZATION {0}; \
             CREATE TABLE shop_b.items (id int); ALTER TABLE shop_b.items OWNER TO {0}; \
             SELECT outbox.capture('shop_b.items', 'shop')",
            owner_b.name
        ))
        .await
        .expect("b's captured table");
    let fb = capture_function(&admin, "shop_b.items").await;
    let attack = format!(
        "DECLARE verdict text := ''; \
         BEGIN \
             BEGIN ALTER FUNCTION {fb}() SECURITY INVOKER; verdict := verdict || 'altered '; \
             EXCEPTION WHEN OTHERS THEN verdict := verdict || 'alter ' || SQLSTATE || ' '; END; \
             BEGIN COMMENT ON FUNCTION {fb}() IS 'mine'; verdict := verdict || 'commented '; \
             EXCEPTION WHEN OTHERS THEN verdict := verdict || 'comment ' || SQLSTATE || ' '; END; \
             BEGIN DROP FUNCTION {fb}() CASCADE; verdict := verdict || 'dropped'; \
             EXCEPTION WHEN OTHERS THEN verdict := verdict || 'drop ' || SQLSTATE; END; \
             RETURN verdict; \
         END"
    );
    hostile_table(&admin, &owner_a, &db, "shop_a", &attack).await;

    connect(&owner_a.url(&db))
        .await
        .batch_execute("INSERT INTO shop_a.items VALUES (1, ROW(1))")
        .await
        .expect("a's write");
    let verdict: String = admin
        .query_one("SELECT routing_key FROM outbox.messages", &[])
        .await
        .expect("a's message")
        .get(0);
    assert_eq!(verdict, "alter 42501 comment 42501 drop 42501");
    assert_eq!(capture_function(&admin, "shop_b.items").await, fb);
    let listed: i64 = admin
        .query_one(
            "SELECT count(*) FROM outbox.captures WHERE source = 'shop_b.items'",
            &[],
        )
        .await
        .expect("captures")
        .get(0);
    assert_eq!(listed, 1, "b is still listed");
    assert_eq!(
        captured_as(&admin, "shop_b.items").await,
        "shop_b.items",
        "b's writes are still captured"
    );
}

/// The capture path cannot set delivery state either: code running as
/// the capture function's owner may insert a message, as the captured
/// write does, but not one already published, dead or leased.
#[tokio::test]
async fn a_table_owners_cast_cannot_insert_delivery_state() {
    let owner = TestRole::create("capture_state").await;
    let db = TestDb::with_outbox().await;
    let admin = db.connect().await;
    let attack = "DECLARE verdict text := ''; col text; \
         BEGIN \
             FOREACH col IN ARRAY '{published_at,dead_at,locked_until,next_attempt_at,replayed_at,created_at}'::text[] LOOP \
                 BEGIN \
                     EXECUTE format('INSERT INTO outbox.messages (exchange, payload, ordering_key, %I) \
                                     VALUES (''x'', '''', ''k'', ''infinity'')', col); \
                     verdict := verdict || col || ' '; \
                 EXCEPTION WHEN insufficient_privilege THEN NULL; END; \
             END LOOP; \
             INSERT INTO outbox.messages (exchange, payload) VALUES ('x', 'plain'); \
             RETURN 'set: ' || verdict; \
         END";
    hostile_table(&admin, &owner, &db, "shop", attack).await;
    connect(&owner.url(&db))
        .await
        .batch_execute("INSERT INTO shop.items VALUES (1, ROW(1))")
        .await
        .expect("the owner's write");
    let verdict: String = admin
        .query_one(
            "SELECT routing_key FROM outbox.messages WHERE exchange = 'shop'",
            &[],
        )
        .await
        .expect("the captured message")
        .get(0);
    assert_eq!(verdict, "set: ", "the capture path set delivery state");
    let rows: i64 = admin
        .query_one("SELECT count(*) FROM outbox.messages", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, 2, "the captured message and the cast's plain one");
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
