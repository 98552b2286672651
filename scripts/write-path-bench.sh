#!/usr/bin/env bash
# What an application's writes pay for the relay's wake-up trigger.
#
# pgbench runs an order-taking transaction (INSERT an order, then
# outbox.enqueue() its message, in one transaction) from many clients, in
# runs of a few seconds each, in two variants:
#   off    trigger `wake_relay` disabled: what the writes cost with no wake-up
#   on     trigger `wake_relay` enabled, as installed by sql/outbox/V1__outbox.sql
#   naive  (--naive only) wake_relay disabled and a plain per-row pg_notify
#          trigger instead, for contrast: what a NOTIFY on every commit costs
#   capture (--capture only) the transaction INSERTs the order and nothing
#          else; outbox.capture() on `orders` enqueues the message from a
#          trigger (wake_relay enabled): what zero-code adoption costs
#   bare   (--capture only) the same order INSERT with no capture: the app's
#          write path before it adopted the outbox at all
# During every run a relay is draining: by default a stand-in (a second
# pgbench that claims and marks up to 1,000 rows about 500 times a second
# between outbox.begin_drain() and outbox.end_drain()), or with
# --relay "COMMAND" your own relay. A psql session LISTENs on `outbox_wake`
# the whole time and counts the wake-ups that were really sent.
#
# Reading the output: absolute tps is noisy (runs vary by about ±10 %, more if
# something else is busy on the machine), so the variants run in interleaved
# pairs, alternating which goes first, and every table is emptied and a
# CHECKPOINT taken before each run. Compare the median of the per-pair on/off
# ratios, not single runs. The verdict line passes when that median is at
# least 0.90. The script exits 0 whatever the verdict; non-zero means the
# benchmark itself broke.
#
# Needs only psql and pgbench, and a PostgreSQL that lets the user create
# databases (default 127.0.0.1:5432, user postgres; PGHOST, PGPORT and PGUSER
# override). The bench database is dropped and recreated on every start and
# left in place afterwards, for a look at what the runs wrote.
#
# --no-relay runs with no relay at all: no one has announced a listener, so
# writers skip NOTIFY and only pay the lock probes. A relay that drains for the
# whole run (the probe always fails, no wake-up is ever sent) shows the cost
# of the probe alone:
#   --relay '(echo "SELECT outbox.begin_drain();"; sleep 3600) | psql -X -q "$OUTBOX_DATABASE_URL"'
#
#   scripts/write-path-bench.sh [--db NAME] [--clients N] [--jobs N]
#       [--seconds N] [--pairs N] [--naive] [--capture]
#       [--relay "COMMAND" | --no-relay]
#       [--json FILE]
set -euo pipefail
cd "$(dirname "$0")/.."

export PGHOST="${PGHOST:-127.0.0.1}"
export PGPORT="${PGPORT:-5432}"
export PGUSER="${PGUSER:-postgres}"
export PGOPTIONS="${PGOPTIONS:-} -c client_min_messages=warning"

DB=outbox_write_path_bench
CLIENTS=32
JOBS=2
SECONDS_PER_RUN=8
PAIRS=5
NAIVE=no
CAPTURE=no
RELAY_MODE=stand-in # stand-in | command | none
RELAY_COMMAND=
JSON_FILE=
PASS_RATIO=0.90
STAND_IN_RATE=500 # drains per second

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
}

