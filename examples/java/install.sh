#!/usr/bin/env bash
# Installs what examples/java needs and compiles it; does nothing when done.
# The PostgreSQL JDBC driver comes from Debian (libpostgresql-jdbc-java, as
# /usr/share/java/postgresql.jar), the compiler is the machine's JDK: nothing
# is fetched from a Maven repository. Output goes to stderr.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
jar=/usr/share/java/postgresql.jar

apt_install() { # packages...
  local apt=(apt-get -o DPkg::Lock::Timeout=300 -y -q)
  [ "$(id -u)" = 0 ] || apt=(sudo "${apt[@]}")
  export DEBIAN_FRONTEND=noninteractive
  # A fresh machine's package lists may be missing or stale: update once, on failure.
  "${apt[@]}" install --no-install-recommends "$@" \
    || { "${apt[@]}" update && "${apt[@]}" install --no-install-recommends "$@"; }
}

{
  # One install at a time (tests may start several runs at once).
  flock 9
  if ! command -v javac >/dev/null; then
    apt_install default-jdk-headless
  fi
  if [ ! -f "$jar" ] || ! dpkg -s libpostgresql-jdbc-java >/dev/null 2>&1; then
    apt_install libpostgresql-jdbc-java
  fi
  class="$here/build/OrderService.class"
  if [ ! -f "$class" ] || [ "$here/src/OrderService.java" -nt "$class" ]; then
    mkdir -p "$here/build"
    javac -encoding UTF-8 -cp "$jar" -d "$here/build" "$here/src/OrderService.java"
  fi
} 9<"$0" >&2
