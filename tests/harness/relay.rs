//! Starting relays inside the test process (stopped through their
//! cancellation token) or as a child process (to kill them).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use outbox_relay::Settings;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::observe::{Logged, logged_address};
use crate::{TestDb, amqp_url, workspace_binary};

/// Settings for tests: fast sweeps and retries.
pub fn test_settings(db: &TestDb) -> Settings {
    Settings {
        database_url: Some(db.url.clone()),
        amqp_url: Some(amqp_url()),
        sweep_interval_ms: Some(200),
        retry_base_ms: Some(50),
        retry_max_ms: Some(400),
        lease_ms: Some(5_000),
        shutdown_timeout_ms: Some(5_000),
        // A free port each: tests run side by side.
        metrics_addr: Some("127.0.0.1:0".into()),
        ..Settings::default()
    }
}

/// A relay running in this process.
pub struct RunningRelay {
    pub shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl RunningRelay {
    pub async fn start(settings: Settings) -> RunningRelay {
        let config = settings.validate().expect("valid settings");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(outbox_relay::run(config, shutdown.clone()));
        RunningRelay { shutdown, task }
    }

    /// Cancels and waits for a clean exit.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("relay did not stop within 30 s")
            .expect("relay task panicked")
            .expect("relay failed");
    }
}

/// `outbox-relay run` as a child process, with `env` on top of the test settings.
pub fn spawn_relay_process(db: &TestDb, env: &[(&str, &str)]) -> Child {
    relay_run_command(db, env)
        .spawn()
        .expect("spawn outbox-relay")
}

/// The command [`spawn_relay_process`] runs, to adjust before spawning.
pub fn relay_run_command(db: &TestDb, env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(workspace_binary("outbox-relay"));
    command
        .arg("run")
        .env("OUTBOX_DATABASE_URL", &db.url)
        .env("OUTBOX_AMQP_URL", amqp_url())
        .env("OUTBOX_SWEEP_INTERVAL_MS", "200")
        .env("OUTBOX_METRICS_ADDR", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (name, value) in env {
        command.env(name, value);
    }
    command
}

/// A relay child process logging JSON, once it serves its ops endpoint;
/// returns it and the endpoint's address.
pub async fn start_logged_relay(db: &TestDb, env: &[(&str, &str)]) -> (Logged, String) {
    let mut command = relay_run_command(db, env);
    command.arg("--log-format").arg("json");
    let relay = Logged::spawn(command);
    let addr = logged_address(&relay, "serving /metrics, /healthz and /readyz", "addr").await;
    (relay, addr)
}

/// `outbox-relay ARGS` (an operator command) on the database at `url`.
pub async fn relay_command(url: &str, args: &[&str]) -> CommandOutput {
    let output = tokio::process::Command::new(workspace_binary("outbox-relay"))
        .args(args)
        .env("OUTBOX_DATABASE_URL", url)
        .output()
        .await
        .expect("run outbox-relay");
    CommandOutput {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// What a command printed and how it exited.
#[derive(Debug)]
pub struct CommandOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CommandOutput {
    /// Stdout, after checking the exit code.
    pub fn expect_code(&self, code: i32) -> &str {
        assert_eq!(self.code, Some(code), "{self:#?}");
        &self.stdout
    }
}