parse_args() {
  while (($#)); do
    if [[ $1 == --@(db|clients|jobs|seconds|pairs|relay|json) && $# -lt 2 ]]; then
      echo "write-path-bench: $1 needs a value" >&2
      exit 2
    fi
    case "$1" in
      --db) DB="$2"; shift 2 ;;
      --clients) CLIENTS="$2"; shift 2 ;;
      --jobs) JOBS="$2"; shift 2 ;;
      --seconds) SECONDS_PER_RUN="$2"; shift 2 ;;
      --pairs) PAIRS="$2"; shift 2 ;;
      --naive) NAIVE=yes; shift ;;
      --capture) CAPTURE=yes; shift ;;
      --relay) RELAY_MODE=command; RELAY_COMMAND="$2"; shift 2 ;;
      --no-relay) RELAY_MODE=none; shift ;;
      --json) JSON_FILE="$2"; shift 2 ;;
      -h | --help) usage; exit 0 ;;
      *) echo "write-path-bench: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
  done
  if [[ ! "$DB" =~ ^[a-z_][a-z0-9_]*$ ]]; then
    echo "write-path-bench: --db must be a plain lower-case identifier" >&2
    exit 2
  fi
}

# ---------------------------------------------------------------- helpers

sql() { # run SQL in the bench database, quietly
  psql -X -q -At -v ON_ERROR_STOP=1 -d "$DB" -c "$1"
}

median() { # numbers as arguments -> their median
  printf '%s\n' "$@" | sort -g | awk '
    { v[NR] = $1 }
    END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

divide() { # a b -> a/b with 3 decimals
  awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a / b }'
}

tps_from_log() { # pgbench log -> tps as a whole number
  sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$1" | head -1 | awk '{ printf "%.0f", $1 }'
}

# ---------------------------------------------------------------- set-up

create_database() {
  # A capture makes a role per captured table, named after the database's
  # oid (sql/outbox/V7): roles outlive the database, so drop the last run's.
  local old_oid
  old_oid=$(psql -X -q -At -d postgres -c "SELECT oid FROM pg_database WHERE datname = '$DB'")
  psql -X -q -v ON_ERROR_STOP=1 -d postgres \
    -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" \
    -c "CREATE DATABASE $DB"
  if [[ -n $old_oid ]]; then
    psql -X -q -v ON_ERROR_STOP=1 -d postgres -c "DO \$\$
      DECLARE r text;
      BEGIN
        FOR r IN SELECT rolname FROM pg_roles
                 WHERE rolname LIKE 'outbox\_capture\_${old_oid}\_%' LOOP
          EXECUTE format('DROP ROLE %I', r);
        END LOOP;
      END \$\$"
  fi
  local migration
  for migration in $(printf '%s\n' sql/outbox/V*__*.sql | sort -V); do
    psql -X -q -v ON_ERROR_STOP=1 -d "$DB" -f "$migration" >/dev/null
  done
  sql "CREATE TABLE orders (
         id        bigint PRIMARY KEY,
         user_name text,
         context   text,
         num       int
       );
       CREATE SEQUENCE order_ids;"
  if [[ $NAIVE == yes ]]; then
    # Bench-only: the shape the design replaced, one NOTIFY per outbox row.
    sql "CREATE FUNCTION public.naive_notify() RETURNS trigger
         LANGUAGE plpgsql AS \$\$
         BEGIN
             PERFORM pg_notify('outbox_wake', '');
             RETURN NULL;
         END
         \$\$;
         CREATE TRIGGER naive_notify AFTER INSERT ON outbox.messages
             FOR EACH ROW EXECUTE FUNCTION public.naive_notify();
         ALTER TABLE outbox.messages DISABLE TRIGGER naive_notify;"
  fi
  if [[ $CAPTURE == yes ]]; then
    # The same message as the explicit enqueue carries: the order as JSON.
    sql "SELECT outbox.capture('orders', 'order_confirm_fanoutExchange', '',
                               operations => '{insert}');
         ALTER TABLE orders DISABLE TRIGGER outbox_capture;" >/dev/null
  fi
}

