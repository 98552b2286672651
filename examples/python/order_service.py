"""The seed's OrderService.createOrder in Python (psycopg 3), with the outbox.

The order row and its message commit in one transaction: outbox.enqueue
writes a row of outbox.messages, and outbox-relay publishes it to RabbitMQ
after the commit. A rolled-back order leaves no message behind.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/shop python order_service.py [ORDER_ID] [--fail-after-enqueue] [--cancel-unpaid-after SECONDS]

OUTBOX_EXCHANGE: where the message goes (default order_confirm_fanoutExchange).
TRACEPARENT / TRACESTATE: the W3C trace context of a traced parent process
(OpenTelemetry's environment variables as carrier). The order is created in
a span `create order`, a child of that parent (a new root without one), and
the message's headers carry that span as `traceparent` (and `tracestate`):
outbox-relay's publish span continues it.
Prints `order_id=N message_id=UUID` once the transaction has committed.

--cancel-unpaid-after SECONDS also schedules, in the same transaction, an
`order.cancel_unpaid` message published SECONDS later (outbox.enqueue's
deliver_at), and prints `cancel_message_id=UUID`; `outbox.cancel(UUID)` in
the payment's transaction stops it.
"""

import os
import random
import sys
from dataclasses import asdict, dataclass

import psycopg
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from psycopg.types.json import Jsonb

CREATE_ORDERS = """
CREATE TABLE IF NOT EXISTS orders (
    id bigint PRIMARY KEY, user_name text NOT NULL, context text NOT NULL, num int NOT NULL)
"""

# Spans from the SDK: real and sampled, so their ids reach the headers. No
# exporter here; an app would add its own (OTLP) span processor.
trace.set_tracer_provider(TracerProvider())
tracer = trace.get_tracer("examples/python")


@dataclass
class Order:
    """The seed's Order entity."""

    orderId: int
    userName: str
    context: str
    num: int


class SimulatedFailure(Exception):
    """Raised by --fail-after-enqueue: anything that fails after the enqueue."""

    def __init__(self, message_id):
        super().__init__("simulated failure after enqueue")
        self.message_id = message_id


def create_order(conn, order, exchange, fail_after_enqueue=False, cancel_after=None):
    """One transaction: the order row, its outbox message and, with
    cancel_after (seconds), a scheduled cancellation."""
    cancel_id = None
    headers = {"producer": "examples/python"}
    # The current span as `traceparent`/`tracestate`: the relay continues its trace.
    propagate.inject(headers)
    with conn.transaction():  # commits on success, rolls back on any exception
        conn.execute(
            "INSERT INTO orders (id, user_name, context, num) VALUES (%s, %s, %s, %s)",
            (order.orderId, order.userName, order.context, order.num),
        )
        (message_id,) = conn.execute(
            "SELECT outbox.enqueue(%s, %s, %s, %s)",
            (exchange, "", Jsonb(asdict(order)), Jsonb(headers)),
        ).fetchone()
        if cancel_after is not None:
            (cancel_id,) = conn.execute(
                "SELECT outbox.enqueue(%s, 'order.cancel_unpaid', %s, ordering_key => %s, "
                "deliver_at => now() + %s * interval '1 second')",
                (exchange, Jsonb({"orderId": order.orderId}), f"order-{order.orderId}", cancel_after),
            ).fetchone()
        if fail_after_enqueue:
            raise SimulatedFailure(message_id)
    return message_id, cancel_id


def parent_context():
    """The trace context a traced parent process passed in TRACEPARENT and
    TRACESTATE; an empty one (the span becomes a new root) without them."""
    carrier = {name.lower(): os.environ[name]
               for name in ("TRACEPARENT", "TRACESTATE") if name in os.environ}
    return propagate.extract(carrier)


def fail(code, message):
    print(f"examples/python: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv):
    order_id = random.randrange(1_000_000, 2**31)
    fail_after_enqueue = False
    cancel_after = None
    usage = "usage: order_service.py [ORDER_ID] [--fail-after-enqueue] [--cancel-unpaid-after SECONDS]"
    args = iter(argv)
    for arg in args:
        if arg == "--fail-after-enqueue":
            fail_after_enqueue = True
        elif arg == "--cancel-unpaid-after":
            seconds = next(args, "")
            if not seconds.isdigit():
                fail(2, usage)
            cancel_after = int(seconds)
        elif arg.isdigit() and int(arg) > 0:
            order_id = int(arg)
        else:
            fail(2, usage)
    url = os.environ.get("DATABASE_URL")
    if not url:
        fail(2, "DATABASE_URL is not set (e.g. postgres://postgres@127.0.0.1:5432/shop)")
    exchange = os.environ.get("OUTBOX_EXCHANGE", "order_confirm_fanoutExchange")
    order = Order(orderId=order_id, userName="张三", context="方便面", num=1)

    try:
        with psycopg.connect(url, autocommit=True) as conn:
            (installed,) = conn.execute(
                "SELECT to_regclass('outbox.messages') IS NOT NULL"
            ).fetchone()
            if not installed:
                fail(1, "the outbox schema is not installed in this database: run "
                        "`outbox-relay migrate` or psql over sql/outbox/V*.sql first")
            conn.execute(CREATE_ORDERS)
            try:
                with tracer.start_as_current_span("create order", context=parent_context()):
                    message_id, cancel_id = create_order(
                        conn, order, exchange, fail_after_enqueue, cancel_after)
            except psycopg.errors.UniqueViolation:
                fail(1, f"order {order_id} already exists: nothing was committed")
            except SimulatedFailure as e:
                fail(3, f"rolled back: order {order_id} and message {e.message_id} "
                        "were never committed (--fail-after-enqueue)")
    except psycopg.Error as e:
        fail(1, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    print(f"order_id={order_id} message_id={message_id}")
    if cancel_id is not None:
        print(f"cancel_message_id={cancel_id}")


if __name__ == "__main__":
    main(sys.argv[1:])
