-- Scheduled delivery (issue 27): a message committed now and published at
-- a time the writer chose, cancellable until then. Plain SQL like V1:
-- idempotent, so running V1..V9 again ends where one run ends.
--
-- A writer sets outbox.messages.deliver_at (or passes deliver_at to
-- outbox.enqueue). A time not in the future means now. A future one sends
-- the row to outbox.scheduled instead (the trigger below), where it waits
-- out of every index the relay's claim reads: a million rows scheduled for
-- tomorrow cost the claim of today's rows nothing. When a row falls due a
-- relay moves it into outbox.messages (outbox.release_due) and publishes
-- it like any other; the relay knows the next due time and wakes for it.
--
-- Per-key order: a scheduled row joins its key when it falls due. Moving
-- it takes a fresh id under the key's lock (order_by_key), so it goes out
-- after the rows of its key already pending then, and before those
-- written later; rows of the key written meanwhile do not wait for it. A
-- reminder due tomorrow must not hold back today's events of its order.

ALTER TABLE outbox.messages ADD COLUMN IF NOT EXISTS deliver_at timestamptz;
-- The deliver_at of a row released from outbox.scheduled: its lag and its
-- lateness count from it. Set by outbox.release_due only (writers have no
-- INSERT right on it), so no setting a session could fake tells the
-- trigger below a release from a writer.
ALTER TABLE outbox.messages ADD COLUMN IF NOT EXISTS scheduled_for timestamptz;

COMMENT ON COLUMN outbox.messages.deliver_at IS
    'Set by a writer: publish at this time (null or past: now). A future row waits in outbox.scheduled instead; stored rows keep null here.';
COMMENT ON COLUMN outbox.messages.scheduled_for IS
    'The deliver_at of a message released from outbox.scheduled; written by the relay only.';

CREATE TABLE IF NOT EXISTS outbox.scheduled (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id    uuid        NOT NULL UNIQUE,
    exchange      text        NOT NULL CHECK (octet_length(exchange) <= 255),
    routing_key   text        NOT NULL CHECK (octet_length(routing_key) <= 255),
    payload       bytea       NOT NULL,
    content_type  text        NOT NULL CHECK (octet_length(content_type) <= 255),
    headers       jsonb       NOT NULL CHECK (jsonb_typeof(headers) = 'object'),
    ordering_key  text,
    -- Finite: 'infinity' is no time to wake for.
    deliver_at    timestamptz NOT NULL CHECK (isfinite(deliver_at)),
    created_at    timestamptz NOT NULL DEFAULT now(),
    -- Set by outbox.cancel, or by the relay when the row could not be
    -- released (`refused` says why); retention deletes such rows.
    cancelled_at  timestamptz,
    refused       text
);

COMMENT ON TABLE outbox.scheduled IS
    'Messages waiting for their deliver_at; the relay moves each into outbox.messages when due. Write through outbox.messages or outbox.enqueue, never here.';

-- The next due row, and the due ones in order, without walking the rest.
CREATE INDEX IF NOT EXISTS scheduled_due
    ON outbox.scheduled (deliver_at, id) WHERE cancelled_at IS NULL;
-- Retention deletes cancelled rows oldest first.
CREATE INDEX IF NOT EXISTS scheduled_cancelled
    ON outbox.scheduled (cancelled_at) WHERE cancelled_at IS NOT NULL;

-- How far ahead a writer may schedule: the setting outbox.schedule_horizon
-- (ALTER DATABASE app SET outbox.schedule_horizon = '2 years'), 1 year
-- when unset. A time further out is almost always a bug (a unit mixed up):
-- a guard against mistakes, not a limit on a session, which may set it.
CREATE OR REPLACE FUNCTION outbox.schedule_horizon() RETURNS interval
LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('outbox.schedule_horizon', true), ''), '1 year')::interval
$$;

-- Refuses a time beyond the horizon; wakes the relays when the time is
-- near, since they learn farther ones at their next look (every second).
-- The NOTIFY costs the writer's commit its grouping, so only rows due
-- within 2 s pay it.
CREATE OR REPLACE FUNCTION outbox.schedule_check(deliver_at timestamptz) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT isfinite(deliver_at) OR deliver_at > now() + outbox.schedule_horizon() THEN
        RAISE EXCEPTION 'outbox.scheduled: deliver_at is more than % ahead (raise the setting outbox.schedule_horizon to allow it)',
            outbox.schedule_horizon()
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF deliver_at < now() + interval '2 seconds' THEN
        PERFORM pg_notify('outbox_wake', 'schedule');
    END IF;
