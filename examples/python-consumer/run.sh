#!/usr/bin/env bash
# Consumes the outbox's messages into the consumer's own database, effectively
# once: run.sh [--exchange E] [--queue Q] [--max-messages N] [--idle-exit-seconds S] ...
# (`run.sh --help` says the rest.) Needs DATABASE_URL: the consumer's database.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
"$here/install.sh"
exec "$here/.venv/bin/python" "$here/consumer.py" "$@"
