#!/usr/bin/env bash
# A clustered RabbitMQ and a replicated PostgreSQL on this machine, beside
# (never instead of) the shared broker on 5672 and PostgreSQL on 5432, for
# the HA tests (tests/faults/ha.rs) and for trying failover by hand.
#
#   scripts/ha-cluster.sh up            3 RabbitMQ nodes ha1..ha3@localhost
#                                       (AMQP 127.0.0.1:5681-5683), PostgreSQL
#                                       primary on 5441, streaming standby on
#                                       5442; idempotent: restarts what is down
#   scripts/ha-cluster.sh down          stops and removes everything `up` made
#   scripts/ha-cluster.sh kill-rabbit N SIGKILLs node haN
#   scripts/ha-cluster.sh failover-pg   stops the primary hard, promotes the standby
#   scripts/ha-cluster.sh status        what runs
#   scripts/ha-cluster.sh save-logs DIR copies every server's log to DIR
#   scripts/ha-cluster.sh check         exit 0 when rabbitmq-server and initdb exist
#   scripts/ha-cluster.sh ctl ARGS      rabbitmqctl ARGS, as the nodes' user
#
# HA_ROOT=DIR runs all of it from a Debian root instead of the machine's
# binaries: the trixie root of scripts/compat-servers.sh (RabbitMQ 4.x,
# PostgreSQL 17; `compat-servers.sh up` installs it). The servers then run
# chrooted there, their files under DIR/var/lib/outbox-ha, the nodes on
# that root's epmd (port 4371) and Erlang cookie.
#
# Each RabbitMQ node has its own env file, config file (listener, no
# management plugin), data, log and pid file under $HA_STATE_DIR, and its
# own distribution port (25681-25683); they share the package's Erlang
# cookie and epmd with the shared broker, which nothing here touches.
# Replication is synchronous by default (the primary waits for the
# standby's flush, so a failover loses no acknowledged commit);
# HA_PG_REPLICATION=async at `up` makes it asynchronous (see
# docs/high-availability.md). Must run as root (it runs the servers as the
# rabbitmq and postgres users).
set -euo pipefail

ROOT=${HA_ROOT:-}
EPMD_PORT=
if [[ -n $ROOT ]]; then
  # Paths as the servers see them; the script reaches them through $ROOT.
  STATE=/var/lib/outbox-ha
  EPMD_PORT=4371
else
  STATE=${HA_STATE_DIR:-/tmp/outbox-ha}
