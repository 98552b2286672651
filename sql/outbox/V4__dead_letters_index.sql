-- Dead letters are few, but finding them without an index scans every row
-- kept for retention. The relay counts them every few seconds for its
-- `outbox_dead_messages` gauge, and operators list them during incidents.
CREATE INDEX IF NOT EXISTS messages_dead
    ON outbox.messages (id)
    WHERE dead_at IS NOT NULL;
