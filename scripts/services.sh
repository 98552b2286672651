#!/usr/bin/env bash
# Starts this machine's PostgreSQL and RabbitMQ when they are down, then waits
# until both accept connections. Safe to run when they are already up.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() { # name port seconds
  for _ in $(seq 1 "$3"); do
    port_open "$2" && return 0
    sleep 1
  done
  echo "services: $1 is not listening on 127.0.0.1:$2 after $3 s" >&2
  return 1
}

if ! port_open 5432; then
  echo "services: starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start
fi
wait_for PostgreSQL 5432 60
until pg_isready -h 127.0.0.1 -q; do sleep 1; done

if ! port_open 5672; then
  echo "services: starting RabbitMQ"
  rabbitmq-server -detached
fi
wait_for RabbitMQ 5672 120