write_scripts() {
  # The application's transaction, as an app would send it.
  cat >"$WORK/writer.sql" <<'EOF'
\set num random(1, 10)
BEGIN;
INSERT INTO orders (id, user_name, context, num)
  VALUES (nextval('order_ids'), 'user' || :client_id::int, 'pgbench order', :num::int)
  RETURNING id AS order_id \gset
SELECT outbox.enqueue('order_confirm_fanoutExchange', '',
  jsonb_build_object('orderId', :order_id::bigint, 'userName', 'user' || :client_id::int,
                     'context', 'pgbench order', 'num', :num::int));
COMMIT;
EOF
  # The same transaction when a capture trigger writes the message.
  cat >"$WORK/writer-capture.sql" <<'EOF'
\set num random(1, 10)
BEGIN;
INSERT INTO orders (id, user_name, context, num)
  VALUES (nextval('order_ids'), 'user' || :client_id::int, 'pgbench order', :num::int);
COMMIT;
EOF
  # A relay that is draining: holds the drain lock in shared mode while it
  # claims and marks a batch, then lets go until its next round.
  cat >"$WORK/stand-in.sql" <<'EOF'
SELECT outbox.begin_drain();
UPDATE outbox.messages SET published_at = now()
  WHERE id IN (SELECT id FROM outbox.messages
               WHERE published_at IS NULL AND dead_at IS NULL
               ORDER BY id LIMIT 1000 FOR UPDATE SKIP LOCKED);
SELECT outbox.end_drain();
EOF
}

# ---------------------------------------------------------------- one run

select_variant() { # off | on | naive | capture
  local wake=DISABLE naive=DISABLE capture=DISABLE
  WRITER="$WORK/writer.sql"
  case "$1" in
    on) wake=ENABLE ;;
    naive) naive=ENABLE ;;
    capture) wake=ENABLE capture=ENABLE WRITER="$WORK/writer-capture.sql" ;;
    bare) WRITER="$WORK/writer-capture.sql" ;;
  esac
  sql "ALTER TABLE outbox.messages $wake TRIGGER wake_relay"
  if [[ $NAIVE == yes ]]; then
    sql "ALTER TABLE outbox.messages $naive TRIGGER naive_notify"
  fi
  if [[ $CAPTURE == yes ]]; then
    sql "ALTER TABLE orders $capture TRIGGER outbox_capture"
  fi
}

reset_tables() {
  # Every run starts from empty tables and a clean checkpoint, so neither
  # table growth nor a checkpoint left over from the previous run biases it.
  sql "TRUNCATE orders, outbox.messages RESTART IDENTITY;
       ALTER SEQUENCE order_ids RESTART;
       CHECKPOINT;"
}

start_listener() { # out-file: count wake-ups sent, as a relay would receive them
  rm -f "$WORK/stop-listener"
  {
    echo "LISTEN outbox_wake;"
    # Writers notify only while some relay has announced itself; the
    # stand-in and a real relay count as one, --no-relay does not.
    [[ $RELAY_MODE == none ]] || echo "SELECT outbox.announce_listener();"
    while [[ ! -e "$WORK/stop-listener" ]]; do
      echo "SELECT 1;" # psql prints notifications after each command
      sleep 0.2
    done
    sleep 0.2
    echo "SELECT 1;"
  } | psql -X -q -At -d "$DB" >"$1" &
  LISTENER_PID=$!
}

stop_listener() {
  touch "$WORK/stop-listener"
  wait "$LISTENER_PID"
  LISTENER_PID=
}

start_relay() { # log-file
  case "$RELAY_MODE" in
    stand-in)
      # Runs a second longer than the writers: it starts half a second
      # before them and stops on its own half a second after them.
      pgbench -n -c 1 -j 1 -R "$STAND_IN_RATE" -T $((SECONDS_PER_RUN + 1)) \
        -f "$WORK/stand-in.sql" "$DB" >"$1" 2>&1 &
      RELAY_PID=$!
      ;;
    command)
      # Its own session, so stopping it stops whatever it started too.
      setsid bash -c "$RELAY_COMMAND" >"$1" 2>&1 &
      RELAY_PID=$!
      ;;
    none) RELAY_PID= ;;
  esac
  sleep 0.5
}

