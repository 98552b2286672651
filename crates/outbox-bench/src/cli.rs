//! Flags. Every measuring subcommand takes the same connection flags and
//! works in its own database, exchange and queue, so runs never share state.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "outbox-bench", version, about)]
/// Measures the outbox relay against the machine's PostgreSQL and RabbitMQ.
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Backlog drain: insert N rows with no relay running, start one relay
    /// and time it until every row is confirmed; then time a bare lapin
    /// publish-and-confirm loop of N messages for comparison.
    Drain(DrainArgs),
    /// Consumer drain: the relay drains a backlog of orders into the
    /// stopped dispatch consumer's queue, then the consumer is started and
    /// timed until every order is in its inbox: its rate beside the
    /// relay's, in the same run (and, with `--keys`, the key order kept).
    Consume(ConsumeArgs),
    /// Latency at a steady write rate: commit → consumer received, commit →
    /// delivery row committed by the dispatch consumer, and the relay's own
    /// enqueue → confirm, per wake-up mode and for a bare NOTIFY bridge.
    Latency(LatencyArgs),
    /// A long steady run with the relay and the dispatch consumer as child
    /// processes: lag (oldest pending age), their resident memory, and
    /// latency over time.
    Soak(SoakArgs),
    /// The write-path cost of the wake-up trigger: pgbench runs the order +
    /// enqueue transaction with no trigger, with ours (a relay draining)
    /// and with a naive per-row pg_notify trigger, in interleaved pairs.
    WritePath(WritePathArgs),
    /// Scheduled delivery: lateness (deliver_at → published) of rows
    /// falling due at a steady rate, and a drain of rows due now with and
    /// without a million rows scheduled for tomorrow beside them.
    Schedule(ScheduleArgs),
    /// An OTLP/HTTP endpoint that only counts what it is sent: with
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at it, the other commands
    /// measure the relay and the consumer exporting their spans.
    OtlpSink(OtlpSinkArgs),
}

#[derive(Debug, Args)]
pub struct OtlpSinkArgs {
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:4318")]
    pub addr: String,
    /// Seconds between two prints of the counts.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub every: u64,
}

#[derive(Debug, Args)]
pub struct ScheduleArgs {
    /// Rows scheduled for the lateness run.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub rows: u32,

    /// Rows falling due per second.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,

    /// How long after being written the first row falls due (ms).
    #[arg(long, default_value_t = 3000)]
    pub lead_ms: u64,

    /// Rows due now for the drain runs.
    #[arg(long, default_value_t = 50_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub backlog: u32,

    /// Rows scheduled for tomorrow beside the second drain.
    #[arg(long, default_value_t = 1_000_000)]
    pub future: u32,

    #[command(flatten)]
    pub common: Common,
}

/// Where to run and what to leave behind.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// PostgreSQL URL of a role that may create databases; each run creates
    /// its own database there and drops it at the end. Plain TCP by default,
    /// as for a relay next to its database and for the bench's own
    /// connections (which never use TLS); `sslmode=require` measures the
    /// relay and the consumer over TLS.
    #[arg(
        long,
        default_value = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
    )]
    pub postgres_url: String,

    /// RabbitMQ URL; each run declares its own exchange and queue.
    #[arg(long, default_value = outbox_service::amqp::DEFAULT_URL)]
    pub amqp_url: String,

    /// Keep the database, exchange and queue (the queue still expires after
    /// 5 idle minutes).
    #[arg(long)]
    pub keep: bool,

    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DrainArgs {
    /// Rows waiting in the outbox when the relay starts.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub backlog: u32,

    /// Publishes awaiting a confirm at once (the relay's max_in_flight, and
    /// the bare loop's window).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub window: u32,

    /// Rows the relay claims per query.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch: u32,

    /// Then drain a second backlog while another session holds the xmin
    /// horizon (an open REPEATABLE READ transaction, as a long report or a
    /// pg_dump would), and compare the rates per third of each backlog.
    #[arg(long)]
    pub hold_horizon: bool,

    /// Skip the bare lapin loop.
    #[arg(long)]
    pub no_bare: bool,

    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// Orders waiting in the outbox when the relay starts.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub backlog: u32,

    /// Rows carry an ordering key, one of this many (`customer-N`).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub keys: Option<u32>,

    /// The relay's max_in_flight.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub window: u32,

    /// Rows the relay claims per query.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch: u32,

    /// The relay's OUTBOX_KEY_PIPELINE: rows of a key published after its
    /// head without waiting for its confirm [default: the relay's].
    #[arg(long)]
    pub key_pipeline: Option<u32>,

    /// The consumer's DISPATCH_LANES [default: the consumer's].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub lanes: Option<u16>,

    /// The consumer's DISPATCH_BATCH_SIZE [default: the consumer's].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub batch_size: Option<u16>,

    /// The consumer's DISPATCH_PREFETCH [default: the consumer's].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: Option<u16>,

    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Args)]
