// The seed's OrderService.createOrder in Node.js (the pg package), with the outbox.
//
// The order row and its message commit in one transaction: outbox.enqueue
// writes a row of outbox.messages, and outbox-relay publishes it to RabbitMQ
// after the commit. A rolled-back order leaves no message behind.
//
//   DATABASE_URL=postgres://postgres@127.0.0.1:5432/shop node order_service.js [ORDER_ID] [--fail-after-enqueue]
//
// OUTBOX_EXCHANGE: where the message goes (default order_confirm_fanoutExchange).
// TRACEPARENT / TRACESTATE: the W3C trace context of a traced parent process
// (OpenTelemetry's environment variables as carrier). The order is created in
// a span `create order`, a child of that parent (a new root without one), and
// the message's headers carry that span as `traceparent` (and `tracestate`):
// outbox-relay's publish span continues it.
// Prints `order_id=N message_id=UUID` once the transaction has committed.

import { randomInt } from 'node:crypto';
import { context, propagation, trace } from '@opentelemetry/api';
import { W3CTraceContextPropagator } from '@opentelemetry/core';
import { BasicTracerProvider } from '@opentelemetry/sdk-trace-base';
import pg from 'pg';

// Spans from the SDK: real and sampled, so their ids reach the headers. No
// exporter here; an app would add its own (OTLP) span processor.
trace.setGlobalTracerProvider(new BasicTracerProvider());
propagation.setGlobalPropagator(new W3CTraceContextPropagator());
const tracer = trace.getTracer('examples/node');

const CREATE_ORDERS = `CREATE TABLE IF NOT EXISTS orders (
  id bigint PRIMARY KEY, user_name text NOT NULL, context text NOT NULL, num int NOT NULL)`;

/** Thrown by --fail-after-enqueue: anything that fails after the enqueue. */
class SimulatedFailure extends Error {
  constructor(messageId) {
    super('simulated failure after enqueue');
    this.messageId = messageId;
  }
}

/**
 * One transaction: the order row and its outbox message. `traceContext` holds
 * the current span: context.active() in an app with a context manager (the
 * NodeSDK registers one); main passes it, as it registers none.
 */
export async function createOrder(
  client, order, exchange, { failAfterEnqueue = false, traceContext = context.active() } = {},
) {
  const headers = { producer: 'examples/node' };
  // The current span as `traceparent`/`tracestate`: the relay continues its trace.
  propagation.inject(traceContext, headers);
  await client.query('BEGIN');
  try {
    await client.query(
      'INSERT INTO orders (id, user_name, context, num) VALUES ($1, $2, $3, $4)',
      [order.orderId, order.userName, order.context, order.num],
    );
    const { rows } = await client.query(
      'SELECT outbox.enqueue($1, $2, $3::jsonb, $4::jsonb) AS message_id',
      [exchange, '', JSON.stringify(order), JSON.stringify(headers)],
    );
    const messageId = rows[0].message_id;
    if (failAfterEnqueue) throw new SimulatedFailure(messageId);
    await client.query('COMMIT');
    return messageId;
  } catch (error) {
    await client.query('ROLLBACK');
    throw error;
  }
}

/**
 * The trace context a traced parent process passed in TRACEPARENT and
 * TRACESTATE; an empty one (the span becomes a new root) without them.
 */
function parentContext() {
  const carrier = { traceparent: process.env.TRACEPARENT, tracestate: process.env.TRACESTATE };
  return propagation.extract(context.active(), carrier);
}

function fail(code, message) {
  console.error(`examples/node: ${message}`);
  process.exit(code);
}

async function main(args) {
  let orderId = randomInt(1_000_000, 2 ** 31);
  let failAfterEnqueue = false;
  for (const arg of args) {
    if (arg === '--fail-after-enqueue') failAfterEnqueue = true;
    else if (/^[1-9][0-9]{0,14}$/.test(arg)) orderId = Number(arg);
    else fail(2, 'usage: order_service.js [ORDER_ID] [--fail-after-enqueue]');
  }
  const url = process.env.DATABASE_URL;
  if (!url) fail(2, 'DATABASE_URL is not set (e.g. postgres://postgres@127.0.0.1:5432/shop)');
  const exchange = process.env.OUTBOX_EXCHANGE || 'order_confirm_fanoutExchange';
  const order = { orderId, userName: '张三', context: '方便面', num: 1 };

  const client = new pg.Client({ connectionString: url });
  try {
    await client.connect();
    const { rows } = await client.query(
      "SELECT to_regclass('outbox.messages') IS NOT NULL AS installed",
    );
    if (!rows[0].installed) {
      fail(1, 'the outbox schema is not installed in this database: run '
        + '`outbox-relay migrate` or psql over sql/outbox/V*.sql first');
    }
    await client.query(CREATE_ORDERS);
    const span = tracer.startSpan('create order', {}, parentContext());
    try {
      const traceContext = trace.setSpan(context.active(), span);
      const messageId = await createOrder(
        client, order, exchange, { failAfterEnqueue, traceContext },
      );
      console.log(`order_id=${orderId} message_id=${messageId}`);
    } finally {
      span.end();
    }
  } catch (error) {
    if (error instanceof SimulatedFailure) {
      fail(3, `rolled back: order ${orderId} and message ${error.messageId} `
        + 'were never committed (--fail-after-enqueue)');
    }
    if (error.code === '23505') fail(1, `order ${orderId} already exists: nothing was committed`);
    fail(1, String(error.message || error).split('\n')[0]);
  } finally {
    await client.end().catch(() => {});
  }
}

await main(process.argv.slice(2));
