//! Capture (`outbox.capture`, `outbox-relay capture add|list|remove`): an
//! app table's INSERTs, UPDATEs and DELETEs arrive through the real relay
//! and broker; rollbacks publish nothing; remove leaves the table as it was;
//! bad input fails in one clear line.
//!
//! Split by theme: `messages` (what a capture publishes), `command` (the
//! CLI: remove, bad input, missing rights), `rights` (table owners' code),
//! `functions` (one capture function per table).

use lapin::types::AMQPValue;
use outbox_tests::relay::{CommandOutput, relay_command};
use tokio_postgres::Client;

mod command;
mod functions;
mod messages;
mod rights;

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
