-- Per-key sequence numbers and pipelined keys (issue 15). Plain SQL like
-- V1: idempotent.
--
-- A relay now publishes a key's consecutive pending rows together instead
-- of one head per confirm, so a failed publish of row n can land after
-- n + 1. Consumers restore the order with a number per key that has no
-- gaps: `key_seq`, published as `x-outbox-seq`. The relay stamps it when it
-- first claims a row, never the writer: the write path is untouched, and
-- under REPEATABLE READ a counter bumped by the app's transaction would
-- fail with a serialization error whenever two writers of a key overlap.
-- A key's rows are claimed as a prefix of its pending rows (its head and
-- the rows right after it), so numbers follow id order, which is the key's
-- commit order (see order_by_key). A row keeps its number when it is given
-- back, retried, requeued or replayed.
--
-- outbox.key_sequences holds the last number given per key. It grows with
-- the number of keys, not messages, and is never pruned: a key that
-- started again at 1 would look like a replay to its consumers.

ALTER TABLE outbox.messages ADD COLUMN IF NOT EXISTS key_seq bigint;

-- Claims now find keyed heads key by key on messages_pending_by_key, and
-- keyless rows here: filtering messages_pending for them walked every
-- pending keyed row (45 ms a claim behind 150,000 of them). A keyless row
-- is in this index as well as in messages_pending (which the gauges and
-- the status command read).
CREATE INDEX IF NOT EXISTS messages_pending_keyless
    ON outbox.messages (id)
    WHERE ordering_key IS NULL AND published_at IS NULL AND dead_at IS NULL;

CREATE TABLE IF NOT EXISTS outbox.key_sequences (
    ordering_key text   PRIMARY KEY,
    last         bigint NOT NULL
);

COMMENT ON TABLE outbox.key_sequences IS
    'The last x-outbox-seq the relay gave each ordering key; written by the relay only.';

-- The relay inserts a key's first number. As V3's, plus INSERT on that
-- table.
CREATE OR REPLACE FUNCTION outbox.grant_relay(grantee regrole) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA outbox TO %s', grantee);
    EXECUTE format('GRANT SELECT, UPDATE, DELETE ON ALL TABLES IN SCHEMA outbox TO %s', grantee);
    EXECUTE format('GRANT INSERT ON outbox.key_sequences TO %s', grantee);
    EXECUTE format('GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA outbox TO %s', grantee);
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA outbox '
                   'GRANT SELECT, UPDATE, DELETE ON TABLES TO %s', grantee);
    IF to_regclass('outbox.schema_history') IS NOT NULL THEN
        EXECUTE format('REVOKE UPDATE, DELETE ON outbox.schema_history FROM %s', grantee);
    END IF;
END
$$;

-- Relays granted before this file (every role but the owner that may
-- UPDATE outbox.messages) get the same rights on the new table, so an
-- upgrade needs no grant_relay call.
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
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON outbox.key_sequences TO %s', relay);
    END LOOP;
END
$$;