END
$$;

-- BEFORE INSERT on outbox.messages, only for rows with a deliver_at (the
-- WHEN below: other rows pay nothing). Runs as the schema's owner, so
-- writers need no rights on outbox.scheduled. Sorted before order_by_key
-- by name, so a scheduled row takes no key lock and no id now.
CREATE OR REPLACE FUNCTION outbox.defer_scheduled() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NEW.deliver_at <= now() THEN
        NEW.deliver_at := NULL;
        RETURN NEW;
    END IF;
    PERFORM outbox.schedule_check(NEW.deliver_at);
    -- A message_id names one message in either table.
    IF EXISTS (SELECT 1 FROM outbox.messages m WHERE m.message_id = NEW.message_id) THEN
        RAISE EXCEPTION 'outbox.scheduled: the message_id is already in outbox.messages'
            USING ERRCODE = 'unique_violation';
    END IF;
    INSERT INTO outbox.scheduled
        (message_id, exchange, routing_key, payload, content_type, headers, ordering_key, deliver_at)
    VALUES
        (NEW.message_id, NEW.exchange, NEW.routing_key, NEW.payload, NEW.content_type,
         NEW.headers, NEW.ordering_key, NEW.deliver_at);
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION outbox.defer_scheduled() FROM PUBLIC;

DROP TRIGGER IF EXISTS defer_scheduled ON outbox.messages;
CREATE TRIGGER defer_scheduled
    BEFORE INSERT ON outbox.messages
    FOR EACH ROW WHEN (NEW.deliver_at IS NOT NULL)
    EXECUTE FUNCTION outbox.defer_scheduled();

-- Called by the relays: moves up to max_rows due rows into outbox.messages
-- (several relays at once each move different rows), and says how many
-- it moved, how many it could not (their message_id was taken meanwhile:
-- they are marked refused, never silently dropped), and in how many
-- seconds the next row falls due (null: none scheduled; 0 or less: due
-- now, perhaps held by another relay's release or a writer's cancel).
CREATE OR REPLACE FUNCTION outbox.release_due(max_rows integer,
    OUT released bigint, OUT refused bigint, OUT next_due_in float8)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- A keyed row is moved only if its key's lock (order_by_key's) is free
    -- now: a writer holding it in a long transaction must not stall the
    -- relay; the row stays due and is tried again at the next look. The
    -- lock is tried on the first max_rows due rows only (a plan that
    -- sorted every due row would try, and take, a lock per key of all).
    WITH candidates AS MATERIALIZED (
        SELECT s.id, s.ordering_key FROM outbox.scheduled s
        WHERE s.cancelled_at IS NULL AND s.deliver_at <= now()
        ORDER BY s.deliver_at, s.id LIMIT max_rows
    ), due AS (
        SELECT s.id FROM outbox.scheduled s JOIN candidates c USING (id)
        WHERE s.cancelled_at IS NULL
          AND (c.ordering_key IS NULL
               OR pg_try_advisory_xact_lock(1869968483, hashtext(c.ordering_key)))
        FOR UPDATE OF s SKIP LOCKED
    ), moved AS (
        INSERT INTO outbox.messages
            (message_id, exchange, routing_key, payload, content_type, headers,
             ordering_key, scheduled_for)
        SELECT s.message_id, s.exchange, s.routing_key, s.payload, s.content_type,
               s.headers, s.ordering_key, s.deliver_at
        FROM outbox.scheduled s JOIN due USING (id)
        ORDER BY s.deliver_at, s.id
        ON CONFLICT (message_id) DO NOTHING
        RETURNING message_id
    ), gone AS (
        DELETE FROM outbox.scheduled s USING moved
        WHERE s.message_id = moved.message_id
        RETURNING s.id
    ), kept AS (
        UPDATE outbox.scheduled s
        SET cancelled_at = now(), refused = 'its message_id was already in outbox.messages when it fell due'
        FROM due
        WHERE s.id = due.id AND NOT EXISTS (SELECT 1 FROM moved WHERE moved.message_id = s.message_id)
        RETURNING s.id
    )
    SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM kept)
    INTO released, refused;
    next_due_in := extract(epoch FROM (
        SELECT s.deliver_at FROM outbox.scheduled s WHERE s.cancelled_at IS NULL
        ORDER BY s.deliver_at, s.id LIMIT 1) - now());
