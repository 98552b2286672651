#!/usr/bin/env bash
# The one test command (README, CI): services up, then formatting, lints and
# the whole suite against the real PostgreSQL and RabbitMQ.
#
# Tests named `serial_*` disturb a shared server (they close every broker
# connection, say), so they run first, one at a time, before the others start.
#
# Then the tests whose behaviour depends on the servers' releases run once
# more against RabbitMQ 4.x and PostgreSQL 17 (scripts/compat-servers.sh
# installs and starts them beside the shared servers, and stops them at the
# end): every test that talks to a server but the fault scenarios and the
# language examples (the relay, scheduled delivery, capture, the consumer
# library and dispatch, retries, wake-ups, migrations, roles, operator
# commands and the console's API and role, telemetry, alerts, and everything
# on quorum queues), and the HA
# scenario on a cluster of three 4.x nodes and a PostgreSQL 17 standby;
# about three minutes.
# OUTBOX_TEST_COMPAT=off skips that pass (a machine without root or
# without Debian's mirror).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh
# The examples' own dependencies (JDBC driver, venvs, node_modules): cached.
examples/install.sh
# The console's browser test: Debian's chromium and playwright-core (cached).
tests/browser/install.sh
# `docker-compose config` checks the docker stack's file (tests/docker.rs;
# no engine needed, none runs here).
command -v docker-compose >/dev/null || examples/apt-install.sh docker-compose ||
  echo "test.sh: docker-compose could not be installed; the stack's file goes unchecked" >&2
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

if [[ ${OUTBOX_TEST_COMPAT:-on} != off ]] && cargo nextest --version >/dev/null 2>&1; then
  compat=$(scripts/compat-servers.sh up)
  trap 'scripts/compat-servers.sh down >/dev/null' EXIT
  eval "$compat"
  echo "== again on RabbitMQ $RABBITMQ_VERSION and PostgreSQL $POSTGRES_VERSION"
  TEST_AMQP_URL=$AMQP_URL TEST_POSTGRES_URL=$POSTGRES_URL TEST_RABBITMQCTL=$RABBITMQCTL \
    cargo nextest run --workspace --locked --no-fail-fast -E '(
      test(/^relay::/) | test(/^schedule::/) | test(/^consumer_library::/) |
      test(/^dispatch::/) | test(/^retries::/) | test(/^wake::/) | test(/^migrate::/) |
      test(/^enqueue::/) | test(/^roles::/) | test(/^commands::/) | test(/^telemetry::/) |
      test(/^console::api::/) | test(/^console::rights::/) |
      test(/^capture::/) | test(/^orders::/) | test(/^secrets::/) | test(/^alerts::/) |
      test(/^consumer_example::/) | test(/quorum/)
    ) & not test(/serial_/)'
  # The HA scenario too: a three-node cluster and a standby from the same
  # root (scripts/ha-cluster.sh with HA_ROOT), after the shared pass.
  echo "== the HA scenario on a RabbitMQ $RABBITMQ_VERSION cluster and a PostgreSQL $POSTGRES_VERSION standby"
  HA_ROOT=$COMPAT_ROOT cargo nextest run --workspace --locked --no-fail-fast \
    -E 'test(/^faults::ha::serial_/)' --test-threads 1
fi
