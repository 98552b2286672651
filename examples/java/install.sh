#!/usr/bin/env bash
# Installs what examples/java needs and compiles it; does nothing when done.
# The PostgreSQL JDBC driver comes from Debian (libpostgresql-jdbc-java, as
# /usr/share/java/postgresql.jar), the compiler is the machine's JDK: nothing
# is fetched from a Maven repository. Output goes to stderr.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
jar=/usr/share/java/postgresql.jar

{
  # One install at a time (tests may start several runs at once).
  flock 9
  command -v javac >/dev/null || "$here/../apt-install.sh" default-jdk-headless
  "$here/../apt-install.sh" libpostgresql-jdbc-java
  class="$here/build/OrderService.class"
  if [ ! -f "$class" ] || [ "$here/src/OrderService.java" -nt "$class" ]; then
    mkdir -p "$here/build"
    javac -encoding UTF-8 -cp "$jar" -d "$here/build" "$here/src/OrderService.java"
  fi
} 9<"$0" >&2
