#!/usr/bin/env bash
# Installs what examples/node needs: `npm ci` from the committed
# package-lock.json into node_modules (git-ignored); does nothing when it is
# up to date. Output goes to stderr.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
{
  flock 9 # one install at a time (tests may start several runs at once)
  stamp="$here/node_modules/.package-lock.installed"
  command -v npm >/dev/null || "$here/../apt-install.sh" nodejs npm
  if ! cmp -s "$here/package-lock.json" "$stamp"; then
    (cd "$here" && npm ci --no-audit --no-fund --loglevel=error)
    cp "$here/package-lock.json" "$stamp"
  fi
} 9<"$0" >&2