pub struct LatencyArgs {
    /// Messages per second, all writers together.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,

    /// A sweep instead: at each of these rates (e.g. `20,200,500,1000,2000`)
    /// the relay in notify mode, then the bare bridge, with latency, CPU
    /// per message and the relay's claims side by side, and one plot of
    /// latency against rate.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["rate", "mode", "sweep_ms"])]
    pub rates: Vec<f64>,

    /// With `--rates`: relay then bridge this many times at each rate,
    /// each figure over all rounds (a slow moment of the machine is shared
    /// out instead of landing on one publisher).
    #[arg(long, default_value_t = 1, requires = "rates", value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,

    /// Seconds of writing per mode.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub duration: u64,

    /// Writer tasks, each with its own connection; each message is its own
    /// autocommit `SELECT outbox.enqueue(...)`.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub writers: u32,

    /// `all` runs the relay in notify mode, the bare NOTIFY → publish
    /// bridge, then the relay in poll mode with a 1000 ms and a 5000 ms sweep.
    #[arg(long, value_enum, default_value_t = ModeChoice::All)]
    pub mode: ModeChoice,

    /// The relay's sweep interval for `--mode notify|poll` [default: 1000].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub sweep_ms: Option<u64>,

    /// SVG of the latency percentiles; `-` for none.
    #[arg(long, default_value = "bench-results/latency.svg")]
    pub plot: PathBuf,

    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Args)]
pub struct SoakArgs {
    /// Messages per second, all writers together.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,

    /// Seconds of writing.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(2..))]
    pub duration: u64,

    /// Writer tasks, each with its own connection.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub writers: u32,

    /// Seconds per row of the printed timeline (the JSON and the plot have
    /// every second).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub every: u64,

    /// SVG of the timeline; `-` for none.
    #[arg(long, default_value = "bench-results/soak.svg")]
    pub plot: PathBuf,

    /// The relay's OUTBOX_RETENTION (e.g. `30s`): with a short one, a long
    /// run shows whether the table and its indexes stay bounded.
    #[arg(long)]
    pub retention: Option<String>,

    /// Run the relay alone: the bench's own queue is the end of the line
    /// (for a run longer or faster than the dispatch consumer keeps up with).
    #[arg(long)]
    pub no_dispatch: bool,

    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Args)]
pub struct WritePathArgs {
    /// pgbench clients.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub clients: u32,

    /// Seconds per run (each pair is two runs, plus the naive run).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub duration: u32,

    /// Interleaved pairs; the verdict is the median ratio.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub pairs: u32,

    /// Drain with the script's SQL stand-in instead of the real relay.
    #[arg(long)]
    pub stand_in: bool,

    /// Also write the summary as JSON to this file.
    #[arg(long = "json")]
    pub json_file: Option<PathBuf>,

    /// Passed on to scripts/write-path-bench.sh (after `--`; see its header).
    #[arg(last = true)]
    pub script_args: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeChoice {
    All,
    Notify,
    Poll,
    Bridge,
}
