-- Capture hardening (V2 is released, so its functions are replaced here).
--
-- 1. Whose rights the generated function runs with. V2 made it SECURITY
--    DEFINER owned by the outbox's owner, and it evaluates the captured
--    table's values: to_jsonb(NEW), (NEW.col)::text. The table's owner
--    chooses those types and their casts (CREATE CAST ... WITH FUNCTION),
--    so their code ran with the outbox owner's rights. The function is now
--    owned by `outbox_capture`, a NOLOGIN role whose only rights are
--    INSERT on outbox.messages and the sequence that order_by_key takes
--    ids from: code a table owner slips in can at worst insert an outbox
--    message, which writing to their captured table does anyway. The app's
--    own role still needs no rights on schema outbox.
--    Roles belong to the cluster: this migration creates `outbox_capture`
--    when its runner may create roles (superuser or CREATEROLE); otherwise
--    an admin does once, before capturing (README "Capture"):
--        CREATE ROLE outbox_capture NOLOGIN;
--        GRANT outbox_capture TO <owner of schema outbox>;
--    Until then capture refuses, in one line, and functions V2 generated
--    keep their old owner (a WARNING says so).
-- 2. The generated body is quoted with %L, not $capture$...$capture$: a
--    template containing "$capture$" ended the body early.
-- 3. Names: capture_<table oid> can, after a dump and restore, name the
--    function another table's trigger calls. capture never replaces a
--    function another table's trigger calls (it takes capture_<oid>_<n>),
--    and the options in the comment name the table, so "same capture
--    already in place" means the same table's too.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'outbox_capture')
       AND (SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user) THEN
        BEGIN
            CREATE ROLE outbox_capture NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL; -- another database's migration created it just now
        END;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'outbox_capture')
       AND NOT pg_has_role('outbox_capture', 'MEMBER')
       AND (SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user) THEN
        GRANT outbox_capture TO CURRENT_USER;
    END IF;
END
$$;

-- The rights of the generated functions' owner; called by capture (as the
-- outbox owner) each time, so they hold however the role came to exist.
-- False when the role is missing or the caller cannot hand it functions.
CREATE OR REPLACE FUNCTION outbox.capture_role_ready() RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'outbox_capture')
       OR NOT pg_has_role('outbox_capture', 'MEMBER') THEN
        RETURN false;
    END IF;
    GRANT USAGE ON SCHEMA outbox TO outbox_capture;
    GRANT INSERT ON outbox.messages TO outbox_capture;
    EXECUTE format('GRANT USAGE ON SEQUENCE %s TO outbox_capture',
                   pg_get_serial_sequence('outbox.messages', 'id'));
    RETURN true;
END
$$;

-- Hands the functions V2 generated to outbox_capture.
DO $$
DECLARE
    fn regprocedure;
BEGIN
    IF NOT outbox.capture_role_ready() THEN
        IF EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                   WHERE n.nspname = 'outbox' AND p.proname ~ '^capture_[0-9]+$') THEN
            RAISE WARNING 'outbox: role outbox_capture is missing (or % is not a member of it): existing captures still run as their creator; create it (README "Capture") and capture those tables again',
                quote_ident(current_user);
        END IF;
        RETURN;
    END IF;
    GRANT CREATE ON SCHEMA outbox TO outbox_capture;
    FOR fn IN
        SELECT p.oid FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'outbox' AND p.proname ~ '^capture_[0-9]+(_[0-9]+)?$'
    LOOP
        EXECUTE format('ALTER FUNCTION %s OWNER TO outbox_capture', fn);
    END LOOP;
    REVOKE CREATE ON SCHEMA outbox FROM outbox_capture;
END
$$;

