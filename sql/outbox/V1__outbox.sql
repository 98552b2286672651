-- The outbox schema: everything the relay owns lives in schema `outbox`; the
-- application's own tables are never touched.
--
-- This file is a refinery migration (`outbox-relay migrate` applies it and
-- records it) and also plain SQL for teams that do not run our binary:
--     psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f sql/outbox/V1__outbox.sql
-- Every statement is idempotent, so running it twice, or running
-- `outbox-relay migrate` after a psql install, changes nothing.

CREATE SCHEMA IF NOT EXISTS outbox;

CREATE TABLE IF NOT EXISTS outbox.messages (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Becomes the AMQP message_id; consumers deduplicate on it.
    message_id      uuid        NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    -- AMQP short strings: at most 255 bytes.
    exchange        text        NOT NULL CHECK (octet_length(exchange) <= 255),
    routing_key     text        NOT NULL DEFAULT ''
                    CHECK (octet_length(routing_key) <= 255),
    payload         bytea       NOT NULL,
    content_type    text        NOT NULL DEFAULT 'application/json'
                    CHECK (octet_length(content_type) <= 255),
    headers         jsonb       NOT NULL DEFAULT '{}'
                    CHECK (jsonb_typeof(headers) = 'object'),
    -- Messages sharing a key are published one at a time, in id order.
    ordering_key    text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- Delivery state, written by the relay only.
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    locked_by       text,
    locked_until    timestamptz,
    published_at    timestamptz,
    dead_at         timestamptz
);

COMMENT ON TABLE outbox.messages IS
    'Transactional outbox: insert in the same transaction as your business rows; outbox-relay publishes to RabbitMQ.';

-- Finding work stays cheap however many published rows are kept: the index
-- holds pending rows only, and published or dead rows leave it.
CREATE INDEX IF NOT EXISTS messages_pending
    ON outbox.messages (id)
    WHERE published_at IS NULL AND dead_at IS NULL;

-- "Is an earlier message of this key still unpublished?" for per-key order.
-- Dead rows stay in it: a dead head blocks its key.
CREATE INDEX IF NOT EXISTS messages_pending_by_key
    ON outbox.messages (ordering_key, id)
    WHERE ordering_key IS NOT NULL AND published_at IS NULL;

-- Retention deletes published rows oldest first.
CREATE INDEX IF NOT EXISTS messages_published
    ON outbox.messages (published_at)
    WHERE published_at IS NOT NULL;

-- Per-key order needs ids in commit order among messages of one key, and a
-- sequence does not give that: T1 may take id 10, T2 id 11, and T2 commit
-- first, so a relay publishes 11 before 10 exists for it. Enqueuers of the
-- same key therefore queue on a transaction-level advisory lock and take
-- their id only once they hold it. Keyless messages skip this entirely.
CREATE OR REPLACE FUNCTION outbox.order_by_key() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(1869968483, hashtext(NEW.ordering_key));
    NEW.id := nextval(pg_get_serial_sequence('outbox.messages', 'id'));
    RETURN NEW;
END
$$;

DROP TRIGGER IF EXISTS order_by_key ON outbox.messages;
CREATE TRIGGER order_by_key
    BEFORE INSERT ON outbox.messages
    FOR EACH ROW WHEN (NEW.ordering_key IS NOT NULL)
    EXECUTE FUNCTION outbox.order_by_key();

