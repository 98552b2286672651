#!/usr/bin/env bash
# Every benchmark behind docs/benchmarks.md, with the exact flags used there.
# Each run works in fresh databases, exchanges and queues and removes them.
# Prints human tables and keeps them, the write-path JSON and the SVG plots in
# the output folder (default bench-results/, which git ignores).
#
#   scripts/bench.sh [OUTPUT_DIR]
#
# About 20 minutes on a 2-core machine. Figures are only worth comparing when
# nothing else runs: the tables print the load average at the start of each run.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-results}"
mkdir -p "$out"

scripts/services.sh
cargo build --release --locked --workspace --bins
bench=target/release/outbox-bench

# Each benchmark once, its table kept (add --json to any line for machines).
once() { # NAME ARGS...
  local name="$1"
  shift
  echo "== outbox-bench $*"
  "$bench" "$@" | tee "$out/$name.txt"
}

once latency-sweep latency --rates 20,200,500,1000,2000 --rounds 2 --duration 8 --plot "$out/latency-sweep.svg"
once latency-1000 latency --rate 1000 --duration 20 --writers 8 --plot "$out/latency-1000.svg"
once drain drain --backlog 100000 --window 256 --batch 500
once drain-held-horizon drain --backlog 150000 --window 256 --batch 500 --hold-horizon --no-bare
once consume consume --backlog 100000
once consume-keys-50 consume --backlog 100000 --keys 50
once consume-keys-50-heads consume --backlog 20000 --keys 50 --key-pipeline 0
once schedule schedule --rows 10000 --rate 1000 --backlog 50000 --future 1000000
once soak-5000 soak --rate 5000 --duration 30 --writers 16 --every 5 --plot "$out/soak-5000.svg"
once soak-1000 soak --rate 1000 --duration 60 --writers 8 --every 10 --plot "$out/soak-1000.svg"
once write-path write-path --clients 32 --duration 8 --pairs 5 --json "$out/write-path.json"
echo "results in $out/"
