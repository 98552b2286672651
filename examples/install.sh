#!/usr/bin/env bash
# Installs what every example needs (Debian's JDBC driver and the compiled
# Java example, the Python virtualenvs, node_modules), one after the other.
# Each step does nothing when it is already done. scripts/test.sh calls this
# before the suite, so the tests never wait on a download.
set -euo pipefail
cd "$(dirname "$0")"
for example in java python node python-consumer; do
  echo "examples: installing $example" >&2
  "$example/install.sh"
done
