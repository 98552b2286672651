"""A consumer in Python (pika and psycopg 3) for the outbox's messages.

For teams that do not run our Rust consumer (crates/dispatch), the same
pattern in ~150 lines. For each delivery, ONE transaction in the consumer's
own database:

    INSERT INTO inbox (message_id) ... ON CONFLICT DO NOTHING
        -> no row inserted: a duplicate (a redelivery, or a publish repeated
           after a relay crash): commit nothing else, ack, skip
    INSERT INTO deliveries ...       (the effect: the seed's kd_order)
    COMMIT
then basic_ack. Ack after commit: a crash between the two redelivers the
message, and the inbox row makes the redelivery change nothing. The outbox
row's UUID is the AMQP message_id, so every copy of a message has the same id.

Poison (no UUID message_id, a body that is not a JSON order) is rejected
without requeue: RabbitMQ dead-letters it when the queue has a dead-letter
exchange (this consumer declares `<queue>.dlx` and `<queue>.dead` unless
--no-declare), and it never blocks the messages behind it.

A database failure leaves the delivery unacked (requeued) and exits 1: run it
under a supervisor; the inbox absorbs whatever was committed but not acked.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/dispatch python consumer.py \
        --exchange order_confirm_fanoutExchange --queue examples_python_dispatch

Prints `consuming queue=Q exchange=E` when ready, and on exit
`processed=N duplicates=N rejected=N`.
"""

import argparse
import json
import os
import signal
import sys
import time
import uuid

import pika
import psycopg

SCHEMA = """
CREATE TABLE IF NOT EXISTS inbox (
    message_id  uuid        PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now()
);
-- The effect: one delivery per order (the seed's kd_order). No UNIQUE on
-- order_id on purpose: the inbox alone makes the effect happen once.
CREATE TABLE IF NOT EXISTS deliveries (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id   bigint      NOT NULL,
    rider      text        NOT NULL,
    status     smallint    NOT NULL DEFAULT 0, -- 0 delivering, 1 delivered, 2 cancelled
    message_id uuid        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
"""


class Poison(Exception):
    """A message that no retry can fix."""


def log(message):
    print(f"examples/python-consumer: {message}", file=sys.stderr, flush=True)


def parse(properties, body):
    """The delivery's message_id and order, or Poison."""
    try:
        message_id = uuid.UUID(properties.message_id or "")
    except ValueError:
        raise Poison(f"message_id {properties.message_id!r} is not a UUID") from None
    try:
        order = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise Poison(f"body is not JSON: {e}") from None
    order_id = order.get("orderId") if isinstance(order, dict) else None
    if type(order_id) is not int or not 0 < order_id < 2**63:
        raise Poison("body is not an order (no positive integer orderId)")
    return message_id, order


def handle(conn, message_id, order, rider):
    """One transaction: the inbox row and the effect. True if applied, False if a duplicate."""
    with conn.transaction():
        inserted = conn.execute(
            "INSERT INTO inbox (message_id) VALUES (%s) ON CONFLICT (message_id) DO NOTHING",
            (message_id,),
        ).rowcount
        if not inserted:
            return False
        conn.execute(
            "INSERT INTO deliveries (order_id, rider, message_id) VALUES (%s, %s, %s)",
            (order["orderId"], rider, message_id),
        )
    return True


def declare(channel, exchange, queue):
    """The exchange (fanout, as in the seed), the queue and its dead-letter queue."""
    dlx, dead = f"{queue}.dlx", f"{queue}.dead"
    channel.exchange_declare(exchange, exchange_type="fanout", durable=True)
    channel.exchange_declare(dlx, exchange_type="fanout", durable=True)
    channel.queue_declare(dead, durable=True)
    channel.queue_bind(dead, dlx)
    channel.queue_declare(queue, durable=True, arguments={"x-dead-letter-exchange": dlx})
    channel.queue_bind(queue, exchange)


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--database-url", default=os.environ.get("DATABASE_URL"),
                   help="the consumer's own database (env DATABASE_URL)")
    p.add_argument("--amqp-url", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"))
    p.add_argument("--exchange", default=os.environ.get("EXCHANGE", "order_confirm_fanoutExchange"))
    p.add_argument("--queue", default=os.environ.get("QUEUE", "examples_python_dispatch"))
    p.add_argument("--no-declare", action="store_true",
                   help="consume an existing queue as it is (declare nothing)")
    p.add_argument("--prefetch", type=int, default=16)
    p.add_argument("--rider", default="骑手张飞")
    p.add_argument("--max-messages", type=int, default=0,
                   help="exit after this many deliveries (processed, duplicate or rejected); 0: never")
    p.add_argument("--idle-exit-seconds", type=float, default=0,
                   help="exit after this long without a delivery; 0: never")
    args = p.parse_args(argv)
    if not args.database_url:
        log("DATABASE_URL is not set (the consumer's own database, e.g. postgres://postgres@127.0.0.1:5432/dispatch)")
        return 2

    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    counts = {"processed": 0, "duplicates": 0, "rejected": 0}
    try:
        conn = psycopg.connect(args.database_url, autocommit=True)
        conn.execute(SCHEMA)
        amqp = pika.BlockingConnection(pika.URLParameters(args.amqp_url))
    except (psycopg.Error, pika.exceptions.AMQPError) as e:
        log(f"cannot connect: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
        return 1
    channel = amqp.channel()
    if not args.no_declare:
        declare(channel, args.exchange, args.queue)
    channel.basic_qos(prefetch_count=args.prefetch)
    print(f"consuming queue={args.queue} exchange={args.exchange}", flush=True)

    code = 0
    last = time.monotonic()
    try:
        for method, properties, body in channel.consume(args.queue, inactivity_timeout=0.2):
            if stopping:
                break
            if method is None:  # no delivery for 0.2 s
                if args.idle_exit_seconds and time.monotonic() - last >= args.idle_exit_seconds:
                    break
                continue
            last = time.monotonic()
            try:
                message_id, order = parse(properties, body)
                applied = handle(conn, message_id, order, args.rider)
            except Poison as e:
                log(f"rejected {properties.message_id}: {e}")
                channel.basic_reject(method.delivery_tag, requeue=False)
                counts["rejected"] += 1
            except psycopg.Error as e:
                log(f"database error, message {properties.message_id} requeued: {str(e).strip()}")
                channel.basic_nack(method.delivery_tag, requeue=True)
                code = 1
                break
            else:
                channel.basic_ack(method.delivery_tag)  # only after the commit
                counts["processed" if applied else "duplicates"] += 1
            if args.max_messages and sum(counts.values()) >= args.max_messages:
                break
        channel.cancel()  # prefetched deliveries not handled go back to the queue
        amqp.close()
    except pika.exceptions.AMQPError as e:
        log(f"broker connection lost: {e!r} (unacked deliveries are redelivered)")
        code = 1
    finally:
        conn.close()
    print(" ".join(f"{k}={v}" for k, v in counts.items()), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
