-- The relay's claim: run by `store::claim` (claim.rs), whose doc comment
-- says what it takes and why it is shaped so. Its parameters:
--   $1  rows                most rows taken, and most keys looked at
--   $2  lease               the lease token written into locked_by
--   $3  block_on_dead_head  a dead head blocks its key
--   $4  lease_ms            how long the lease lasts (ms)
--   $5  bytes               most payload bytes taken (the first row always is)
--   $6  after               keyless rows are taken after this id (the cursor)
--   $7  keys_from           keys are looked at from this one on
--   $8  followers           rows of a key taken after its head
--   $9  in_flight           ids this relay published and awaits confirms for
-- It returns each claimed row (pending since its replay, its due time if
-- it was scheduled, or its enqueue; whether it was scheduled), and on every
-- row the claim's counts:
-- rows found, keyless rows found, keys looked at, the last key looked at.
WITH RECURSIVE keys AS (
    (SELECT ordering_key, 1 AS n FROM outbox.messages
     WHERE ordering_key >= $7 AND published_at IS NULL
     ORDER BY ordering_key LIMIT 1)
    UNION ALL
    SELECT next.ordering_key, k.n + 1 FROM keys k CROSS JOIN LATERAL (
        SELECT ordering_key FROM outbox.messages
        WHERE ordering_key > k.ordering_key AND published_at IS NULL
        ORDER BY ordering_key LIMIT 1) next
    WHERE k.n < $1
), heads AS MATERIALIZED (
    SELECT h.id FROM keys k CROSS JOIN LATERAL (
        SELECT id, dead_at, next_attempt_at, locked_until FROM outbox.messages
        WHERE ordering_key = k.ordering_key AND (ordering_key, id) > (k.ordering_key, 0)
          AND published_at IS NULL AND ($3 OR dead_at IS NULL)
          -- Hashed: with keys pipelined, a drain has thousands of rows
          -- in flight, and each key's walk to its head passes its own.
          AND ($8 = 0 OR id NOT IN (SELECT unnest($9::int8[])))
        ORDER BY ordering_key, id LIMIT 1) h
    WHERE h.dead_at IS NULL AND h.next_attempt_at <= now()
      AND (h.locked_until IS NULL OR h.locked_until < now())
), keyless AS MATERIALIZED (
    SELECT id FROM outbox.messages
    WHERE ordering_key IS NULL AND published_at IS NULL AND dead_at IS NULL AND id > $6
      AND next_attempt_at <= now() AND (locked_until IS NULL OR locked_until < now())
    ORDER BY id LIMIT $1
), picked AS MATERIALIZED (
    SELECT m.id, m.ordering_key, octet_length(m.payload)::int8 AS size FROM outbox.messages m
    WHERE m.id = ANY (ARRAY(SELECT id FROM keyless UNION ALL SELECT id FROM heads))
      AND m.published_at IS NULL AND m.dead_at IS NULL AND m.next_attempt_at <= now()
      AND (m.locked_until IS NULL OR m.locked_until < now())
    ORDER BY m.id LIMIT $1
    FOR UPDATE OF m SKIP LOCKED
), followers AS MATERIALIZED (
    SELECT f.id, f.size FROM picked h CROSS JOIN LATERAL (
        SELECT next.id, next.size, bool_and(next.ready) OVER (ORDER BY next.id) AS run
        FROM (
            SELECT n.id, octet_length(n.payload)::int8 AS size,
                   n.dead_at IS NULL AND n.next_attempt_at <= now()
                   AND (n.locked_until IS NULL OR n.locked_until < now()) AS ready
            FROM outbox.messages n
            WHERE n.ordering_key = h.ordering_key
              AND (n.ordering_key, n.id) > (h.ordering_key, h.id)
              AND n.published_at IS NULL AND ($3 OR n.dead_at IS NULL)
            ORDER BY n.ordering_key, n.id
            LIMIT least($8, $1 / greatest((SELECT count(*) FROM picked), 1))
        ) next
    ) f
    WHERE h.ordering_key IS NOT NULL AND f.run
), chosen AS MATERIALIZED (
    SELECT id FROM (
        SELECT id, sum(size) OVER (ORDER BY id) - size AS before
        FROM (SELECT id, size FROM picked UNION ALL SELECT id, size FROM followers) rows
        ORDER BY id LIMIT $1
    ) running
    WHERE before < $5
), sequenced AS MATERIALIZED (
    -- No other claim numbers these keys meanwhile: it would need their
    -- heads, which this one holds.
    SELECT m.id, m.ordering_key,
           CASE WHEN m.ordering_key IS NOT NULL AND m.key_seq IS NULL THEN
               coalesce(s.last, 0) + row_number() OVER (
                   PARTITION BY m.ordering_key, m.key_seq IS NULL ORDER BY m.id)
           END AS seq
    FROM chosen JOIN outbox.messages m USING (id)
    LEFT JOIN outbox.key_sequences s ON s.ordering_key = m.ordering_key
), numbered AS (
    INSERT INTO outbox.key_sequences AS s (ordering_key, last)
    SELECT ordering_key, max(seq) FROM sequenced WHERE seq IS NOT NULL GROUP BY ordering_key
    ON CONFLICT (ordering_key) DO UPDATE SET last = excluded.last
)
UPDATE outbox.messages m
SET locked_by = $2, locked_until = now() + $4 * interval '1 millisecond',
    key_seq = coalesce(m.key_seq, sequenced.seq)
FROM sequenced
WHERE m.id = sequenced.id AND m.published_at IS NULL
RETURNING m.id, m.message_id, m.exchange, m.routing_key, m.payload, m.content_type,
          m.headers::text, m.ordering_key, m.attempts,
          coalesce(m.replayed_at, m.scheduled_for, m.created_at), m.key_seq,
          (SELECT count(*) FROM picked) + (SELECT count(*) FROM followers),
          (SELECT count(*) FROM keyless),
          (SELECT count(*) FROM keys),
          (SELECT max(ordering_key) FROM keys),
          m.scheduled_for IS NOT NULL AND m.replayed_at IS NULL
