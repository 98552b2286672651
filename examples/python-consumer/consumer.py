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

Per-key order. A message with an ordering key carries `x-outbox-key` and its
number among the key's messages, `x-outbox-seq` (1, 2, 3... with no gaps).
The relay publishes several of a key's messages at once (OUTBOX_KEY_PIPELINE),
so when one is nacked or returned and retried, the ones behind it can arrive
first. This consumer applies a key's messages in number order: the number
each key expects is its watermark in `inbox_keys`, moved in the transaction of
each effect; an early message is held (unacked) until the missing one comes,
at most --key-gap-wait seconds and half the prefetch across keys, after which
the gap is accepted and logged. A message below the watermark is a copy or a
late one and goes on at once (the inbox tells a copy). Holding needs the
consumer to see every number of its keys: alone on its queue, or its single
active consumer (the queue it declares is `x-single-active-consumer`).

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
-- The highest number applied per ordering key (x-outbox-seq).
CREATE TABLE IF NOT EXISTS inbox_keys (
    key  text   PRIMARY KEY,
    last bigint NOT NULL
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


def key_and_seq(properties):
    """The delivery's ordering key and number, or None for a keyless message."""
    headers = properties.headers or {}
    key, seq = headers.get("x-outbox-key"), headers.get("x-outbox-seq")
    if isinstance(key, bytes):
        key = key.decode("utf-8", "replace")
    # pika gives a long-long header as its own subclass of int.
    if not isinstance(key, str) or not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        return None
    return key, seq


def move_watermark(conn, keyed):
    """In the caller's transaction: the key's watermark up to this number."""
    if keyed:
        conn.execute(
            "INSERT INTO inbox_keys (key, last) VALUES (%s, %s) "
            "ON CONFLICT (key) DO UPDATE SET last = greatest(inbox_keys.last, excluded.last)",
            keyed,
        )


def handle(conn, message_id, order, rider, keyed):
    """One transaction: the inbox row, the effect and the key's watermark.
    True if applied, False if a duplicate."""
    with conn.transaction():
        move_watermark(conn, keyed)
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


class Keys:
    """Each key's next number, and its early deliveries held until the missing one comes."""

    def __init__(self, conn, gap_wait, most_held):
        self.conn, self.gap_wait, self.most_held = conn, gap_wait, most_held
        self.next = {}  # key -> the number it expects
        self.held = {}  # key -> (since, {seq: [delivery, its copies...]})

    def expected(self, key):
        if key not in self.next:
            if len(self.next) >= 100_000:  # forget the idle keys; learnt again from inbox_keys
                self.next = {k: n for k, n in self.next.items() if k in self.held}
            row = self.conn.execute("SELECT last FROM inbox_keys WHERE key = %s", (key,)).fetchone()
            self.next[key] = row[0] + 1 if row else 1
        return self.next[key]

    def offer(self, keyed, delivery):
        """The deliveries that may be applied now, in order: this one and the
        held ones it was missing for; none if this one must wait."""
        key, seq = keyed
        expected = self.expected(key)
        if seq > expected and self.gap_wait > 0:
            since, waiting = self.held.setdefault(key, (time.monotonic(), {}))
            waiting.setdefault(seq, []).append(delivery)
            if sum(len(c) for _, w in self.held.values() for c in w.values()) <= self.most_held:
                return []
            oldest = min(self.held, key=lambda k: self.held[k][0])
            return self.accept_gap(oldest)
        ready = [delivery]
        if seq >= expected:
            self.next[key] = seq + 1
            ready += self.following(key)
        return ready

    def following(self, key):
        """The held deliveries that now follow on without a gap."""
        ready = []
        since, waiting = self.held.get(key, (None, {}))
        while self.next[key] in waiting:
            ready += waiting.pop(self.next[key])
            self.next[key] += 1
        if key in self.held and not waiting:
            del self.held[key]
        return ready

    def accept_gap(self, key):
        """Gives up waiting for the key's missing number: its lowest held
        delivery goes on, and those that follow it."""
        since, waiting = self.held[key]
        first = min(waiting)
        # The key is a row value: not logged.
        log(f"an ordering key gave up waiting for {first - self.next[key]} missing number(s)")
        self.next[key] = first
        ready = self.following(key)
        if key in self.held:
            self.held[key] = (time.monotonic(), self.held[key][1])
        return ready

    def overdue(self):
        """The deliveries whose wait is over (--key-gap-wait), in order."""
        now = time.monotonic()
        ready = []
        for key in [k for k, (since, _) in self.held.items() if now - since >= self.gap_wait]:
            ready += self.accept_gap(key)
        return ready


def apply(conn, channel, delivery, rider):
    """Applies one delivery and acks it after the commit, or dead-letters
    poison; says which. A database error leaves it unacked (requeued when
    the channel closes) and raises."""
    method, properties, body, keyed = delivery
    try:
        message_id, order = parse(properties, body)
    except Poison as e:
        log(f"rejected {properties.message_id}: {e}")
        with conn.transaction():  # the key's next message need not wait for it
            move_watermark(conn, keyed)
        channel.basic_reject(method.delivery_tag, requeue=False)
        return "rejected"
    applied = handle(conn, message_id, order, rider, keyed)
    channel.basic_ack(method.delivery_tag)  # only after the commit
    return "processed" if applied else "duplicates"


def declare(channel, exchange, queue):
    """The exchange (fanout, as in the seed), the queue (single active consumer:
    a key's numbers all reach one consumer) and its dead-letter queue."""
    dlx, dead = f"{queue}.dlx", f"{queue}.dead"
    channel.exchange_declare(exchange, exchange_type="fanout", durable=True)
    channel.exchange_declare(dlx, exchange_type="fanout", durable=True)
    channel.queue_declare(dead, durable=True)
    channel.queue_bind(dead, dlx)
    arguments = {"x-dead-letter-exchange": dlx, "x-single-active-consumer": True}
    channel.queue_declare(queue, durable=True, arguments=arguments)
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
    p.add_argument("--prefetch", type=int, default=256,
                   help="unacked deliveries at once; half of it may be held waiting for a key's missing number")
    p.add_argument("--key-gap-wait", type=float, default=15,
                   help="seconds a key's early message waits for the missing one before the gap is accepted; 0: never wait")
    p.add_argument("--rider", default="骑手张飞")
    p.add_argument("--max-messages", type=int, default=0,
                   help="exit after this many deliveries (processed, duplicate or rejected); 0: never")
    p.add_argument("--idle-exit-seconds", type=float, default=0,
                   help="exit after this long without a delivery; 0: never")
    args = p.parse_args(argv)
    if not 1 <= args.prefetch <= 65535:
        p.error(f"--prefetch {args.prefetch}: give 1 to 65535")
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

    keys = Keys(conn, args.key_gap_wait, args.prefetch // 2)
    code = 0
    last = time.monotonic()
    try:
        for method, properties, body in channel.consume(args.queue, inactivity_timeout=0.2):
            if stopping:
                break
            if method is None and args.idle_exit_seconds and not keys.held \
                    and time.monotonic() - last >= args.idle_exit_seconds:
                break
            try:
                ready = []
                if method is not None:  # else no delivery for 0.2 s
                    last = time.monotonic()
                    keyed = key_and_seq(properties)
                    delivery = (method, properties, body, keyed)
                    ready = keys.offer(keyed, delivery) if keyed else [delivery]
                for delivery in ready + keys.overdue():
                    outcome = apply(conn, channel, delivery, args.rider)
                    counts[outcome] += 1
            except psycopg.Error as e:
                log(f"database error, unacked messages requeued: {str(e).strip()}")
                code = 1
                break
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
