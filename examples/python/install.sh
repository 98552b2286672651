#!/usr/bin/env bash
# Installs what examples/python needs: a virtualenv in .venv (git-ignored)
# with requirements.txt from PyPI; does nothing when it is up to date.
# Output goes to stderr.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
{
  flock 9 # one install at a time (tests may start several runs at once)
  stamp="$here/.venv/requirements.installed"
  # Debian's own python3 needs python3-venv for `-m venv`.
  python3 -c 'import ensurepip, venv' 2>/dev/null || "$here/../apt-install.sh" python3-venv
  if ! cmp -s "$here/requirements.txt" "$stamp"; then
    rm -rf "$here/.venv"
    python3 -m venv "$here/.venv"
    "$here/.venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
    cp "$here/requirements.txt" "$stamp"
  fi
} 9<"$0" >&2
