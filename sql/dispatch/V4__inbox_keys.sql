-- Each ordering key's watermark: the highest `x-outbox-seq` of the key whose
-- delivery committed. The consumer moves it in the transaction of each
-- effect, and a consumer that starts (or takes over the queue) reads it to
-- know which number each key expects next. One row per key; the inbox
-- retention deletes the rows of keys idle longer than it (a forgotten key
-- expects 1 again, so its next message waits DISPATCH_KEY_GAP_WAIT_MS once).
-- `grant_consumer`'s default privileges cover it when the schema's owner
-- runs this migration.
CREATE TABLE dispatch.inbox_keys (
    ordering_key bytea PRIMARY KEY,
    last_seq bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
