#!/usr/bin/env bash
# The one test command (README, CI): services up, then formatting, lints and
# the whole suite against the real PostgreSQL and RabbitMQ.
#
# Tests named `serial_*` disturb a shared server (they close every broker
# connection, say), so they run first, one at a time, before the others start.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh
# The examples' own dependencies (JDBC driver, venvs, node_modules): cached.
examples/install.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# Tests run the binaries (`workspace_binary`) and the consumer library's
# example; `cargo test` builds only the binaries of the package whose
# integration tests run, so build them all.
cargo build --workspace --bins --examples --locked
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast -E 'test(/serial_/)' \
    --test-threads 1 --no-tests pass
  cargo nextest run --workspace --locked --no-fail-fast -E 'not test(/serial_/)'
else
  cargo test --workspace --locked --no-fail-fast -- serial_ --test-threads 1
  cargo test --workspace --locked --no-fail-fast -- --skip serial_
fi
