-- Hostile roles (issue 13). Earlier files are released, so what they
-- defined is replaced here. Plain SQL like V1: every statement is
-- idempotent, and running V1..V7 again (as psql installs do) ends where
-- one run ends.
--
-- 1. Delivery state belongs to the relay. V3's grant_writer granted INSERT
--    on every column, and V5 did the same for outbox_capture: a writer (or
--    code running inside a capture) could insert a row already published
--    (never sent), dead or leased until 'infinity' (with an ordering key,
--    either blocks the app's later messages of that key for good), or set
--    attempts, next_attempt_at, last_error, replayed_at, id, created_at.
--    Writers and capture owners now get INSERT on the columns an enqueue
--    sets only: exchange, routing_key, payload, content_type, headers,
--    ordering_key and message_id (an app may pick its own message_id as an
--    idempotency key: it is UNIQUE, and consumers deduplicate on it). The
--    rest take their defaults. Column privileges are checked once per
--    statement, like table privileges: nothing per row.
--    Existing grants are rewritten below: every role but the table's owner
--    that holds table-level INSERT on outbox.messages gets exactly those
--    columns instead, so `outbox-relay migrate` makes old installs safe
--    without calling grant_writer again.
-- 2. One owner per captured table. V5 had every generated capture function
--    owned by outbox_capture, so a table owner's code running inside its
--    own capture (a cast in a template, see V5) ran as the owner of every
--    other table's capture function and could ALTER it or DROP it CASCADE
--    (taking that table's trigger along). Each capture function is now
--    owned by a NOLOGIN role of its own, outbox_capture_<database
--    oid>_<table oid> (the database's oid because roles belong to the
--    cluster), with no attributes, member of no role, whose only rights are
--    the column INSERT of 1 and the id sequence (order_by_key takes ids as
--    the current user). Such code can at worst insert a fresh message or
--    rewrite its own table's capture, which its owner may drop anyway.
--    capture creates the role (that takes CREATEROLE or superuser) or uses
--    one an admin made beforehand under that name; otherwise it refuses in
--    one line that says what to run. capture_remove drops the role.
--    Existing captures are handed to their tables' roles below when the
--    migrating role may create roles; otherwise they keep running as
--    outbox_capture (with 1's column INSERT only) and a WARNING says to
--    capture those tables again once the roles exist.
-- 3. outbox.dead_letters converted every JSON payload with convert_from,
--    which fails on bytes that are not UTF-8 (enqueue_bytes takes any),
--    so SELECT * failed for all dead letters. payload_text is now NULL for
--    such a payload; the columns are V1's, so V1 may run again.

-- 1. ---------------------------------------------------------------------

-- Keep the column list in step with outbox.capture_owner and the DO block
-- below.
CREATE OR REPLACE FUNCTION outbox.grant_writer(grantee regrole) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA outbox TO %s', grantee);
    -- What V3 granted; not from the owner, whose rights these are.
    IF grantee::oid <> (SELECT relowner FROM pg_class WHERE oid = 'outbox.messages'::regclass) THEN
        EXECUTE format('REVOKE INSERT ON outbox.messages FROM %s', grantee);
    END IF;
    EXECUTE format('GRANT INSERT (exchange, routing_key, payload, content_type, headers, '
                   'ordering_key, message_id), SELECT (message_id) ON outbox.messages TO %s', grantee);
    EXECUTE format('GRANT USAGE ON SEQUENCE %s TO %s',
                   pg_get_serial_sequence('outbox.messages', 'id'), grantee);
    EXECUTE format('GRANT EXECUTE ON FUNCTION outbox.enqueue(text, text, jsonb, jsonb, text), '
                   'outbox.enqueue_bytes(text, text, bytea, text, jsonb, text) TO %s', grantee);
END
$$;

-- Table-level INSERT held by anyone but the owner (writers granted by V3,
-- outbox_capture by V5, hand-made grants, PUBLIC) becomes column INSERT.
-- REVOKE of the table privilege also takes any column privileges, so the
-- columns are granted after it.
DO $$
DECLARE
    grantee text;
BEGIN
    FOR grantee IN
        SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                             ELSE quote_ident(r.rolname) END
        FROM pg_class c
        CROSS JOIN LATERAL aclexplode(c.relacl) AS a
        LEFT JOIN pg_roles r ON r.oid = a.grantee
        WHERE c.oid = 'outbox.messages'::regclass
          AND a.privilege_type = 'INSERT' AND a.grantee <> c.relowner
    LOOP
        EXECUTE format('REVOKE INSERT ON outbox.messages FROM %s CASCADE', grantee);
        EXECUTE format('GRANT INSERT (exchange, routing_key, payload, content_type, headers, '
                       'ordering_key, message_id) ON outbox.messages TO %s', grantee);
    END LOOP;
END
$$;

-- 2. ---------------------------------------------------------------------

-- The role that owns `source`'s capture function, ready to own it: made
-- if missing (when the caller may create roles), checked to be a bare
-- NOLOGIN role, the caller made a member (to hand it the function), and
-- given exactly its rights. Raises one line saying what an admin runs when
-- the caller cannot do that itself.
CREATE OR REPLACE FUNCTION outbox.capture_owner(source regclass) RETURNS name
LANGUAGE plpgsql AS $$
DECLARE
    role_name  name := format('outbox_capture_%s_%s',
                              (SELECT oid FROM pg_database WHERE datname = current_database()),
                              source::oid);
    may_create boolean := (SELECT rolsuper OR rolcreaterole FROM pg_roles
                           WHERE rolname = current_user);
    r          record;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = role_name) AND may_create THEN
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN', role_name);
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL; -- made by a concurrent capture just now
        END;
    END IF;
    SELECT * INTO r FROM pg_roles WHERE rolname = role_name;
    IF FOUND AND NOT pg_has_role(role_name, 'MEMBER') AND may_create THEN
        EXECUTE format('GRANT %I TO %I', role_name, current_user);
    END IF;
    IF NOT FOUND OR NOT pg_has_role(role_name, 'MEMBER') THEN
        RAISE EXCEPTION 'outbox.capture: the capture of % is owned by role %, which role % may neither create nor use (as an admin: CREATE ROLE % NOLOGIN; GRANT % TO %; or capture as a role with CREATEROLE)',
            source, role_name, quote_ident(current_user), role_name, role_name, quote_ident(current_user)
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF r.rolcanlogin OR r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolreplication
       OR r.rolbypassrls OR EXISTS (SELECT 1 FROM pg_auth_members WHERE member = r.oid) THEN
        RAISE EXCEPTION 'outbox.capture: role % is to own the capture of % but is not a bare NOLOGIN role (it may log in, has attributes or is a member of other roles)',
            role_name, source
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA outbox TO %I', role_name);
    EXECUTE format('REVOKE ALL ON outbox.messages FROM %I', role_name);
    EXECUTE format('GRANT INSERT (exchange, routing_key, payload, content_type, headers, '
                   'ordering_key, message_id) ON outbox.messages TO %I', role_name);
    EXECUTE format('GRANT USAGE ON SEQUENCE %s TO %I',
                   pg_get_serial_sequence('outbox.messages', 'id'), role_name);
    RETURN role_name;
END
$$;

-- Drops a capture owner that owns nothing in this database any more: its
-- rights here first, then the role. It stays when it still owns something
-- here or in another database (a copy of this one), or when the caller may
-- not drop roles; it has no rights left here then, and says so.
CREATE OR REPLACE FUNCTION outbox.capture_owner_drop(role_name name) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF role_name !~ '^outbox_capture_[0-9]+_[0-9]+$'
       OR NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = role_name)
       OR EXISTS (SELECT 1 FROM pg_shdepend d JOIN pg_roles r ON r.oid = d.refobjid
                  WHERE r.rolname = role_name AND d.deptype = 'o'
                    AND d.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())) THEN
        RETURN;
    END IF;
    EXECUTE format('REVOKE ALL ON outbox.messages FROM %I', role_name);
    EXECUTE format('REVOKE ALL ON SEQUENCE %s FROM %I',
                   pg_get_serial_sequence('outbox.messages', 'id'), role_name);
    EXECUTE format('REVOKE ALL ON SCHEMA outbox FROM %I', role_name);
    BEGIN
        EXECUTE format('DROP ROLE %I', role_name);
    EXCEPTION WHEN insufficient_privilege OR dependent_objects_still_exist THEN
        RAISE NOTICE 'outbox: role % owns no capture here any more but was not dropped (%): DROP ROLE % as an admin',
            role_name, SQLERRM, role_name;
    END;
