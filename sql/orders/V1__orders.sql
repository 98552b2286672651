-- The order service's own table (the seed's `orders`). The outbox schema is
-- installed next to it by `outbox::migrate`.
CREATE TABLE IF NOT EXISTS public.orders (
    id         bigint      PRIMARY KEY,
    user_name  text        NOT NULL,
    context    text        NOT NULL,
    num        integer     NOT NULL CHECK (num > 0),
    -- clock_timestamp(): the insert's own time, close to its commit, so the
    -- demo can measure commit -> delivery.
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Ids for orders posted without one; far above hand-picked ids like 100001.
CREATE SEQUENCE IF NOT EXISTS public.order_ids START WITH 1000000000;
