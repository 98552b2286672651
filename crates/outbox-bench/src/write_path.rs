//! `write-path`: what the application's order + enqueue transaction pays for
//! the wake-up trigger. pgbench does the measuring, driven by
//! `scripts/write-path-bench.sh` from the source checkout this binary was
//! built from (interleaved pairs: no trigger, our trigger, and a naive
//! per-row `pg_notify` trigger), with the real relay binary built next to
//! this one draining the whole time.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};

use crate::cli::WritePathArgs;

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../scripts/write-path-bench.sh"
);

pub fn run(args: &WritePathArgs) -> anyhow::Result<ExitCode> {
    let script = Path::new(SCRIPT);
    if !script.exists() {
        bail!("{SCRIPT} is missing: write-path runs the script from the source checkout");
    }
    let mut command = std::process::Command::new("bash");
    command
        .arg(script)
        .args(["--clients", &args.clients.to_string()])
        .args(["--seconds", &args.duration.to_string()])
        .args(["--pairs", &args.pairs.to_string()])
        .arg("--naive");
    if !args.stand_in {
        let exe = std::env::current_exe().context("cannot locate this executable")?;
        let relay = exe.with_file_name("outbox-relay");
        if !relay.exists() {
            bail!(
                "{} is missing: build every binary first (cargo build --release --workspace --bins), or pass --stand-in",
                relay.display()
            );
        }
        command.args(["--relay", &format!("'{}' run", relay.display())]);
    }
    if let Some(json) = &args.json_file {
        command.arg("--json").arg(json);
    }
    command.args(&args.script_args);
    let status = command
        .status()
        .with_context(|| format!("cannot run {SCRIPT}"))?;
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}
