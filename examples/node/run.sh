#!/usr/bin/env bash
# Enqueues one order with the pg package: run.sh [ORDER_ID] [--fail-after-enqueue]
# Needs DATABASE_URL (postgres://user@host:port/db) with the outbox schema installed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ -z "${DATABASE_URL:-}" ]; then
  echo "examples/node: DATABASE_URL is not set (e.g. postgres://postgres@127.0.0.1:5432/shop)" >&2
  exit 2
fi
"$here/install.sh"
exec node "$here/order_service.js" "$@"