END
$$;
REVOKE ALL ON FUNCTION outbox.release_due(integer) FROM PUBLIC;

-- Cancels a scheduled message for good: true when it was still waiting
-- and now never will be published; false when it already fell due
-- (released to the relay), was cancelled before, or is unknown. Inside
-- the caller's transaction: a rollback undoes it.
CREATE OR REPLACE FUNCTION outbox.cancel(message_id uuid) RETURNS boolean
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH cancelled AS (
        UPDATE outbox.scheduled s SET cancelled_at = now()
        WHERE s.message_id = cancel.message_id AND s.cancelled_at IS NULL
        RETURNING 1
    )
    SELECT count(*) = 1 FROM cancelled
$$;
REVOKE ALL ON FUNCTION outbox.cancel(uuid) FROM PUBLIC;

-- Moves a scheduled message to another time (null or past: now), with
-- the same answers as cancel and the horizon of an enqueue.
CREATE OR REPLACE FUNCTION outbox.reschedule(message_id uuid, deliver_at timestamptz)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    due timestamptz := greatest(coalesce(reschedule.deliver_at, now()), now());
BEGIN
    PERFORM outbox.schedule_check(due);
    UPDATE outbox.scheduled s SET deliver_at = due
    WHERE s.message_id = reschedule.message_id AND s.cancelled_at IS NULL;
    RETURN FOUND;
END
$$;
REVOKE ALL ON FUNCTION outbox.reschedule(uuid, timestamptz) FROM PUBLIC;

-- What waits, for people: cancelled and refused rows too, as such.
CREATE OR REPLACE VIEW outbox.scheduled_messages AS
SELECT message_id, exchange, routing_key, ordering_key, content_type, created_at,
       deliver_at, deliver_at - now() AS due_in,
       CASE WHEN refused IS NOT NULL THEN 'refused'
            WHEN cancelled_at IS NOT NULL THEN 'cancelled'
            ELSE 'scheduled' END AS state,
       cancelled_at, refused
FROM outbox.scheduled;

-- The enqueue functions gain deliver_at. A new parameter makes a new
-- function, and the old one beside it would make every call without
-- deliver_at ambiguous: the old ones go. Whoever could call them may call
-- the new ones: PUBLIC by default, and the writers granted below.
DROP FUNCTION IF EXISTS outbox.enqueue(text, text, jsonb, jsonb, text);
DROP FUNCTION IF EXISTS outbox.enqueue_bytes(text, text, bytea, text, jsonb, text);