-- The wake-up.
--
-- NOTIFY takes a cluster-wide lock at commit that is held across the WAL
-- flush, so notifying transactions cannot group-commit: one per row cuts an
-- app's write throughput to about a third. Here only one transaction at a
-- time, and only while no relay is draining, pays for it:
--
--  * A draining relay holds advisory lock (1869968482, 1) in SHARED mode
--    (outbox.begin_drain()); it will see every committed row anyway.
--  * At commit (a deferred constraint trigger, so the check is as late as it
--    can be) the writer tries the same lock in EXCLUSIVE mode without
--    waiting. That fails while any relay drains, and while another writer is
--    already sending the wake-up; it succeeds only when relays are idle.
--    The probe is a lock-table lookup in shared memory, not a query.
--  * Every listening relay holds lock (1869968482, 2) in SHARED mode for as
--    long as its LISTEN connection lives (outbox.announce_listener()). The
--    one writer that got this far tries it in EXCLUSIVE mode: success means
--    nobody listens (no relay, or relays in poll mode), so it skips NOTIFY.
--
-- The race left: a writer probes while a relay drains (no NOTIFY), the relay
-- finishes its last claim before that commit becomes visible, and goes idle.
-- The relay closes most of it by claiming once more shortly after going idle
-- (the commit window is one WAL flush); whatever is left is found by the
-- periodic sweep, so such a row waits at most one sweep interval.
CREATE OR REPLACE FUNCTION outbox.wake_relay() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF pg_try_advisory_xact_lock(1869968482, 1)
       AND NOT pg_try_advisory_xact_lock(1869968482, 2) THEN
        PERFORM pg_notify('outbox_wake', '');
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS wake_relay ON outbox.messages;
CREATE CONSTRAINT TRIGGER wake_relay
    AFTER INSERT ON outbox.messages
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION outbox.wake_relay();

-- Called by a relay on its listening connection, once after LISTEN.
CREATE OR REPLACE FUNCTION outbox.announce_listener() RETURNS void
LANGUAGE sql AS $$ SELECT pg_advisory_lock_shared(1869968482, 2) $$;

-- Called by a relay on its listening connection around each drain.
CREATE OR REPLACE FUNCTION outbox.begin_drain() RETURNS void
LANGUAGE sql AS $$ SELECT pg_advisory_lock_shared(1869968482, 1) $$;

CREATE OR REPLACE FUNCTION outbox.end_drain() RETURNS boolean
LANGUAGE sql AS $$ SELECT pg_advisory_unlock_shared(1869968482, 1) $$;

-- Enqueue from any language, inside the caller's transaction.
CREATE OR REPLACE FUNCTION outbox.enqueue(
    exchange     text,
    routing_key  text,
    payload      jsonb,
    headers      jsonb DEFAULT '{}',
    ordering_key text  DEFAULT NULL
) RETURNS uuid
LANGUAGE sql AS $$
    INSERT INTO outbox.messages
        (exchange, routing_key, payload, content_type, headers, ordering_key)
    VALUES
        (exchange, routing_key, convert_to(payload::text, 'UTF8'),
         'application/json', coalesce(headers, '{}'), ordering_key)
    RETURNING message_id
$$;

CREATE OR REPLACE FUNCTION outbox.enqueue_bytes(
    exchange     text,
    routing_key  text,
    payload      bytea,
    content_type text,
    headers      jsonb DEFAULT '{}',
    ordering_key text  DEFAULT NULL
) RETURNS uuid
LANGUAGE sql AS $$
    INSERT INTO outbox.messages
        (exchange, routing_key, payload, content_type, headers, ordering_key)
    VALUES
        (exchange, routing_key, payload, content_type,
         coalesce(headers, '{}'), ordering_key)
    RETURNING message_id
$$;

-- Views for people.
CREATE OR REPLACE VIEW outbox.pending AS
SELECT id, message_id, exchange, routing_key, ordering_key, content_type,
       created_at, now() - created_at AS age, attempts, next_attempt_at,
       last_error, locked_by, locked_until
FROM outbox.messages
WHERE published_at IS NULL AND dead_at IS NULL;

CREATE OR REPLACE VIEW outbox.dead_letters AS
SELECT id, message_id, exchange, routing_key, ordering_key, content_type,
       created_at, dead_at, attempts, last_error,
       CASE WHEN content_type LIKE '%json%'
            THEN convert_from(payload, 'UTF8') END AS payload_text
FROM outbox.messages
WHERE dead_at IS NOT NULL AND published_at IS NULL;

-- Give a dead letter another round of attempts once its cause is fixed.
CREATE OR REPLACE FUNCTION outbox.retry_dead(target uuid) RETURNS boolean
LANGUAGE sql AS $$
    WITH revived AS (
        UPDATE outbox.messages
        SET dead_at = NULL, attempts = 0, next_attempt_at = now(),
            locked_by = NULL, locked_until = NULL
        WHERE message_id = target AND dead_at IS NOT NULL
        RETURNING 1
    )
    SELECT count(*) = 1 FROM revived
$$;
