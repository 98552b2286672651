#!/usr/bin/env bash
# RabbitMQ 4.x and PostgreSQL 17 beside (never instead of) the shared
# servers on 5672 and 5432, from a Debian trixie root of the project's own,
# so the suite and the demo can run against the releases users run.
#
#   scripts/compat-servers.sh up      installs what is missing (debootstrap,
#                                     the trixie root, rabbitmq-server and
#                                     postgresql-17 in it), starts both, and
#                                     prints AMQP_URL=, POSTGRES_URL=,
#                                     RABBITMQ_VERSION= and COMPAT_ROOT=
#                                     lines; idempotent,
#                                     a few seconds when all is there
#   scripts/compat-servers.sh down    stops both (the root and data stay)
#   scripts/compat-servers.sh status  what runs
#   scripts/compat-servers.sh ctl ARGS rabbitmqctl ARGS on the compat broker
#                                     (what TEST_RABBITMQCTL names for tests)
#
#   eval "$(scripts/compat-servers.sh up)"
#   TEST_AMQP_URL=$AMQP_URL TEST_POSTGRES_URL=$POSTGRES_URL \
#     TEST_RABBITMQCTL="$RABBITMQCTL" cargo nextest run --workspace
#
# RabbitMQ listens on 127.0.0.1:5692 (no plugins, so no management port),
# with its own node name (compat@localhost), distribution port (25692),
# epmd (4371) and cookie, and denies the deprecated features RabbitMQ means
# to remove (transient non-exclusive queues, global QoS, RAM nodes), as
# later releases will by default. PostgreSQL listens on 127.0.0.1:5447,
# trust auth for `postgres`. The root lives in $COMPAT_ROOT (default
# /var/tmp/outbox-compat/trixie: about 350 MB). Must run as root.
set -euo pipefail

ROOT=${COMPAT_ROOT:-/var/tmp/outbox-compat/trixie}
MIRROR=${COMPAT_MIRROR:-http://deb.debian.org/debian}
AMQP_PORT=5692
DIST_PORT=25692
EPMD_PORT=4371
PG_PORT=5447
# Paths inside the root.
RABBIT_DIR=/var/lib/outbox-compat/rabbit
PG_DATA=/var/lib/outbox-compat/pg17
PG_BIN=/usr/lib/postgresql/17/bin

say() { echo "compat-servers: $*" >&2; }
die() { say "$*"; exit 1; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Runs a command in the root as `user`, with the root's own environment.
in_root() { # user command...
  local user=$1
  shift
  chroot --userspec="$user:$user" "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    HOME="$(chroot "$ROOT" getent passwd "$user" | cut -d: -f6)" LANG=C.UTF-8 "$@"
}

rabbit_env() {
  echo RABBITMQ_CONF_ENV_FILE=$RABBIT_DIR/rabbitmq-env.conf ERL_EPMD_PORT=$EPMD_PORT
}

mounted() { mountpoint -q "$ROOT/$1"; }

# The processes whose root directory is the trixie root.
in_root_pids() {
  local dir
  for dir in /proc/[0-9]*; do
    [[ $(readlink "$dir/root" 2>/dev/null) == "$ROOT" ]] && echo "${dir#/proc/}"
  done
  return 0
}

mount_system() {
  for fs in proc dev dev/shm; do
    mounted "$fs" && continue
    mkdir -p "$ROOT/$fs"
    case $fs in
      proc) mount -t proc proc "$ROOT/proc" ;;
      *) mount --bind "/$fs" "$ROOT/$fs" ;;
    esac
  done
}

install() {
  [[ $(id -u) == 0 ]] || die "must run as root (it installs packages and runs the servers as their users)"
  if ! command -v debootstrap >/dev/null; then
    say "installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null
  fi
  if [[ ! -x $ROOT/usr/bin/apt-get ]]; then
    say "debootstrap trixie into $ROOT (about 30 s)"
    mkdir -p "$ROOT"
    debootstrap --variant=minbase trixie "$ROOT" "$MIRROR" >/dev/null ||
      die "debootstrap failed; see $ROOT/debootstrap/debootstrap.log"
  fi
  mount_system
  if [[ ! -x $ROOT/usr/lib/rabbitmq/bin/rabbitmq-server || ! -x $ROOT$PG_BIN/initdb ]]; then
    say "installing rabbitmq-server and postgresql-17 in the root (about 30 s)"
    # No service starts inside the root at install time.
    printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
    chmod +x "$ROOT/usr/sbin/policy-rc.d"
    chroot "$ROOT" /usr/bin/env DEBIAN_FRONTEND=noninteractive sh -c \
      'apt-get update -q && apt-get install -y -q --no-install-recommends rabbitmq-server postgresql-17' \
      >/dev/null || die "installing the servers in the root failed"
  fi
}

