#!/usr/bin/env bash
# apt-install.sh PACKAGE...: installs Debian packages that are missing (as
# root, or through sudo). A fresh machine's package lists may be missing or
# stale, so on failure it runs `apt-get update` once and tries again.
set -euo pipefail
missing=()
for package in "$@"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0
apt=(apt-get -o DPkg::Lock::Timeout=300 -y -q)
[ "$(id -u)" = 0 ] || apt=(sudo "${apt[@]}")
export DEBIAN_FRONTEND=noninteractive
"${apt[@]}" install --no-install-recommends "${missing[@]}" \
  || { "${apt[@]}" update && "${apt[@]}" install --no-install-recommends "${missing[@]}"; }
