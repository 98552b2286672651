//! `write-path`: the pgbench script does this job already, so run it from
//! the source checkout this binary was built from.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../scripts/write-path-bench.sh"
);

pub fn run(args: &[String]) -> anyhow::Result<ExitCode> {
    let script = Path::new(SCRIPT);
    if !script.exists() {
        bail!("{SCRIPT} is missing: write-path runs the script from the source checkout");
    }
    let status = std::process::Command::new("bash")
        .arg(script)
        .args(args)
        .status()
        .with_context(|| format!("cannot run {SCRIPT}"))?;
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}