fi
RABBIT_BIN=/usr/lib/rabbitmq/bin
PG_BIN=$(cd "$ROOT/" && ls -d usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
[[ -n $PG_BIN ]] && PG_BIN=/$PG_BIN
NODES=(1 2 3)
PRIMARY_PORT=5441
STANDBY_PORT=5442
# The standby's name as the primary sees it (its cluster_name).
STANDBY_NAME=ha_standby

say() { echo "ha-cluster: $*" >&2; }
die() { say "$*"; exit 1; }

node() { echo "ha$1@localhost"; }
amqp_port() { echo $((5680 + $1)); }
node_dir() { echo "$STATE/rabbit$1"; }

# A path as this script reaches it (inside the root, with HA_ROOT).
host() { echo "$ROOT$1"; }

as_user() { # user command...
  local user=$1
  shift
  if [[ -n $ROOT ]]; then
    chroot --userspec="$user:$user" "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
      HOME="$(chroot "$ROOT" getent passwd "$user" | cut -d: -f6)" LANG=C.UTF-8 \
      ERL_EPMD_PORT="$EPMD_PORT" "$@"
  else
    runuser -u "$user" -- env HOME="$(getent passwd "$user" | cut -d: -f6)" "$@"
  fi
}
as_rabbit() { as_user rabbitmq "$@"; }
as_postgres() { as_user postgres "$@"; }
ctl() { as_rabbit "$RABBIT_BIN/rabbitmqctl" "$@"; }
# Owned by a server's user as named where the server runs.
own() { # user path
  if [[ -n $ROOT ]]; then chroot "$ROOT" chown -R "$1:$1" "$2"; else chown -R "$1:$1" "$2"; fi
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The beam process of node N, if it runs (the pid must still be that node's).
rabbit_pid() {
  local file pid
  file="$(host "$(node_dir "$1")")/pid"
  [[ -f $file ]] || return 1
  pid=$(cat "$file")
  [[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
  # Started with this node's env file (the node name is not in argv).
  tr '\0' '\n' <"/proc/$pid/environ" |
    grep -qx "RABBITMQ_CONF_ENV_FILE=$(node_dir "$1")/rabbitmq-env.conf" || return 1
  echo "$pid"
}

check() {
  [[ -x $ROOT$RABBIT_BIN/rabbitmq-server ]] || { say "rabbitmq-server is not installed ($ROOT$RABBIT_BIN)"; return 3; }
  [[ -n $PG_BIN && -x $ROOT$PG_BIN/initdb ]] || { say "PostgreSQL's initdb is not installed ($ROOT/usr/lib/postgresql/*/bin)"; return 3; }
  [[ $(id -u) == 0 ]] || { say "must run as root (servers run as the rabbitmq and postgres users)"; return 1; }
  if [[ -n $ROOT ]] && ! mountpoint -q "$ROOT/proc"; then
    say "$ROOT has no /proc mounted: run scripts/compat-servers.sh up first"
    return 1
  fi
}

rabbit_files() { # N
  local dir port
  dir=$(node_dir "$1")
  port=$(amqp_port "$1")
  mkdir -p "$(host "$dir")/mnesia" "$(host "$dir")/log"
  # The package's rabbitmq.conf pins 5672; this node reads its own.
  cat >"$(host "$dir")/rabbitmq.conf" <<EOF
listeners.tcp.local = 127.0.0.1:$port
EOF
  if [[ -n $ROOT ]]; then
    # Not transient_nonexcl_queues, which the compat broker denies: with it
    # denied, RabbitMQ 4.0.5 refused to boot a node SIGKILLed under load
    # in 2 runs of 7 (failed_to_deny_deprecated_features), though every
    # queue of ours is durable (its detection, rabbitmq-server#12802).
    cat >>"$(host "$dir")/rabbitmq.conf" <<EOF
deprecated_features.permit.global_qos = false
EOF
  fi
  # No plugins: no management listener to collide with the shared 15672.
  echo '[].' >"$(host "$dir")/enabled_plugins"
  # Instead of /etc/rabbitmq/rabbitmq-env.conf, which names the shared node.
  cat >"$(host "$dir")/rabbitmq-env.conf" <<EOF
NODENAME=$(node "$1")
NODE_PORT=$port
DIST_PORT=$((25680 + $1))
CONFIG_FILE=$dir/rabbitmq.conf
ENABLED_PLUGINS_FILE=$dir/enabled_plugins
MNESIA_BASE=$dir/mnesia
LOG_BASE=$dir/log
PID_FILE=$dir/pid
SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
EOF
  own rabbitmq "$dir"
}

start_rabbit() { # N; returns at once, see wait_rabbit
  local dir
  dir=$(node_dir "$1")
  rabbit_pid "$1" >/dev/null && return 0
  rabbit_files "$1"
  rm -f "$(host "$dir")/pid"
  say "starting $(node "$1") on 127.0.0.1:$(amqp_port "$1")"
  # Every descriptor away from ours: a caller reading our output (a test)
  # would otherwise wait for the node to exit.
  (cd "$(host /var/lib/rabbitmq)" && as_rabbit setsid \
    env RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" "$RABBIT_BIN/rabbitmq-server") \
    >"$(host "$dir")/log/startup.log" 2>&1 </dev/null &
}

wait_rabbit() { # N
  local dir
  dir=$(node_dir "$1")
  # `wait` fails at once ({badrpc, nodedown}) while the node's runtime does
  # not answer yet, as a RabbitMQ 4.x node restarted under load may not:
  # asked again until it answers.
  for _ in $(seq 1 240); do
    if [[ -f $(host "$dir")/pid ]] &&
      ctl -n "$(node "$1")" wait "$dir/pid" --timeout 120 >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.5
  done
  die "$(node "$1") did not start; see $(host "$dir")/log"
}

join_rabbit() { # N: joins ha1's cluster once
  local dir
  dir=$(node_dir "$1")
  [[ -f $(host "$dir")/joined ]] && return 0
  ctl -n "$(node "$1")" stop_app >/dev/null
  ctl -n "$(node "$1")" join_cluster "$(node 1)" >/dev/null
  ctl -n "$(node "$1")" start_app >/dev/null
  touch "$(host "$dir")/joined"
  say "$(node "$1") joined $(node 1)"
}

pg_running() { as_postgres "$PG_BIN/pg_ctl" -D "$1" status >/dev/null 2>&1; }

pg_start() { # dir port extra-options
  local dir=$1 port=$2 options=$3
  pg_running "$dir" && return 0
  say "starting PostgreSQL $dir on 127.0.0.1:$port"
  as_postgres "$PG_BIN/pg_ctl" -D "$dir" -l "$STATE/pg/$(basename "$dir").log" -w -t 60 \
    -o "-c port=$port -c listen_addresses=127.0.0.1 -c unix_socket_directories=$STATE/pg $options" \
    start >/dev/null
}

in_recovery() { # port
  as_postgres "$PG_BIN/psql" -h 127.0.0.1 -p "$1" -U postgres -Atqc 'SELECT pg_is_in_recovery()' postgres
}

pg_up() {
  local primary=$STATE/pg/pg1 standby=$STATE/pg/pg2 names
  # Data, logs and sockets in one folder of the postgres user's.
  mkdir -p "$(host "$STATE/pg")"
  own postgres "$STATE/pg"
  if [[ ! -d $(host "$primary") ]]; then
    as_postgres "$PG_BIN/initdb" -D "$primary" -U postgres --auth=trust --no-sync >/dev/null
    echo "${HA_PG_REPLICATION:-sync}" >"$(host "$STATE/replication")"
  fi
  if [[ -d $(host "$standby") && ! -f $(host "$standby")/standby.signal ]]; then
    # Promoted: the old primary may not come back (it would be a second
    # primary). `down` then `up` makes a fresh pair.
    pg_start "$standby" "$STANDBY_PORT" "-c synchronous_standby_names=''"
    say "PostgreSQL was failed over: the primary is 127.0.0.1:$STANDBY_PORT, with no standby"
    return 0
  fi
  names=$STANDBY_NAME
  [[ $(cat "$(host "$STATE/replication")") == async ]] && names=
  pg_start "$primary" "$PRIMARY_PORT" "-c synchronous_standby_names='$names'"
  say "PostgreSQL replication: $(cat "$(host "$STATE/replication")")"
  if [[ ! -d $(host "$standby") ]]; then
    as_postgres "$PG_BIN/pg_basebackup" -h 127.0.0.1 -p "$PRIMARY_PORT" -U postgres \
      -D "$standby" -X stream -R -c fast --no-sync
  fi
  # A promoted standby must not wait for a standby of its own.
  pg_start "$standby" "$STANDBY_PORT" "-c cluster_name=$STANDBY_NAME -c synchronous_standby_names=''"
  for _ in $(seq 1 120); do
    state=$(as_postgres "$PG_BIN/psql" -h 127.0.0.1 -p "$PRIMARY_PORT" -U postgres -Atqc \
      "SELECT state FROM pg_stat_replication WHERE application_name = '$STANDBY_NAME'" postgres)
    [[ $state == streaming ]] && return 0
    sleep 0.5
  done
  die "the standby on $STANDBY_PORT is not streaming; see $(host "$STATE/pg/pg2.log")"
}

up() {
  check
  mkdir -p "$(host "$STATE")"
  chmod 755 "$(host "$STATE")"
  for n in "${NODES[@]}"; do start_rabbit "$n"; done
  # PostgreSQL starts while the nodes boot.
  pg_up
  for n in "${NODES[@]}"; do wait_rabbit "$n"; done
  for n in "${NODES[@]:1}"; do join_rabbit "$n"; done
  say "up: AMQP amqp://guest:guest@127.0.0.1:5681/%2f,amqp://guest:guest@127.0.0.1:5682/%2f,amqp://guest:guest@127.0.0.1:5683/%2f"
  say "up: PostgreSQL postgres://postgres@127.0.0.1:$PRIMARY_PORT,127.0.0.1:$STANDBY_PORT/postgres?target_session_attrs=read-write"
}

kill_rabbit() { # N
  local pid
  [[ $1 =~ ^[123]$ ]] || die "kill-rabbit takes a node number, 1 to 3, not \`$1\`"
  pid=$(rabbit_pid "$1") || die "$(node "$1") is not running"
  kill -KILL "$pid"
  while [[ -d /proc/$pid ]]; do sleep 0.05; done
  say "SIGKILLed $(node "$1") (pid $pid)"
}

failover_pg() {
  pg_running "$STATE/pg/pg1" || die "the primary ($STATE/pg/pg1) is not running"
  [[ -f $(host "$STATE/pg/pg2/standby.signal") ]] || die "there is no standby to promote"
  # Immediate: no shutdown checkpoint, sessions cut, as in a crash.
  as_postgres "$PG_BIN/pg_ctl" -D "$STATE/pg/pg1" stop -m immediate >/dev/null
  as_postgres "$PG_BIN/pg_ctl" -D "$STATE/pg/pg2" promote -w -t 60 >/dev/null
  [[ $(in_recovery "$STANDBY_PORT") == f ]] || die "the standby did not leave recovery"
  say "failed over: primary stopped, 127.0.0.1:$STANDBY_PORT promoted"
}

down() {
  local pid
  for n in "${NODES[@]}"; do
    if pid=$(rabbit_pid "$n"); then
      kill -KILL "$pid"
      while [[ -d /proc/$pid ]]; do sleep 0.05; done
      say "stopped $(node "$n")"
    fi
  done
  if [[ -n $PG_BIN ]]; then
    for dir in "$STATE/pg/pg1" "$STATE/pg/pg2"; do
      if [[ -d $(host "$dir") ]] && pg_running "$dir"; then
        as_postgres "$PG_BIN/pg_ctl" -D "$dir" stop -m immediate >/dev/null
        say "stopped PostgreSQL $dir"
      fi
    done
  fi
  rm -rf "$(host "$STATE")"
}

save_logs() { # DIR
  [[ -n $1 ]] || die "save-logs takes a folder"
  mkdir -p "$1"
  for n in "${NODES[@]}"; do
    [[ -d $(host "$(node_dir "$n")")/log ]] && cp -r "$(host "$(node_dir "$n")")/log" "$1/rabbit$n"
  done
  cp "$(host "$STATE")"/pg/*.log "$1/" 2>/dev/null || true
  say "logs saved in $1"
}

status() {
  for n in "${NODES[@]}"; do
    if pid=$(rabbit_pid "$n"); then echo "$(node "$n") running (pid $pid, AMQP $(amqp_port "$n"))"; else echo "$(node "$n") down"; fi
  done
  for port in "$PRIMARY_PORT" "$STANDBY_PORT"; do
    if port_open "$port"; then
      echo "PostgreSQL $port running, in recovery: $(in_recovery "$port")"
    else
      echo "PostgreSQL $port down"
    fi
  done
}

case ${1:-} in
  up) up ;;
  down) down ;;
  kill-rabbit) kill_rabbit "${2:-}" ;;
  failover-pg) failover_pg ;;
  status) status ;;
  save-logs) save_logs "${2:-}" ;;
  check) check ;;
  ctl) shift; ctl "$@" ;;
  *) die "usage: $0 up|down|kill-rabbit N|failover-pg|status|save-logs DIR|check|ctl ARGS" ;;
esac
