//! `outbox-relay console` as a child process on a free port, and calls of
//! its JSON API with or without the token.

use serde_json::Value;
use tokio::process::Command;

use crate::http::request_with;
use crate::observe::{Logged, logged_address};
use crate::workspace_binary;

/// The token the tests' consoles take unless told otherwise.
pub const TOKEN: &str = "test-token-0123456789";

pub struct RunningConsole {
    pub process: Logged,
    pub addr: String,
}

impl RunningConsole {
    /// A console on `database_url` with `OUTBOX_CONSOLE_TOKEN` set to
    /// [`TOKEN`] (name `tester`), and `env` on top (an empty value unsets).
    pub async fn start(database_url: &str, env: &[(&str, &str)]) -> RunningConsole {
        let mut command = std::process::Command::new(workspace_binary("outbox-relay"));
        command
            .args(["console", "--log-format", "json"])
            .env("OUTBOX_DATABASE_URL", database_url)
            .env("OUTBOX_CONSOLE_ADDR", "127.0.0.1:0")
            .env("OUTBOX_CONSOLE_TOKEN", TOKEN)
            .env("OUTBOX_CONSOLE_TOKEN_NAME", "tester")
            .stdout(std::process::Stdio::null());
        for (name, value) in env {
            if value.is_empty() {
                command.env_remove(name);
            } else {
                command.env(name, value);
            }
        }
        let process = Logged::spawn(command);
        let addr = logged_address(&process, "console listening", "addr").await;
        RunningConsole { process, addr }
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// `GET path`: status and JSON body.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let (status, body) = request_with(&self.addr, "GET", path, &[], None).await;
        (status, parse(&body))
    }

    /// `POST path` with `body`, authorised by `token` when given.
    pub async fn post(&self, path: &str, token: Option<&str>, body: &Value) -> (u16, Value) {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = bearer
            .as_deref()
            .map(|b| vec![("Authorization", b)])
            .unwrap_or_default();
        let (status, body) =
            request_with(&self.addr, "POST", path, &headers, Some(&body.to_string())).await;
        (status, parse(&body))
    }
}

fn parse(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// `outbox-relay ARGS` with `env`, to check a command's one-line refusals.
pub async fn console_command(database_url: &str, env: &[(&str, &str)]) -> std::process::Output {
    Command::new(workspace_binary("outbox-relay"))
        .arg("console")
        .env("OUTBOX_DATABASE_URL", database_url)
        .env("OUTBOX_CONSOLE_ADDR", "127.0.0.1:0")
        .envs(env.iter().copied())
        .output()
        .await
        .expect("run outbox-relay console")
}