stop_relay() { # log-file
  [[ -n $RELAY_PID ]] || return 0
  case "$RELAY_MODE" in
    stand-in)
      if ! wait "$RELAY_PID"; then
        echo "write-path-bench: the relay stand-in failed:" >&2
        cat "$1" >&2
        exit 1
      fi
      ;;
    command)
      kill -TERM -- "-$RELAY_PID" 2>/dev/null || true
      wait "$RELAY_PID" || true
      ;;
  esac
  RELAY_PID=
}

run_once() { # variant label -> prints one line, appends to the result arrays
  local variant="$1" label="$2"
  local log="$WORK/$label.log" relay_log="$WORK/$label.relay.log"
  local notify_log="$WORK/$label.notify.log"
  select_variant "$variant"
  reset_tables
  start_listener "$notify_log"
  start_relay "$relay_log"
  if ! pgbench -n -M prepared -c "$CLIENTS" -j "$JOBS" -T "$SECONDS_PER_RUN" \
    -f "$WRITER" "$DB" >"$log" 2>&1; then
    echo "write-path-bench: pgbench failed in run $label:" >&2
    cat "$log" >&2
    exit 1
  fi
  stop_relay "$relay_log"
  stop_listener

  local tps notifies drains=-
  tps=$(tps_from_log "$log")
  notifies=$(grep -c '^Asynchronous notification "outbox_wake"' "$notify_log" || true)
  if [[ $RELAY_MODE == stand-in ]]; then
    drains=$(tps_from_log "$relay_log")
  fi
  RUN_LABELS+=("$label")
  RUN_VARIANTS+=("$variant")
  RUN_TPS+=("$tps")
  RUN_NOTIFIES+=("$notifies")
  printf '%-9s %-6s tps %7s   wake-ups %6s (%s/s)   relay drains/s %s\n' \
    "$label" "$variant" "$tps" "$notifies" \
    "$(awk -v n="$notifies" -v s="$SECONDS_PER_RUN" 'BEGIN { printf "%.0f", n / s }')" \
    "$drains"
}

# ---------------------------------------------------------------- the runs