-- As V1's, plus deliver_at. Without one, the very INSERT of V1 (a
-- writer needs no right on deliver_at for it: column rights are checked
-- on the columns an INSERT names). With one, the id is made here: a
-- scheduled row is not in outbox.messages, so RETURNING has none.
CREATE OR REPLACE FUNCTION outbox.enqueue(
    exchange     text,
    routing_key  text,
    payload      jsonb,
    headers      jsonb       DEFAULT '{}',
    ordering_key text        DEFAULT NULL,
    deliver_at   timestamptz DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql AS $$
BEGIN
    RETURN outbox.enqueue_bytes(exchange, routing_key, convert_to(payload::text, 'UTF8'),
                                'application/json', headers, ordering_key, deliver_at);
END
$$;

CREATE OR REPLACE FUNCTION outbox.enqueue_bytes(
    exchange     text,
    routing_key  text,
    payload      bytea,
    content_type text,
    headers      jsonb       DEFAULT '{}',
    ordering_key text        DEFAULT NULL,
    deliver_at   timestamptz DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    id uuid;
BEGIN
    IF enqueue_bytes.deliver_at IS NULL THEN
        INSERT INTO outbox.messages AS m
            (exchange, routing_key, payload, content_type, headers, ordering_key)
        VALUES
            (enqueue_bytes.exchange, enqueue_bytes.routing_key, enqueue_bytes.payload,
             enqueue_bytes.content_type, coalesce(enqueue_bytes.headers, '{}'),
             enqueue_bytes.ordering_key)
        RETURNING m.message_id INTO id;
        RETURN id;
    END IF;
    id := gen_random_uuid();
    INSERT INTO outbox.messages
        (message_id, exchange, routing_key, payload, content_type, headers, ordering_key, deliver_at)
    VALUES
        (id, enqueue_bytes.exchange, enqueue_bytes.routing_key, enqueue_bytes.payload,
         enqueue_bytes.content_type, coalesce(enqueue_bytes.headers, '{}'),
         enqueue_bytes.ordering_key, enqueue_bytes.deliver_at);
    RETURN id;
END
$$;

-- Writers: V7's grant, plus deliver_at, cancel and reschedule. Keep the
-- column list in step with the DO block below.
CREATE OR REPLACE FUNCTION outbox.grant_writer(grantee regrole) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA outbox TO %s', grantee);
    IF grantee::oid <> (SELECT relowner FROM pg_class WHERE oid = 'outbox.messages'::regclass) THEN
        EXECUTE format('REVOKE INSERT ON outbox.messages FROM %s', grantee);
    END IF;
    EXECUTE format('GRANT INSERT (exchange, routing_key, payload, content_type, headers, '
                   'ordering_key, message_id, deliver_at), SELECT (message_id) ON outbox.messages TO %s', grantee);
    EXECUTE format('GRANT USAGE ON SEQUENCE %s TO %s',
                   pg_get_serial_sequence('outbox.messages', 'id'), grantee);
    EXECUTE format('GRANT EXECUTE ON FUNCTION outbox.enqueue(text, text, jsonb, jsonb, text, timestamptz), '
                   'outbox.enqueue_bytes(text, text, bytea, text, jsonb, text, timestamptz), '
                   'outbox.cancel(uuid), outbox.reschedule(uuid, timestamptz) TO %s', grantee);
END
$$;

-- Existing writers: every role (PUBLIC too) but the owner and the capture
-- owners that may insert into outbox.messages, with table or column rights.
DO $$
DECLARE
    grantee text;
BEGIN
    FOR grantee IN
        SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END
        FROM pg_class c
        CROSS JOIN LATERAL aclexplode(c.relacl) AS a
        LEFT JOIN pg_roles r ON r.oid = a.grantee
        WHERE c.oid = 'outbox.messages'::regclass
          AND a.privilege_type = 'INSERT' AND a.grantee <> c.relowner
          AND coalesce(r.rolname, '') !~ '^outbox_capture(_[0-9]+_[0-9]+)?$'
        UNION
        SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END
        FROM pg_attribute att
        CROSS JOIN LATERAL aclexplode(att.attacl) AS a
        LEFT JOIN pg_roles r ON r.oid = a.grantee
        WHERE att.attrelid = 'outbox.messages'::regclass AND att.attname = 'exchange'
          AND a.privilege_type = 'INSERT'
          AND a.grantee <> (SELECT relowner FROM pg_class WHERE oid = 'outbox.messages'::regclass)
          -- Capture owners (V5's shared role, V7's own) insert what their
          -- trigger builds: no more.
          AND coalesce(r.rolname, '') !~ '^outbox_capture(_[0-9]+_[0-9]+)?$'
    LOOP
        EXECUTE format('GRANT INSERT (deliver_at) ON outbox.messages TO %s', grantee);
        EXECUTE format('GRANT EXECUTE ON FUNCTION '
                       'outbox.enqueue(text, text, jsonb, jsonb, text, timestamptz), '
                       'outbox.enqueue_bytes(text, text, bytea, text, jsonb, text, timestamptz), '
                       'outbox.cancel(uuid), outbox.reschedule(uuid, timestamptz) TO %s', grantee);
    END LOOP;
END
$$;

-- Relays release due rows and read and clean outbox.scheduled. Those
-- granted before this file (every role but the owner that may UPDATE
-- outbox.messages) get the same, so an upgrade needs no grant_relay call.
DO $$
DECLARE
    relay regrole;
BEGIN
    FOR relay IN
        SELECT DISTINCT acl.grantee::regrole
        FROM pg_class c, aclexplode(c.relacl) acl
        WHERE c.oid = 'outbox.messages'::regclass
          AND acl.privilege_type = 'UPDATE'
          AND acl.grantee <> 0
          AND acl.grantee <> c.relowner
    LOOP
        EXECUTE format('GRANT SELECT, UPDATE, DELETE ON outbox.scheduled TO %s', relay);
        EXECUTE format('GRANT SELECT ON outbox.scheduled_messages TO %s', relay);
        EXECUTE format('GRANT EXECUTE ON FUNCTION outbox.release_due(integer), '
                       'outbox.cancel(uuid), outbox.reschedule(uuid, timestamptz) TO %s', relay);
    END LOOP;
END
$$;
