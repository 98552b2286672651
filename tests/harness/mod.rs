//! Test harness: every test gets its own fresh database on the machine's
//! PostgreSQL (dropped when the test ends) and its own exchange and queue
//! names on RabbitMQ, so tests run in parallel and never share state.
//!
//! `TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`)
//! names a role that may create databases; `TEST_AMQP_URL` the broker.

pub mod books;
pub mod broker;
pub mod console;
pub mod dispatch;
pub mod http;
pub mod observe;
pub mod otlp;
pub mod pipeline;
pub mod proxy;
pub mod receivers;
pub mod relay;

use std::path::PathBuf;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls, Notification};
use uuid::Uuid;

pub fn admin_url() -> String {
    std::env::var("TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// `host:port` of the broker at [`amqp_url`]: what a proxy in front of it
/// forwards to.
pub fn amqp_addr() -> String {
    authority(&amqp_url(), 5672)
}

/// [`amqp_url`] through `proxy` (`host:port`) instead.
pub fn amqp_url_through(proxy: &str) -> String {
    amqp_url().replacen(&amqp_addr(), proxy, 1)
}

/// `host:port` of the PostgreSQL at [`admin_url`].
pub fn postgres_addr() -> String {
    authority(&admin_url(), 5432)
}

/// The `host:port` of a one-host URL (`scheme://user:pass@host:port/...`).
fn authority(url: &str, default_port: u16) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:{default_port}")
    }
}

/// Where a test's servers are: the machine's shared PostgreSQL and
/// RabbitMQ, or the cluster `scripts/ha-cluster.sh` starts (tests/faults/ha.rs).
#[derive(Debug, Clone)]
pub struct Servers {
    /// A role that may create databases, on the database the URL names.
    pub admin_url: String,
    /// One AMQP URL, or the comma-separated nodes of one cluster.
    pub amqp_url: String,
    /// Queues are declared as quorum queues (replicated over the cluster).
    pub quorum_queues: bool,
}

impl Servers {
    pub fn shared() -> Servers {
        Servers {
            admin_url: admin_url(),
            amqp_url: amqp_url(),
            quorum_queues: false,
        }
    }
}

/// A name no other test uses, e.g. for an exchange or a queue.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}_{}", Uuid::new_v4().simple())
}

/// A database that exists for one test.
pub struct TestDb {
    pub name: String,
    pub url: String,
    /// The admin URL it was created with, to drop it.
    admin: String,
}

impl TestDb {
    /// Creates an empty database.
    pub async fn empty() -> TestDb {
        TestDb::empty_on(&admin_url()).await
    }

    /// Creates an empty database where `admin` (see [`Servers::admin_url`]) connects.
    pub async fn empty_on(admin: &str) -> TestDb {
        let name = unique_name("outbox_test");
        connect(admin)
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        let url = outbox_service::db::with_dbname(admin, &name);
        TestDb {
            name,
            url,
            admin: admin.to_string(),
        }
    }

    /// Creates a database with the outbox schema installed.
    pub async fn with_outbox() -> TestDb {
        let db = TestDb::empty().await;
        let mut client = db.connect().await;
        outbox::migrate(&mut client).await.expect("migrate outbox");
        db
    }

    pub async fn connect(&self) -> Client {
        connect(&self.url).await
    }

    /// Takes this database (only) away, as an outage would: new connections
    /// are refused and the open ones terminated (separate statements: in
    /// one implicit transaction, the terminated clients could reconnect
    /// before the ALTER commits).
    pub async fn refuse_connections(&self) {
        let name = &self.name;
        let admin = connect(&self.admin).await;
        admin
            .batch_execute(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"))
            .await
            .expect("refuse connections");
        admin
            .batch_execute(&format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
            ))
            .await
            .expect("terminate connections");
    }

