//! Whose rights capture runs with: the app's role needs none on the outbox,
//! and a table owner's code cannot reach other captures or delivery state.

use outbox_tests::*;
use tokio_postgres::Client;

use super::{capture_function, captured_as, create_orders};

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
