-- Capture: publish an existing table's changes without touching the app.
--
--     SELECT outbox.capture('public.orders', 'orders', routing_key => 'orders.{op}',
--                           ordering_key => '{id}');
--     SELECT * FROM outbox.captures;
--     SELECT outbox.capture_remove('public.orders');
--
-- `capture` attaches one AFTER ROW trigger, `outbox_capture`, to the table.
-- For each captured INSERT, UPDATE or DELETE it inserts into outbox.messages
-- in the writer's transaction exactly the row outbox.enqueue() would insert,
-- so the table's own triggers (order_by_key, wake_relay) give per-key order
-- and wake-ups exactly as for an explicit enqueue, and a rolled-back change
-- leaves no message. It does not call enqueue(): a SQL function called from
-- PL/pgSQL is planned afresh on every call, which doubled the trigger's cost
-- per row (29 against 17 us). Keep the INSERT in step with enqueue().
--
-- The trigger's function is generated per table (outbox.capture_<table oid>)
-- with the options baked in as SQL expressions: no catalog lookup and no
-- template parsing per row. A generic function that read its options from
-- trigger arguments and rendered the templates per row cost about 10 us more
-- per row. The options are kept as JSON in the function's comment, which
-- outbox.captures reads: the trigger itself is the only record, so nothing
-- can drift from it.
--
-- The function is SECURITY DEFINER, owned by whoever ran capture (the relay's
-- role): the app's own role needs no rights on schema outbox, and its writes
-- keep working exactly as before. EXECUTE is revoked from PUBLIC so nobody
-- attaches it to another table. search_path is pinned, as for every
-- SECURITY DEFINER function.
--
-- Plain SQL like V1: every statement is idempotent.

-- Renders `template` for one row as a SQL expression over `row_var` (NEW or
-- OLD): literal text, {op}, {table}, {schema} or {<column>}. Fails with one
-- clear line on a stray brace or an unknown name.
CREATE OR REPLACE FUNCTION outbox.capture_expression(
    template text,
    source   regclass,
    what     text,
    row_var  text,
    op       text
) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    token  text[];
    parts  text[] := '{}';
    rel    record;
BEGIN
    SELECT c.relname, n.nspname INTO rel
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = source;
    FOR token IN
        SELECT m FROM regexp_matches(template, '\{([^{}]*)\}|([^{}]+)|([{}])', 'g') AS m
    LOOP
        IF token[3] IS NOT NULL THEN
            RAISE EXCEPTION 'outbox.capture: % template "%" has an unmatched "%" (placeholders are {op}, {table}, {schema} or {column})',
                what, template, token[3]
                USING ERRCODE = 'invalid_parameter_value';
        ELSIF token[2] IS NOT NULL THEN
            parts := parts || (quote_literal(token[2]) || '::text');
        ELSIF token[1] = 'op' THEN
            parts := parts || (quote_literal(op) || '::text');
        ELSIF token[1] = 'table' THEN
            parts := parts || (quote_literal(rel.relname) || '::text');
        ELSIF token[1] = 'schema' THEN
            parts := parts || (quote_literal(rel.nspname) || '::text');
        ELSIF EXISTS (SELECT 1 FROM pg_attribute
                      WHERE attrelid = source AND attname = token[1]
                        AND attnum > 0 AND NOT attisdropped) THEN
            parts := parts || format('coalesce((%s.%I)::text, %L)', row_var, token[1], '');
        ELSE
            RAISE EXCEPTION 'outbox.capture: % template "%": table % has no column "%" (placeholders are {op}, {table}, {schema} or {column})',
                what, template, source, token[1]
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END LOOP;
    IF cardinality(parts) = 0 THEN
        RETURN '''''::text';
    END IF;
    RETURN array_to_string(parts, ' || ');
END
$$;

-- The payload of one operation: the row's JSON (new row for inserts, old row
-- for deletes, {"old": ..., "new": ...} for updates), or only `columns`.
CREATE OR REPLACE FUNCTION outbox.capture_payload(columns text[], op text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    new_row text := 'to_jsonb(NEW)';
    old_row text := 'to_jsonb(OLD)';
BEGIN
    IF columns IS NOT NULL THEN
        SELECT format('jsonb_build_object(%s)',
                      string_agg(format('%L, NEW.%I', c, c), ', ' ORDER BY i)),
               format('jsonb_build_object(%s)',
                      string_agg(format('%L, OLD.%I', c, c), ', ' ORDER BY i))
        INTO new_row, old_row
        FROM unnest(columns) WITH ORDINALITY AS u(c, i);
    END IF;
    RETURN CASE op
        WHEN 'insert' THEN new_row
        WHEN 'delete' THEN old_row
        ELSE format('jsonb_build_object(%L, %s, %L, %s)', 'old', old_row, 'new', new_row)
    END;
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

    options := jsonb_build_object(
        'exchange', exchange, 'routing_key', routing_key,
        'ordering_key', ordering_key, 'operations', to_jsonb(ops),
        'columns', to_jsonb(columns));

    SELECT t.tgfoid::regprocedure AS fn, n.nspname = 'outbox'
               AND p.proname ~ '^capture_[0-9]+$' AS ours,
           obj_description(t.tgfoid, 'pg_proc') AS comment
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
    IF had_one AND existing.comment = options::text THEN
        RETURN false;
    END IF;

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
    EXECUTE format(
        E'CREATE OR REPLACE FUNCTION outbox.%I() RETURNS trigger\n'
        'LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $capture$\n'
        'BEGIN\n%s    END IF;\n    RETURN NULL;\nEND\n$capture$',
        fn_name, body);
    EXECUTE format('REVOKE ALL ON FUNCTION outbox.%I() FROM PUBLIC', fn_name);
    EXECUTE format('COMMENT ON FUNCTION outbox.%I() IS %L', fn_name, options::text);
    EXECUTE format(
        'CREATE OR REPLACE TRIGGER outbox_capture AFTER %s ON %s FOR EACH ROW EXECUTE FUNCTION outbox.%I()',
        array_to_string(ARRAY(SELECT upper(o) FROM unnest(ops) AS o), ' OR '), source, fn_name);
    -- After a dump and restore the table's oid, and so the generated name,
    -- changed: the trigger now calls the new function, drop the old one.
    IF had_one AND existing.fn::text <> format('outbox.%I()', fn_name) THEN
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
      AND n.nspname = 'outbox' AND p.proname ~ '^capture_[0-9]+$';
    removed := FOUND;
    IF removed AND NOT pg_has_role((SELECT relowner FROM pg_class WHERE oid = source), 'USAGE') THEN
        RAISE EXCEPTION 'outbox.capture_remove: only the owner of table % may drop its trigger, and role % does not own it',
            source, quote_ident(current_user)
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF removed THEN
        EXECUTE format('DROP TRIGGER outbox_capture ON %s', source);
        EXECUTE format('DROP FUNCTION %s', fn);
    END IF;
    -- A dropped table takes its trigger along but not the function: drop
    -- such leftovers here too (those this role owns).
    FOR fn IN
        SELECT p.oid FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'outbox' AND p.proname ~ '^capture_[0-9]+$'
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
  AND pn.nspname = 'outbox' AND p.proname ~ '^capture_[0-9]+$';