    /// Ends [`TestDb::refuse_connections`].
    pub async fn allow_connections(&self) {
        connect(&self.admin)
            .await
            .batch_execute(&format!(
                "ALTER DATABASE {} ALLOW_CONNECTIONS true",
                self.name
            ))
            .await
            .expect("restore the database");
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let admin = self.admin.clone();
        run_in_thread(async move {
            let admin = connect(&admin).await;
            // Capture made a role per captured table (`outbox_capture_<database
            // oid>_<table oid>`): roles belong to the cluster, so drop this
            // database's once the database is gone.
            let roles: Vec<String> = admin
                .query(
                    "SELECT quote_ident(r.rolname) FROM pg_roles r, pg_database d \
                     WHERE d.datname = $1 AND r.rolname LIKE 'outbox\\_capture\\_' || d.oid || '\\_%'",
                    &[&name],
                )
                .await
                .map(|rows| rows.iter().map(|row| row.get(0)).collect())
                .unwrap_or_default();
            let _ = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await;
            for role in roles {
                let _ = admin
                    .batch_execute(&format!("DROP ROLE IF EXISTS {role}"))
                    .await;
            }
        });
    }
}

/// Runs `sql` and expects PostgreSQL to refuse it for lack of privilege.
pub async fn refused(client: &Client, sql: &str) {
    let error = client
        .batch_execute(sql)
        .await
        .err()
        .unwrap_or_else(|| panic!("`{sql}` was allowed"));
    let code = error.code().map(|c| c.code().to_string());
    assert_eq!(code.as_deref(), Some("42501"), "`{sql}`: {error}");
}

/// A login role that exists for one test; declare it before the databases
/// it is granted on, so it is dropped after them.
pub struct TestRole {
    pub name: String,
}

impl TestRole {
    pub async fn create(prefix: &str) -> TestRole {
        let name = unique_name(prefix);
        connect(&admin_url())
            .await
            .batch_execute(&format!("CREATE ROLE {name} LOGIN PASSWORD 'test'"))
            .await
            .expect("create role");
        TestRole { name }
    }

    /// `db`'s URL with this role as the user.
    pub fn url(&self, db: &TestDb) -> String {
        let host_and_path = db
            .url
            .split_once('@')
            .map_or(db.url.as_str(), |(_, rest)| rest);
        format!("postgres://{}:test@{host_and_path}", self.name)
    }
}

impl Drop for TestRole {
    fn drop(&mut self) {
        cleanup(format!("DROP ROLE IF EXISTS {}", self.name));
    }
}

/// Runs `sql` as the admin from a `Drop`, ignoring failure. Drop runs
/// outside async code; a short-lived thread with its own runtime does the
/// cleanup without blocking the test's runtime.
pub fn cleanup(sql: String) {
    run_in_thread(async move {
        let admin = connect(&admin_url()).await;
        let _ = admin.batch_execute(&sql).await;
    });
}

/// Runs `work` to completion on a short-lived thread with its own runtime.
fn run_in_thread(work: impl std::future::Future<Output = ()> + Send + 'static) {
    let cleanup = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(work);
    });
    let _ = cleanup.join();
}

/// A connection whose driver runs on a background task.
pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    tokio::spawn(connection);
    client
}

/// A connection that LISTENs on `channel` and hands notifications to the
/// returned receiver (tokio-postgres only surfaces them via `poll_message`).
/// Like a relay, it announces itself, or writers would not notify.
pub async fn listen(url: &str, channel: &str) -> (Client, mpsc::UnboundedReceiver<Notification>) {
    let (client, receiver) = listen_silently(url, channel).await;
    client
        .batch_execute("SELECT outbox.announce_listener()")
        .await
        .expect("announce listener");
    (client, receiver)
}

/// LISTENs without announcing itself as a relay.
pub async fn listen_silently(
    url: &str,
    channel: &str,
) -> (Client, mpsc::UnboundedReceiver<Notification>) {
    let (client, mut connection) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("connect listener");
    let (sender, receiver) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(notification) = message {
                let _ = sender.send(notification);
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {channel}"))
        .await
        .expect("LISTEN");
    (client, receiver)
}

/// A binary of this workspace, built by `cargo test --workspace` next to
/// the test executable's `deps/` folder.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run the suite with `cargo test --workspace` (or scripts/test.sh)",
        path.display()
    );
    path
}
