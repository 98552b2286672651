-- Least privilege: grant a role exactly what it needs inside schema `outbox`
-- and nothing outside it. Create the roles first (that needs CREATEROLE,
-- see README "Least privilege"), then, as the owner of the schema (the role
-- that runs `outbox-relay migrate`):
--     SELECT outbox.grant_relay('outbox_relay');   -- the relay
--     SELECT outbox.grant_writer('orders_app');    -- an app that enqueues
-- Both are idempotent. They also set default privileges for the calling
-- role, so tables that later migrations add (run by the same owner) are
-- covered without calling them again.

-- The relay: claim, lease, mark and retry (SELECT, UPDATE), retention and
-- `dead discard` (DELETE), the views and functions. It never inserts, and
-- it may read but not rewrite the migration history.
CREATE OR REPLACE FUNCTION outbox.grant_relay(grantee regrole) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA outbox TO %s', grantee);
    EXECUTE format('GRANT SELECT, UPDATE, DELETE ON ALL TABLES IN SCHEMA outbox TO %s', grantee);
    EXECUTE format('GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA outbox TO %s', grantee);
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA outbox '
                   'GRANT SELECT, UPDATE, DELETE ON TABLES TO %s', grantee);
    IF to_regclass('outbox.schema_history') IS NOT NULL THEN
        EXECUTE format('REVOKE UPDATE, DELETE ON outbox.schema_history FROM %s', grantee);
    END IF;
END
$$;

-- An application that enqueues: INSERT, and SELECT of message_id alone
-- (INSERT ... RETURNING message_id is how enqueue answers); the sequence,
-- because keyed messages take their id with nextval() at commit order.
-- It cannot read other messages' payloads or change delivery state.
CREATE OR REPLACE FUNCTION outbox.grant_writer(grantee regrole) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA outbox TO %s', grantee);
    EXECUTE format('GRANT INSERT, SELECT (message_id) ON outbox.messages TO %s', grantee);
    EXECUTE format('GRANT USAGE ON ALL SEQUENCES IN SCHEMA outbox TO %s', grantee);
    EXECUTE format('GRANT EXECUTE ON FUNCTION outbox.enqueue(text, text, jsonb, jsonb, text), '
                   'outbox.enqueue_bytes(text, text, bytea, text, jsonb, text) TO %s', grantee);
END
$$;