-- Starts (or changes) capturing `source`. Returns true when it created or
-- changed the capture, false when the same capture was already in place.
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
    IF NOT outbox.capture_role_ready() THEN
        RAISE EXCEPTION 'outbox.capture: role outbox_capture is missing or role % is not a member of it (as an admin: CREATE ROLE outbox_capture NOLOGIN; GRANT outbox_capture TO %)',
            quote_ident(current_user), quote_ident(current_user)
            USING ERRCODE = 'insufficient_privilege';
    END IF;

    options := jsonb_build_object(
        'exchange', exchange, 'routing_key', routing_key,
        'ordering_key', ordering_key, 'operations', to_jsonb(ops),
        'columns', to_jsonb(columns), 'table', qualified);

    SELECT t.tgfoid::regprocedure AS fn, n.nspname = 'outbox'
               AND p.proname ~ '^capture_[0-9]+(_[0-9]+)?$' AS ours,
           obj_description(t.tgfoid, 'pg_proc') AS comment,
           EXISTS (SELECT 1 FROM pg_trigger o
                   WHERE o.tgfoid = t.tgfoid AND o.tgrelid <> source) AS shared
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
    -- In place only if the function is this table's alone: after a dump
    -- and restore two tables' triggers may call one function.
    IF had_one AND existing.comment = options::text AND NOT existing.shared THEN
        RETURN false;
    END IF;
    -- Never replace a function another table's trigger calls.
    WHILE EXISTS (SELECT 1 FROM pg_proc p JOIN pg_trigger o ON o.tgfoid = p.oid
                  WHERE p.pronamespace = 'outbox'::regnamespace AND p.proname = fn_name
                    AND o.tgrelid <> source) LOOP
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
    -- A new owner needs CREATE on the schema; outbox_capture has it only
    -- for this statement, inside this transaction.
    GRANT CREATE ON SCHEMA outbox TO outbox_capture;
    EXECUTE format('ALTER FUNCTION outbox.%I() OWNER TO outbox_capture', fn_name);
    REVOKE CREATE ON SCHEMA outbox FROM outbox_capture;
    EXECUTE format('REVOKE ALL ON FUNCTION outbox.%I() FROM PUBLIC', fn_name);
    EXECUTE format('COMMENT ON FUNCTION outbox.%I() IS %L', fn_name, options::text);
    EXECUTE format(
        'CREATE OR REPLACE TRIGGER outbox_capture AFTER %s ON %s FOR EACH ROW EXECUTE FUNCTION outbox.%I()',
        array_to_string(ARRAY(SELECT upper(o) FROM unnest(ops) AS o), ' OR '), source, fn_name);
    -- After a dump and restore the table's oid, and so the generated name,
    -- changed: the trigger now calls the new function, drop the old one.
    IF had_one AND existing.fn::text <> format('outbox.%I()', fn_name) AND NOT existing.shared THEN
        EXECUTE format('DROP FUNCTION %s', existing.fn);
    END IF;
    RETURN true;
END
$$;

-- Stops capturing `source`: drops its trigger and its function, leaving the
-- table exactly as it was. Returns false when it was not captured.
-- Idempotent, like capture.
CREATE OR REPLACE FUNCTION outbox.capture_remove(source regclass) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    fn      regprocedure;
    removed boolean;
BEGIN
    SELECT t.tgfoid INTO fn
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
        END IF;
    END IF;
    -- A dropped table takes its trigger along but not the function: drop
    -- such leftovers here too (those this role owns).
    FOR fn IN
        SELECT p.oid FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'outbox' AND p.proname ~ '^capture_[0-9]+(_[0-9]+)?$'
          AND pg_has_role(p.proowner, 'USAGE')
          AND NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgfoid = p.oid)
    LOOP
        EXECUTE format('DROP FUNCTION %s', fn);
    END LOOP;
    RETURN removed;
END
$$;

-- What is captured, read from the triggers themselves.
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
WHERE t.tgname = 'outbox_capture' AND NOT t.tgisinternal
  AND pn.nspname = 'outbox' AND p.proname ~ '^capture_[0-9]+(_[0-9]+)?$';

-- Replay (`outbox-relay replay`) hands published rows back to the relays.
-- Their created_at is when they were first enqueued, hours ago perhaps, and
-- the lag (outbox_oldest_pending_seconds, `status`, outbox.pending's age)
-- and the enqueue-to-confirm histogram measured from it, so a replay paged
-- the lag alert and skewed the histogram. Replay now stamps replayed_at and
-- those measure from coalesce(replayed_at, created_at): how long the row
-- has been waiting this time. created_at keeps the first enqueue, and ids,
-- so per-key order, are untouched. (In this file because V5 is the only
-- number allocated to this change.)
ALTER TABLE outbox.messages ADD COLUMN IF NOT EXISTS replayed_at timestamptz;

-- The same columns as V1's (so V1 may run again, as psql installs do).
CREATE OR REPLACE VIEW outbox.pending AS
SELECT id, message_id, exchange, routing_key, ordering_key, content_type,
       created_at, now() - coalesce(replayed_at, created_at) AS age, attempts,
       next_attempt_at, last_error, locked_by, locked_until
FROM outbox.messages
WHERE published_at IS NULL AND dead_at IS NULL;
