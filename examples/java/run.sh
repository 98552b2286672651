#!/usr/bin/env bash
# Enqueues one order the seed's way, in plain JDBC: run.sh [ORDER_ID] [--fail-after-enqueue]
# Needs DATABASE_URL (postgres://user@host:port/db) with the outbox schema installed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ -z "${DATABASE_URL:-}" ]; then
  echo "examples/java: DATABASE_URL is not set (e.g. postgres://postgres@127.0.0.1:5432/shop)" >&2
  exit 2
fi
"$here/install.sh"
exec java -cp "$here/build:/usr/share/java/postgresql.jar" OrderService "$@"
