-- The dispatch center's database (the seed's second database).
-- Applied by `dispatch migrate` (or at `dispatch` start-up); plain psql works too:
--     psql "$DISPATCH_DATABASE_URL" -v ON_ERROR_STOP=1 -f sql/dispatch/V1__dispatch.sql

CREATE SCHEMA IF NOT EXISTS dispatch;

-- The inbox: one row per message already handled. The consumer inserts it in
-- the same transaction as the handler's writes, so a redelivered or duplicated
-- message finds its id here and changes nothing.
CREATE TABLE IF NOT EXISTS dispatch.inbox (
    message_id   uuid        PRIMARY KEY,
    processed_at timestamptz NOT NULL DEFAULT now()
);

-- The seed's kd_order: one delivery per order.
CREATE TABLE IF NOT EXISTS dispatch.deliveries (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id   bigint      NOT NULL UNIQUE,
    rider      text        NOT NULL,
    -- 0 delivering, 1 delivered, 2 cancelled
    status     smallint    NOT NULL DEFAULT 0 CHECK (status IN (0, 1, 2)),
    -- The outbox message that created it, for tracing back to the order.
    message_id uuid        NOT NULL,
    -- The insert's own time (not the transaction's start), close to its
    -- commit: the demo measures order commit -> delivery with it.
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
