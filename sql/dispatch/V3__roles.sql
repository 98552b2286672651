-- Least privilege for the consumer: its own tables in schema `dispatch` and
-- nothing else. Create the role first (needs CREATEROLE, see README "Least
-- privilege"), then, as the owner of the schema (the role that runs
-- `dispatch migrate`):
--     SELECT dispatch.grant_consumer('dispatch_consumer');
-- Idempotent; default privileges cover tables later migrations add when
-- the same owner runs them. The consumer reads the migration history (its
-- start-up checks that the schema is current and then changes nothing),
-- but cannot rewrite it, and cannot create or drop anything.
CREATE OR REPLACE FUNCTION dispatch.grant_consumer(grantee regrole) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA dispatch TO %s', grantee);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA dispatch TO %s', grantee);
    EXECUTE format('GRANT USAGE ON ALL SEQUENCES IN SCHEMA dispatch TO %s', grantee);
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA dispatch '
                   'GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO %s', grantee);
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA dispatch '
                   'GRANT USAGE ON SEQUENCES TO %s', grantee);
    IF to_regclass('dispatch.schema_history') IS NOT NULL THEN
        EXECUTE format('REVOKE INSERT, UPDATE, DELETE ON dispatch.schema_history FROM %s', grantee);
    END IF;
END
$$;