run_pairs() {
  local variants=(off on) order pair v
  [[ $NAIVE == yes ]] && variants+=(naive)
  [[ $CAPTURE == yes ]] && variants+=(capture bare)
  for ((pair = 1; pair <= PAIRS; pair++)); do
    # Odd pairs run the variants in order, even pairs in reverse, so slow
    # drift (a build next door, caches warming) hits each variant alike.
    if ((pair % 2)); then
      order=("${variants[@]}")
    else
      order=()
      for ((v = ${#variants[@]} - 1; v >= 0; v--)); do order+=("${variants[v]}"); done
    fi
    for v in "${order[@]}"; do
      run_once "$v" "pair$pair"
      PAIR_TPS["$pair.$v"]="${RUN_TPS[-1]}"
    done
  done
}

tps_of() { # variant -> all its tps figures
  local i
  for i in "${!RUN_VARIANTS[@]}"; do
    [[ ${RUN_VARIANTS[i]} == "$1" ]] && echo "${RUN_TPS[i]}"
  done
  return 0
}

notifies_of() { # variant -> all its wake-up counts
  local i
  for i in "${!RUN_VARIANTS[@]}"; do
    [[ ${RUN_VARIANTS[i]} == "$1" ]] && echo "${RUN_NOTIFIES[i]}"
  done
  return 0
}

ratios_of() { # variant [base] -> its per-pair ratio to base (default off)
  local pair base="${2:-off}"
  for ((pair = 1; pair <= PAIRS; pair++)); do
    divide "${PAIR_TPS[$pair.$1]}" "${PAIR_TPS[$pair.$base]}"
    echo
  done
}

summarize() {
  local v
  declare -gA MEDIAN_TPS MEDIAN_NOTIFIES
  for v in off on naive capture bare; do
    [[ $v == naive && $NAIVE == no ]] && continue
    [[ $v == @(capture|bare) && $CAPTURE == no ]] && continue
    # shellcheck disable=SC2046 # word splitting wanted: one figure per word
    MEDIAN_TPS[$v]=$(median $(tps_of "$v"))
    # shellcheck disable=SC2046
    MEDIAN_NOTIFIES[$v]=$(median $(notifies_of "$v"))
  done
  mapfile -t ON_RATIOS < <(ratios_of on)
  RATIO_ON=$(median "${ON_RATIOS[@]}")
  if [[ $NAIVE == yes ]]; then
    mapfile -t NAIVE_RATIOS < <(ratios_of naive)
    RATIO_NAIVE=$(median "${NAIVE_RATIOS[@]}")
  fi
  if [[ $CAPTURE == yes ]]; then
    mapfile -t CAPTURE_RATIOS < <(ratios_of capture)
    RATIO_CAPTURE=$(median "${CAPTURE_RATIOS[@]}")
    mapfile -t CAPTURE_ON_RATIOS < <(ratios_of capture on)
    RATIO_CAPTURE_ON=$(median "${CAPTURE_ON_RATIOS[@]}")
    mapfile -t CAPTURE_BARE_RATIOS < <(ratios_of capture bare)
    RATIO_CAPTURE_BARE=$(median "${CAPTURE_BARE_RATIOS[@]}")
  fi
  if awk -v r="$RATIO_ON" -v p="$PASS_RATIO" 'BEGIN { exit !(r >= p) }'; then
    VERDICT=PASS
  else
    VERDICT=FAIL
  fi

  echo
  echo "median tps      off $(printf '%6s' "${MEDIAN_TPS[off]}")   on $(printf '%6s' "${MEDIAN_TPS[on]}")$(
    [[ $NAIVE == yes ]] && printf '   naive %6s' "${MEDIAN_TPS[naive]}")$(
    [[ $CAPTURE == yes ]] && printf '   capture %6s   bare %6s' "${MEDIAN_TPS[capture]}" "${MEDIAN_TPS[bare]}")"
  echo "median wake-ups per run: on ${MEDIAN_NOTIFIES[on]}$(
    [[ $NAIVE == yes ]] && printf ', naive %s' "${MEDIAN_NOTIFIES[naive]}")"
  echo "on/off per pair ${ON_RATIOS[*]}"
  [[ $NAIVE == yes ]] && echo "naive/off       ${NAIVE_RATIOS[*]}"
  if [[ $CAPTURE == yes ]]; then
    echo "capture/off     ${CAPTURE_RATIOS[*]}"
    echo "capture/on      ${CAPTURE_ON_RATIOS[*]}"
    echo "capture/bare    ${CAPTURE_BARE_RATIOS[*]}"
    echo "median capture/off ratio $RATIO_CAPTURE, capture/on $RATIO_CAPTURE_ON, capture/bare $RATIO_CAPTURE_BARE"
  fi
  echo "median on/off ratio $RATIO_ON$(
    [[ $NAIVE == yes ]] && printf ', median naive/off ratio %s' "$RATIO_NAIVE")"
  echo "verdict: $VERDICT (median on/off $RATIO_ON, pass at >= $PASS_RATIO)"
}

