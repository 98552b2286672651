-- A requeued dead letter is new work, like a replayed message (V5): stamp
-- replayed_at, so the lag gauge, `status`, outbox.pending's age and the
-- enqueue→confirm histogram count from the requeue, not from its first
-- enqueue (which would page the lag alert for a row that is on its way).
-- id and created_at stay, so per-key order is unchanged.
CREATE OR REPLACE FUNCTION outbox.retry_dead(target uuid) RETURNS boolean
LANGUAGE sql AS $$
    WITH revived AS (
        UPDATE outbox.messages
        SET dead_at = NULL, attempts = 0, next_attempt_at = now(),
            locked_by = NULL, locked_until = NULL, replayed_at = now()
        WHERE message_id = target AND dead_at IS NOT NULL
        RETURNING 1
    )
    SELECT count(*) = 1 FROM revived
$$;
