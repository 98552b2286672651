-- The audit trail of the operator's changes (issue 28): every requeue,
-- discard, replay and capture change, and every dry run, made through
-- `outbox-relay` commands, the console or its API, is a row here: when,
-- who (a token's name or the OS user), through what, the action, its
-- filter, how many rows matched and how many changed. Rows are only ever
-- added: no role but the owner may alter or delete them.
CREATE TABLE IF NOT EXISTS outbox.admin_log (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at       timestamptz NOT NULL DEFAULT now(),
    actor    text NOT NULL,
    via      text NOT NULL CHECK (via IN ('cli', 'console', 'api')),
    action   text NOT NULL,
    dry_run  boolean NOT NULL,
    filter   jsonb NOT NULL DEFAULT '{}',
    matched  bigint,
    changed  bigint,
    -- Set when the action stopped part way (changed says how far it got).
    error    text,
    -- The database role that made the change.
    db_role  text NOT NULL DEFAULT current_user
);

COMMENT ON TABLE outbox.admin_log IS
    'Operator changes (requeue, discard, replay, capture) and dry runs: append-only.';

-- Default privileges (grant_relay's) give new tables UPDATE and DELETE:
-- taken back from every role but the owner. The relays granted before this
-- file may write the trail (the operator commands often run as the relay's
-- role).
DO $$
DECLARE
    holder regrole;
BEGIN
    REVOKE UPDATE, DELETE, TRUNCATE ON outbox.admin_log FROM PUBLIC;
    FOR holder IN
        SELECT DISTINCT acl.grantee::regrole
        FROM pg_class c, aclexplode(c.relacl) acl
        WHERE c.oid = 'outbox.admin_log'::regclass
          AND acl.grantee <> 0 AND acl.grantee <> c.relowner
    LOOP
        EXECUTE format('REVOKE UPDATE, DELETE, TRUNCATE ON outbox.admin_log FROM %s', holder);
    END LOOP;
    FOR holder IN
        SELECT DISTINCT acl.grantee::regrole
        FROM pg_class c, aclexplode(c.relacl) acl
        WHERE c.oid = 'outbox.messages'::regclass
          AND acl.privilege_type = 'UPDATE'
          AND acl.grantee <> 0 AND acl.grantee <> c.relowner
    LOOP
        EXECUTE format('GRANT SELECT, INSERT ON outbox.admin_log TO %s', holder);
    END LOOP;
END
$$;

-- As V8's, plus writing the audit trail, which it may not rewrite.
CREATE OR REPLACE FUNCTION outbox.grant_relay(grantee regrole) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA outbox TO %s', grantee);
    EXECUTE format('GRANT SELECT, UPDATE, DELETE ON ALL TABLES IN SCHEMA outbox TO %s', grantee);
    EXECUTE format('GRANT INSERT ON outbox.key_sequences, outbox.admin_log TO %s', grantee);
    EXECUTE format('GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA outbox TO %s', grantee);
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA outbox '
                   'GRANT SELECT, UPDATE, DELETE ON TABLES TO %s', grantee);
    IF to_regclass('outbox.schema_history') IS NOT NULL THEN
        EXECUTE format('REVOKE UPDATE, DELETE ON outbox.schema_history FROM %s', grantee);
    END IF;
    EXECUTE format('REVOKE UPDATE, DELETE, TRUNCATE ON outbox.admin_log FROM %s', grantee);
END
$$;

-- The console's role (`outbox-relay console`): it reads the outbox, and
-- changes delivery state only as the operator commands do: requeue
-- (outbox.retry_dead) and replay update the delivery columns, discard
-- deletes dead letters and takes back their keys' numbers. It may add to
-- the audit trail, never rewrite it, and cannot insert messages, read
-- other schemas or change a capture. Idempotent.
CREATE OR REPLACE FUNCTION outbox.grant_console(grantee regrole) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA outbox TO %s', grantee);
    EXECUTE format('GRANT SELECT ON outbox.messages, outbox.pending, outbox.dead_letters, '
                   'outbox.scheduled, outbox.scheduled_messages, outbox.captures, '
                   'outbox.key_sequences, outbox.admin_log TO %s', grantee);
    EXECUTE format('GRANT UPDATE (published_at, dead_at, attempts, last_error, next_attempt_at, '
                   'locked_by, locked_until, replayed_at) ON outbox.messages TO %s', grantee);
    EXECUTE format('GRANT DELETE ON outbox.messages TO %s', grantee);
    EXECUTE format('GRANT UPDATE (last) ON outbox.key_sequences TO %s', grantee);
    EXECUTE format('GRANT INSERT ON outbox.admin_log TO %s', grantee);
    EXECUTE format('GRANT EXECUTE ON FUNCTION outbox.retry_dead(uuid) TO %s', grantee);
END
$$;
REVOKE ALL ON FUNCTION outbox.grant_console(regrole) FROM PUBLIC;
