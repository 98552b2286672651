-- The keyless claim: `claim.sql` without its keys, for a relay whose last
-- claim saw no ordering key pending (store::claim says when). Parameters
-- as claim.sql's; $3, $7, $8 and $9 are not used. Each row also says
-- whether any key has unpublished rows now: then the relay's next claim
-- is the whole one.
WITH keyless AS MATERIALIZED (
    SELECT id FROM outbox.messages
    WHERE ordering_key IS NULL AND published_at IS NULL AND dead_at IS NULL AND id > $6
      AND next_attempt_at <= now() AND (locked_until IS NULL OR locked_until < now())
    ORDER BY id LIMIT $1
), picked AS MATERIALIZED (
    SELECT m.id, octet_length(m.payload)::int8 AS size FROM outbox.messages m
    WHERE m.id = ANY (ARRAY(SELECT id FROM keyless))
      AND m.published_at IS NULL AND m.dead_at IS NULL AND m.next_attempt_at <= now()
      AND (m.locked_until IS NULL OR m.locked_until < now())
    ORDER BY m.id LIMIT $1
    FOR UPDATE OF m SKIP LOCKED
), chosen AS MATERIALIZED (
    SELECT id FROM (SELECT id, sum(size) OVER (ORDER BY id) - size AS before FROM picked) running
    WHERE before < $5
)
UPDATE outbox.messages m
SET locked_by = $2, locked_until = now() + $4 * interval '1 millisecond'
FROM chosen
WHERE m.id = chosen.id AND m.published_at IS NULL
RETURNING m.id, m.message_id, m.exchange, m.routing_key, m.payload, m.content_type,
          m.headers::text, m.ordering_key, m.attempts,
          coalesce(m.replayed_at, m.scheduled_for, m.created_at), m.key_seq,
          (SELECT count(*) FROM picked),
          (SELECT count(*) FROM keyless),
          CASE WHEN EXISTS (SELECT 1 FROM outbox.messages
                            WHERE ordering_key IS NOT NULL AND published_at IS NULL)
               THEN 1 ELSE 0 END::int8,
          NULL::text,
          m.scheduled_for IS NOT NULL AND m.replayed_at IS NULL
