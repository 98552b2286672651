#!/usr/bin/env bash
# Installs what tests/browser needs: `npm ci` from the committed
# package-lock.json into node_modules (git-ignored), and Debian's chromium
# when /usr/bin/chromium is missing; does nothing when both are in place.
# Output goes to stderr.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
{
  flock 9 # one install at a time (tests may start several runs at once)
  stamp="$here/node_modules/.package-lock.installed"
  command -v npm >/dev/null || "$here/../../examples/apt-install.sh" nodejs npm
  [ -x /usr/bin/chromium ] || "$here/../../examples/apt-install.sh" chromium
  if ! cmp -s "$here/package-lock.json" "$stamp"; then
    (cd "$here" && npm ci --no-audit --no-fund --loglevel=error)
    cp "$here/package-lock.json" "$stamp"
  fi
} 9<"$0" >&2
