//! `outbox-relay console`: a web page and a JSON API (`/api/v1/`) over the
//! same operations as the command line, served from the binary (no CDN,
//! no build step). Read-only unless a token is set; every change needs it
//! as `Authorization: Bearer`, and is written to `outbox.admin_log` under
//! the token's name. Payloads and header values are hidden unless
//! `OUTBOX_CONSOLE_SHOW_PAYLOADS` allows them.

mod api;
mod assets;
mod auth;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Bulk;
use crate::cli::{DatabaseArgs, check_schema};
use outbox_service::db::{self, PgTarget};

pub use auth::Token;

#[derive(Debug, Args)]
pub struct ConsoleArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Where to serve the console and its API. Beyond 127.0.0.1 is your choice: anyone who reaches it can read the outbox.
    #[arg(long, env = "OUTBOX_CONSOLE_ADDR", default_value = "127.0.0.1:8089")]
    pub addr: SocketAddr,

    /// The bearer token every change needs (at least 16 characters); unset or empty, the console is read-only.
    #[arg(long, env = "OUTBOX_CONSOLE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Who the token is, in the audit trail (outbox.admin_log).
    #[arg(long, env = "OUTBOX_CONSOLE_TOKEN_NAME", default_value = "console")]
    pub token_name: String,

    /// A file of named tokens, one `name:secret` a line, one per person: each change is logged under its token's name.
    #[arg(long, env = "OUTBOX_CONSOLE_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,

    /// Show payloads and header values (they may hold personal data).
    #[arg(long, env = "OUTBOX_CONSOLE_SHOW_PAYLOADS", default_value_t = false, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub show_payloads: bool,

    /// PostgreSQL URL of a consumer's database, for the reconcile page.
    #[arg(long, env = "OUTBOX_CONSOLE_INBOX_URL", hide_env_values = true)]
    pub inbox_database_url: Option<String>,

    /// PEM file of the CA that signed the consumer database's certificate.
    #[arg(long, env = "OUTBOX_CONSOLE_INBOX_CA_FILE")]
    pub inbox_database_ca_file: Option<PathBuf>,

    /// The consumer's inbox table, with a `message_id uuid` column.
    #[arg(
        long,
        env = "OUTBOX_CONSOLE_INBOX_TABLE",
        default_value = "dispatch.inbox"
    )]
    pub inbox_table: String,

    /// Rows per statement of a bulk change.
    #[arg(long, env = "OUTBOX_CONSOLE_BULK_BATCH", default_value_t = 1_000, value_parser = clap::value_parser!(i64).range(1..=100_000))]
    pub bulk_batch: i64,

    /// Rows a bulk change touches per second at most, so relays keep claiming; 0: no limit.
    #[arg(long, env = "OUTBOX_CONSOLE_BULK_RATE", default_value_t = 5_000.0, value_parser = crate::cli::rate)]
    pub bulk_rate: f64,
}

/// What every request shares.
pub(crate) struct Console {
    pub pool: Pool,
    pub database: String,
    /// Who may change anything; none: read-only.
    pub tokens: Vec<Token>,
    pub show_payloads: bool,
    pub inbox: Option<(PgTarget, String)>,
    pub bulk: Bulk,
    /// Changes under way, each in a task of its own.
    pub changes: TaskTracker,
    /// Bound to loopback: only requests naming this machine are answered.
    pub local_only: bool,
}

/// `OUTBOX_CONSOLE_TOKEN` (empty is unset, as compose's
/// `${OUTBOX_CONSOLE_TOKEN:-}` gives it) and the tokens file's, their
/// names unique.
fn tokens(args: &ConsoleArgs) -> anyhow::Result<Vec<Token>> {
    let mut tokens = match &args.tokens_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| {
                format!("cannot read OUTBOX_CONSOLE_TOKENS_FILE {}", path.display())
            })?;
            auth::parse_tokens(&text)?
        }
        None => Vec::new(),
    };
    if let Some(secret) = args.token.as_deref().filter(|secret| !secret.is_empty()) {
        let token = Token::new(&args.token_name, secret)?;
        if tokens.iter().any(|t| t.name() == token.name()) {
            anyhow::bail!(
                "OUTBOX_CONSOLE_TOKEN_NAME `{}` is also a name in OUTBOX_CONSOLE_TOKENS_FILE",
                token.name()
            );
        }
        tokens.push(token);
    }
    Ok(tokens)
}

/// Serves until `shutdown`; a bulk change under way finishes first.
pub async fn serve(args: ConsoleArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let tokens = tokens(&args)?;
    let target = args.database.target("outbox-relay console")?;
    // A change holds two (its statements, its audit row); reads one each.
    let pool = db::pool(&target, 8).await?;
    {
        let client = pool
            .get()
            .await
            .map_err(|e| anyhow::anyhow!(db::pool_error(&e)))?;
        check_schema(&client, &target).await?;
    }
    let inbox = match &args.inbox_database_url {
        Some(url) => Some((
            db::parse_url(url, args.inbox_database_ca_file.as_deref())?
                .named("outbox-relay console"),
            args.inbox_table.clone(),
        )),
        None => None,
    };
    if !args.addr.ip().is_loopback() {
        tracing::warn!(addr = %args.addr, "the console is reachable beyond this machine");
    }
    let console = Arc::new(Console {
        pool,
        database: target.describe(),
        tokens,
        show_payloads: args.show_payloads,
        inbox,
        bulk: Bulk {
            dry_run: false,
            batch: args.bulk_batch,
            rate: (args.bulk_rate > 0.0).then_some(args.bulk_rate),
        },
        changes: TaskTracker::new(),
        local_only: args.addr.ip().is_loopback(),
    });
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("cannot listen on {} (OUTBOX_CONSOLE_ADDR)", args.addr))?;
    let addr = listener.local_addr()?;
    tracing::info!(
        %addr,
        url = %format!("http://{addr}/"),
        read_only = console.tokens.is_empty(),
        tokens = console.tokens.len(),
        show_payloads = console.show_payloads,
        "console listening"
    );
    let served = axum::serve(listener, api::router(console.clone()))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .context("the console's server failed");
    // A change whose caller went away is still running: it finishes, and
    // writes its audit row, before the process exits.
    console.changes.close();
    console.changes.wait().await;
    served
}