END
$$;

-- V5's helper gave outbox_capture table-level INSERT; nothing calls it now.
DROP FUNCTION IF EXISTS outbox.capture_role_ready();

-- Starts (or changes) capturing `source`. Returns true when it created or
-- changed the capture, false when the same capture was already in place.
-- As V5's, but the function's owner is the table's own role.
CREATE OR REPLACE FUNCTION outbox.capture(
    source       regclass,
    exchange     text,
    routing_key  text   DEFAULT '{table}.{op}',
    ordering_key text   DEFAULT NULL,
    operations   text[] DEFAULT '{insert,update,delete}',
    columns      text[] DEFAULT NULL
) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    rel        record;
    qualified  text;
    ops        text[];
    options    jsonb;
    existing   record;
    had_one    boolean;
    fn_name    text := 'capture_' || source::oid;
    fn_owner   name;
    n          integer := 0;
    body       text := '';
    op         text;
    row_var    text;
BEGIN
    SELECT c.relkind, c.relname, n.nspname INTO rel
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = source;
    qualified := rel.nspname || '.' || rel.relname;
    IF rel.relkind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION 'outbox.capture: % is not a table', source
            USING ERRCODE = 'wrong_object_type';
    END IF;
    IF rel.nspname = 'outbox' THEN
        RAISE EXCEPTION 'outbox.capture: % belongs to the outbox itself', source
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The payload publishes every row's data, so whoever captures a table
    -- must be allowed to read it (and to put a trigger on it).
    IF NOT has_table_privilege(source, 'SELECT') OR NOT has_table_privilege(source, 'TRIGGER') THEN
        RAISE EXCEPTION 'outbox.capture: role % cannot read table % (it needs SELECT and TRIGGER: GRANT SELECT, TRIGGER ON % TO %)',
            quote_ident(current_user), source, source, quote_ident(current_user)
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF exchange IS NULL OR octet_length(exchange) > 255 THEN
        RAISE EXCEPTION 'outbox.capture: exchange must be given and at most 255 bytes'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF routing_key IS NULL THEN
        RAISE EXCEPTION 'outbox.capture: routing key template must not be null (use '''' for none)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    SELECT array_agg(o ORDER BY array_position('{insert,update,delete}'::text[], o))
    INTO ops
    FROM (SELECT DISTINCT lower(trim(o)) AS o FROM unnest(operations) AS o) AS u;
    IF ops IS NULL OR NOT ops <@ '{insert,update,delete}'::text[] THEN
        RAISE EXCEPTION 'outbox.capture: operations must be some of insert, update, delete (got %)',
            coalesce(array_to_string(operations, ', '), 'none')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    IF cardinality(columns) = 0 THEN
        RAISE EXCEPTION 'outbox.capture: the column list is empty (pass null for the whole row)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR op IN SELECT c FROM unnest(columns) AS c
              WHERE NOT EXISTS (SELECT 1 FROM pg_attribute
                                WHERE attrelid = source AND attname = c
                                  AND attnum > 0 AND NOT attisdropped)
    LOOP
        RAISE EXCEPTION 'outbox.capture: table % has no column "%"', source, op
            USING ERRCODE = 'invalid_parameter_value';
    END LOOP;

    -- A key that names no column is one key for the whole table: every
    -- writer of the table would queue behind every other.
    IF ordering_key = '' THEN
        ordering_key := NULL;
    END IF;
    IF ordering_key IS NOT NULL AND NOT coalesce(
            (SELECT bool_or(m[1] NOT IN ('op', 'table', 'schema'))
             FROM regexp_matches(ordering_key, '\{([^{}]*)\}', 'g') AS m), false) THEN
        RAISE EXCEPTION 'outbox.capture: ordering key template "%" names no column (write e.g. "{id}")', ordering_key
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- The generated function's owner (see the top of this file).
    fn_owner := outbox.capture_owner(source);

    options := jsonb_build_object(
        'exchange', exchange, 'routing_key', routing_key,
        'ordering_key', ordering_key, 'operations', to_jsonb(ops),
        'columns', to_jsonb(columns), 'table', qualified);

    SELECT t.tgfoid::regprocedure AS fn, n.nspname = 'outbox'
               AND p.proname ~ '^capture_[0-9]+(_[0-9]+)?$' AS ours,
           obj_description(t.tgfoid, 'pg_proc') AS comment,
           (SELECT rolname FROM pg_roles WHERE oid = p.proowner) AS owner,
           EXISTS (SELECT 1 FROM pg_trigger o
                   WHERE o.tgfoid = t.tgfoid AND o.tgrelid <> source
                     AND o.tgparentid = 0) AS shared
    INTO existing
    FROM pg_trigger t
    JOIN pg_proc p ON p.oid = t.tgfoid
    JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE t.tgrelid = source AND t.tgname = 'outbox_capture';
    had_one := FOUND;
    IF had_one AND NOT existing.ours THEN
        RAISE EXCEPTION 'outbox.capture: table % already has a trigger named outbox_capture that is not a capture', source
            USING ERRCODE = 'duplicate_object';
    END IF;
    -- In place only if the function is this table's alone, and its role's:
    -- after a dump and restore two tables' triggers may call one function,
    -- and a capture V5 made is owned by the shared outbox_capture. (The
    -- triggers a partitioned table's trigger clones onto its partitions,
    -- tgparentid <> 0, are its own: V5 took them for another table's, so
    -- capturing a partitioned table again was never "in place" and left
    -- its old function behind.)
    IF had_one AND existing.comment = options::text AND NOT existing.shared
       AND existing.owner = fn_owner THEN
        RETURN false;
    END IF;
    -- Never replace a function another table's trigger calls.
    WHILE EXISTS (SELECT 1 FROM pg_proc p JOIN pg_trigger o ON o.tgfoid = p.oid
                  WHERE p.pronamespace = 'outbox'::regnamespace AND p.proname = fn_name
                    AND o.tgrelid <> source AND o.tgparentid = 0) LOOP
        n := n + 1;
        fn_name := 'capture_' || source::oid || '_' || n;
    END LOOP;

    -- One branch per captured operation, everything else constant.
    FOREACH op IN ARRAY ops LOOP
        row_var := CASE op WHEN 'delete' THEN 'OLD' ELSE 'NEW' END;
        body := body || format(
            E'    %s TG_OP = %L THEN\n'
            '        INSERT INTO outbox.messages\n'
            '            (exchange, routing_key, payload, content_type, headers, ordering_key)\n'
            '        VALUES (%L, %s, convert_to((%s)::text, %L), %L, %L::jsonb, %s);\n',
            CASE WHEN body = '' THEN 'IF' ELSE 'ELSIF' END, upper(op),
            exchange,
            outbox.capture_expression(routing_key, source, 'routing key', row_var, op),
            outbox.capture_payload(columns, op), 'UTF8', 'application/json',
            jsonb_build_object('table', qualified, 'operation', op)::text,
            CASE WHEN ordering_key IS NULL THEN 'NULL'
                 ELSE outbox.capture_expression(ordering_key, source, 'ordering key', row_var, op) END);
    END LOOP;
    -- %L: the body holds the templates' text, which may contain any
    -- dollar-quote tag.
    EXECUTE format(
        E'CREATE OR REPLACE FUNCTION outbox.%I() RETURNS trigger\n'
        'LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS %L',
        fn_name, E'\nBEGIN\n' || body || E'    END IF;\n    RETURN NULL;\nEND\n');
    -- A new owner needs CREATE on the schema; the table's role has it only
    -- for this statement, inside this transaction.
    EXECUTE format('GRANT CREATE ON SCHEMA outbox TO %I', fn_owner);
    EXECUTE format('ALTER FUNCTION outbox.%I() OWNER TO %I', fn_name, fn_owner);
    EXECUTE format('REVOKE CREATE ON SCHEMA outbox FROM %I', fn_owner);
    EXECUTE format('REVOKE ALL ON FUNCTION outbox.%I() FROM PUBLIC', fn_name);
    EXECUTE format('COMMENT ON FUNCTION outbox.%I() IS %L', fn_name, options::text);
    EXECUTE format(
        'CREATE OR REPLACE TRIGGER outbox_capture AFTER %s ON %s FOR EACH ROW EXECUTE FUNCTION outbox.%I()',
        array_to_string(ARRAY(SELECT upper(o) FROM unnest(ops) AS o), ' OR '), source, fn_name);
    -- After a dump and restore the table's oid, and so the generated name,
    -- changed: the trigger now calls the new function, drop the old one
    -- (and its role, which belonged to the table's old oid).
    IF had_one AND existing.fn::text <> format('outbox.%I()', fn_name) AND NOT existing.shared THEN
        EXECUTE format('DROP FUNCTION %s', existing.fn);
        PERFORM outbox.capture_owner_drop(existing.owner);
    END IF;
    RETURN true;
END
$$;

-- Stops capturing `source`: drops its trigger, its function and its role,
-- leaving the table exactly as it was. Returns false when it was not
-- captured. Idempotent, like capture.
CREATE OR REPLACE FUNCTION outbox.capture_remove(source regclass) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    fn      regprocedure;
    owner   name;
    removed boolean;
BEGIN
    SELECT t.tgfoid, (SELECT rolname FROM pg_roles WHERE oid = p.proowner) INTO fn, owner
    FROM pg_trigger t
    JOIN pg_proc p ON p.oid = t.tgfoid
    JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE t.tgrelid = source AND t.tgname = 'outbox_capture'
      AND n.nspname = 'outbox' AND p.proname ~ '^capture_[0-9]+(_[0-9]+)?$';
    removed := FOUND;
    IF removed AND NOT pg_has_role((SELECT relowner FROM pg_class WHERE oid = source), 'USAGE') THEN
        RAISE EXCEPTION 'outbox.capture_remove: only the owner of table % may drop its trigger, and role % does not own it',
            source, quote_ident(current_user)
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF removed THEN
        EXECUTE format('DROP TRIGGER outbox_capture ON %s', source);
        -- Another table's trigger may still call it (after a restore).
        IF NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgfoid = fn) THEN
            EXECUTE format('DROP FUNCTION %s', fn);
            PERFORM outbox.capture_owner_drop(owner);
        END IF;
    END IF;
    -- A dropped table takes its trigger along but not the function: drop
    -- such leftovers here too (those this role owns), with their roles.
    FOR fn, owner IN
        SELECT p.oid, (SELECT rolname FROM pg_roles WHERE oid = p.proowner)
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'outbox' AND p.proname ~ '^capture_[0-9]+(_[0-9]+)?$'
          AND pg_has_role(p.proowner, 'USAGE')
          AND NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgfoid = p.oid)
    LOOP
        EXECUTE format('DROP FUNCTION %s', fn);
        PERFORM outbox.capture_owner_drop(owner);
    END LOOP;
    RETURN removed;
END
$$;

-- Hands every existing capture function (V2's and V5's, owned by
-- outbox_capture or, where V5 could not, by their creator) to its table's
-- role. Only the owner changes: the body stays as generated. A function
-- two tables' triggers call (after a restore) is left for `capture` of
-- either table, which separates them.
DO $$
DECLARE
    t        record;
    fn_owner name;
    missed   text[] := '{}';
    reason   text;
BEGIN
    FOR t IN
        SELECT tr.tgrelid::regclass AS source, p.oid::regprocedure AS fn,
               (SELECT rolname FROM pg_roles WHERE oid = p.proowner) AS owner
        FROM pg_trigger tr
        JOIN pg_proc p ON p.oid = tr.tgfoid
        JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE tr.tgname = 'outbox_capture' AND NOT tr.tgisinternal AND tr.tgparentid = 0
          AND n.nspname = 'outbox' AND p.proname ~ '^capture_[0-9]+(_[0-9]+)?$'
          AND NOT EXISTS (SELECT 1 FROM pg_trigger o
                          WHERE o.tgfoid = tr.tgfoid AND o.tgrelid <> tr.tgrelid
                            AND o.tgparentid = 0)
    LOOP
        BEGIN
            fn_owner := outbox.capture_owner(t.source);
            IF t.owner <> fn_owner THEN
                EXECUTE format('GRANT CREATE ON SCHEMA outbox TO %I', fn_owner);
                EXECUTE format('ALTER FUNCTION %s OWNER TO %I', t.fn, fn_owner);
                EXECUTE format('REVOKE CREATE ON SCHEMA outbox FROM %I', fn_owner);
                PERFORM outbox.capture_owner_drop(t.owner);
            END IF;
        EXCEPTION WHEN insufficient_privilege OR invalid_parameter_value THEN
            GET STACKED DIAGNOSTICS reason = MESSAGE_TEXT;
            missed := missed || format('%s (%s)', t.source, reason);
        END;
    END LOOP;
    IF cardinality(missed) > 0 THEN
        RAISE WARNING 'outbox: % capture(s) still run as a shared owner, so one captured table''s owner can drop another''s capture: %; capture them again once their roles can be made (README "Capture")',
            cardinality(missed), array_to_string(missed, '; ');
    END IF;
END
$$;

-- What is captured, read from the triggers themselves: V5's columns, but
-- a partitioned table once, not once more per partition.
CREATE OR REPLACE VIEW outbox.captures AS
SELECT format('%I.%I', tn.nspname, c.relname) AS source,
       o ->> 'exchange' AS exchange,
       o ->> 'routing_key' AS routing_key,
       o ->> 'ordering_key' AS ordering_key,
       ARRAY(SELECT jsonb_array_elements_text(o -> 'operations')) AS operations,
       CASE WHEN jsonb_typeof(o -> 'columns') = 'array'
            THEN ARRAY(SELECT jsonb_array_elements_text(o -> 'columns')) END AS columns,
       t.tgenabled <> 'D' AS enabled
FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid
JOIN pg_namespace tn ON tn.oid = c.relnamespace
JOIN pg_proc p ON p.oid = t.tgfoid
JOIN pg_namespace pn ON pn.oid = p.pronamespace
CROSS JOIN LATERAL (SELECT obj_description(p.oid, 'pg_proc')::jsonb AS o) AS options
WHERE t.tgname = 'outbox_capture' AND NOT t.tgisinternal AND t.tgparentid = 0
  AND pn.nspname = 'outbox' AND p.proname ~ '^capture_[0-9]+(_[0-9]+)?$';

-- outbox_capture (V5) keeps rights here only while it owns a capture.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'outbox_capture')
       AND NOT EXISTS (SELECT 1 FROM pg_proc p
                       JOIN pg_namespace n ON n.oid = p.pronamespace
                       JOIN pg_roles r ON r.oid = p.proowner
                       WHERE n.nspname = 'outbox' AND r.rolname = 'outbox_capture') THEN
        REVOKE ALL ON outbox.messages FROM outbox_capture;
        EXECUTE format('REVOKE ALL ON SEQUENCE %s FROM outbox_capture',
                       pg_get_serial_sequence('outbox.messages', 'id'));
        REVOKE ALL ON SCHEMA outbox FROM outbox_capture;
    END IF;
END
$$;

-- 3. ---------------------------------------------------------------------

-- `payload` as text when it is valid UTF-8 (and fits the database's
-- encoding), else NULL: never an error.
CREATE OR REPLACE FUNCTION outbox.payload_text(payload bytea) RETURNS text
LANGUAGE plpgsql STABLE STRICT PARALLEL SAFE AS $$
BEGIN
    RETURN convert_from(payload, 'UTF8');
EXCEPTION WHEN character_not_in_repertoire OR untranslatable_character THEN
    RETURN NULL;
END
$$;

-- V1's columns, in V1's order and of V1's types (so V1 may run again;
-- convert_from's text there has collation "C", from its name argument).
CREATE OR REPLACE VIEW outbox.dead_letters AS
SELECT id, message_id, exchange, routing_key, ordering_key, content_type,
       created_at, dead_at, attempts, last_error,
       CASE WHEN content_type LIKE '%json%'
            THEN outbox.payload_text(payload) COLLATE "C" END AS payload_text
FROM outbox.messages
WHERE dead_at IS NOT NULL AND published_at IS NULL;