rabbit_files() {
  local dir=$ROOT$RABBIT_DIR
  mkdir -p "$dir/mnesia" "$dir/log"
  cat >"$dir/rabbitmq.conf" <<EOF
listeners.tcp.local = 127.0.0.1:$AMQP_PORT
deprecated_features.permit.transient_nonexcl_queues = false
deprecated_features.permit.global_qos = false
deprecated_features.permit.ram_node_type = false
EOF
  echo '[].' >"$dir/enabled_plugins"
  cat >"$dir/rabbitmq-env.conf" <<EOF
NODENAME=compat@localhost
NODE_PORT=$AMQP_PORT
DIST_PORT=$DIST_PORT
CONFIG_FILE=$RABBIT_DIR/rabbitmq.conf
ENABLED_PLUGINS_FILE=$RABBIT_DIR/enabled_plugins
MNESIA_BASE=$RABBIT_DIR/mnesia
LOG_BASE=$RABBIT_DIR/log
PID_FILE=$RABBIT_DIR/pid
SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
EOF
  chroot "$ROOT" chown -R rabbitmq:rabbitmq "$RABBIT_DIR"
}

start_rabbit() {
  if port_open "$AMQP_PORT"; then return 0; fi
  rabbit_files
  rm -f "$ROOT$RABBIT_DIR/pid"
  say "starting RabbitMQ $(rabbit_version) on 127.0.0.1:$AMQP_PORT"
  # Every descriptor away from ours: a caller reading our output would
  # otherwise wait for the node to exit.
  # shellcheck disable=SC2046
  (exec setsid chroot --userspec=rabbitmq:rabbitmq "$ROOT" /usr/bin/env -i \
    PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/var/lib/rabbitmq LANG=C.UTF-8 $(rabbit_env) \
    /usr/lib/rabbitmq/bin/rabbitmq-server) >"$ROOT$RABBIT_DIR/log/startup.log" 2>&1 </dev/null &
  for _ in $(seq 1 240); do
    port_open "$AMQP_PORT" && return 0
    sleep 0.5
  done
  die "RabbitMQ did not start; see $ROOT$RABBIT_DIR/log"
}

rabbit_version() {
  chroot "$ROOT" dpkg-query -W -f='${Version}' rabbitmq-server | sed 's/-.*//'
}

start_pg() {
  if port_open "$PG_PORT"; then return 0; fi
  if [[ ! -f $ROOT$PG_DATA/PG_VERSION ]]; then
    mkdir -p "$ROOT$PG_DATA"
    chroot "$ROOT" chown postgres:postgres "$PG_DATA"
    in_root postgres "$PG_BIN/initdb" -D "$PG_DATA" -U postgres --auth=trust >/dev/null
  fi
  say "starting PostgreSQL $(in_root postgres "$PG_BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PG_PORT"
  in_root postgres "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_DATA/log" -w -t 60 \
    -o "-c port=$PG_PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=/tmp -c max_connections=300" \
    start >/dev/null || die "PostgreSQL did not start; see $ROOT$PG_DATA/log"
}

up() {
  install
  start_pg
  start_rabbit
  echo "AMQP_URL=amqp://guest:guest@127.0.0.1:$AMQP_PORT/%2f"
  echo "POSTGRES_URL=postgres://postgres@127.0.0.1:$PG_PORT/postgres"
  echo "RABBITMQ_VERSION=$(rabbit_version)"
  echo "POSTGRES_VERSION=$(in_root postgres "$PG_BIN/postgres" --version | awk '{print $3}')"
  echo "RABBITMQCTL='$(cd "$(dirname "$0")" && pwd)/compat-servers.sh ctl'"
  # For scripts/ha-cluster.sh (HA_ROOT): a cluster from the same root.
  echo "COMPAT_ROOT=$ROOT"
}

ctl() {
  # shellcheck disable=SC2046
  chroot --userspec=rabbitmq:rabbitmq "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/var/lib/rabbitmq LANG=C.UTF-8 $(rabbit_env) /usr/lib/rabbitmq/bin/rabbitmqctl -n compat@localhost "$@"
}

down() {
  [[ -d $ROOT ]] || return 0
  if port_open "$AMQP_PORT"; then
    ctl shutdown >/dev/null 2>&1 || true
    say "RabbitMQ stopped"
  fi
  if port_open "$PG_PORT"; then
    in_root postgres "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null || true
    say "PostgreSQL stopped"
  fi
  # Whatever still runs in the root (its epmd) goes, and is waited for:
  # its mounts cannot be undone before.
  local pid
  for pid in $(in_root_pids); do kill "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 50); do
    [[ -z $(in_root_pids) ]] && break
    sleep 0.1
  done
  for fs in dev/shm dev proc; do
    mounted "$fs" && umount "$ROOT/$fs"
  done
  return 0
}

status() {
  if port_open "$AMQP_PORT"; then echo "RabbitMQ $(rabbit_version) running on 127.0.0.1:$AMQP_PORT"; else echo "RabbitMQ down"; fi
  if port_open "$PG_PORT"; then echo "PostgreSQL 17 running on 127.0.0.1:$PG_PORT"; else echo "PostgreSQL 17 down"; fi
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  ctl) shift; ctl "$@" ;;
  *) die "usage: $0 up|down|status|ctl ARGS" ;;
esac