write_json() {
  [[ -n $JSON_FILE ]] || return 0
  local i runs="" sep=""
  for i in "${!RUN_LABELS[@]}"; do
    runs+="$sep    {\"pair\": ${RUN_LABELS[i]#pair}, \"variant\": \"${RUN_VARIANTS[i]}\", \"tps\": ${RUN_TPS[i]}, \"wake_ups\": ${RUN_NOTIFIES[i]}}"
    sep=$',\n'
  done
  {
    echo "{"
    echo "  \"clients\": $CLIENTS, \"jobs\": $JOBS, \"seconds\": $SECONDS_PER_RUN, \"pairs\": $PAIRS,"
    echo "  \"relay\": \"$RELAY_MODE\","
    echo "  \"median_tps\": {\"off\": ${MEDIAN_TPS[off]}, \"on\": ${MEDIAN_TPS[on]}$(
      [[ $NAIVE == yes ]] && printf ', "naive": %s' "${MEDIAN_TPS[naive]}")$(
      [[ $CAPTURE == yes ]] && printf ', "capture": %s, "bare": %s' "${MEDIAN_TPS[capture]}" "${MEDIAN_TPS[bare]}")},"
    echo "  \"median_wake_ups_per_run\": {\"on\": ${MEDIAN_NOTIFIES[on]}$(
      [[ $NAIVE == yes ]] && printf ', "naive": %s' "${MEDIAN_NOTIFIES[naive]}")},"
    echo "  \"on_off_ratios\": [$(IFS=,; echo "${ON_RATIOS[*]}" | sed 's/,/, /g')],"
    echo "  \"median_on_off_ratio\": $RATIO_ON,"
    if [[ $NAIVE == yes ]]; then
      echo "  \"naive_off_ratios\": [$(IFS=,; echo "${NAIVE_RATIOS[*]}" | sed 's/,/, /g')],"
      echo "  \"median_naive_off_ratio\": $RATIO_NAIVE,"
    fi
    if [[ $CAPTURE == yes ]]; then
      echo "  \"capture_off_ratios\": [$(IFS=,; echo "${CAPTURE_RATIOS[*]}" | sed 's/,/, /g')],"
      echo "  \"median_capture_off_ratio\": $RATIO_CAPTURE,"
      echo "  \"median_capture_on_ratio\": $RATIO_CAPTURE_ON,"
      echo "  \"median_capture_bare_ratio\": $RATIO_CAPTURE_BARE,"
    fi
    echo "  \"pass_ratio\": $PASS_RATIO,"
    echo "  \"verdict\": \"$VERDICT\","
    echo "  \"runs\": ["
    echo "$runs"
    echo "  ]"
    echo "}"
  } >"$JSON_FILE"
  echo "summary written to $JSON_FILE"
}

cleanup() { # on any exit: stop what is still running, remove the scratch files
  if [[ -n ${RELAY_PID:-} ]]; then
    kill -TERM -- "-$RELAY_PID" 2>/dev/null || kill -TERM "$RELAY_PID" 2>/dev/null || true
  fi
  if [[ -n ${LISTENER_PID:-} ]]; then
    touch "$WORK/stop-listener"
  fi
  wait 2>/dev/null || true
  rm -rf "$WORK"
}

main() {
  parse_args "$@"
  WORK=$(mktemp -d)
  RELAY_PID= LISTENER_PID=
  trap cleanup EXIT
  RUN_LABELS=() RUN_VARIANTS=() RUN_TPS=() RUN_NOTIFIES=()
  declare -gA PAIR_TPS=()

  # What the relay command connects to, if one is given.
  export OUTBOX_DATABASE_URL="postgres://$PGUSER@$PGHOST:$PGPORT/$DB"

  echo "write-path bench: $(psql -X -At -d postgres -c 'SHOW server_version')," \
    "$CLIENTS clients, -j $JOBS, ${SECONDS_PER_RUN}s runs, $PAIRS pairs," \
    "relay: $RELAY_MODE${RELAY_COMMAND:+ ($RELAY_COMMAND)}, $(nproc) cores," \
    "load $(cut -d' ' -f1-3 /proc/loadavg)"
  create_database
  write_scripts

  # One unreported run first, so the first pair does not pay for cold caches.
  local seconds="$SECONDS_PER_RUN"
  SECONDS_PER_RUN=3
  run_once on warm-up >/dev/null
  SECONDS_PER_RUN="$seconds"
  RUN_LABELS=() RUN_VARIANTS=() RUN_TPS=() RUN_NOTIFIES=()

  run_pairs
  summarize
  write_json
}

main "$@"
