-- An idempotent outcome no longer keeps the answer (up to 8 MB of page
-- per keyed push): a replay answers afresh from the projection since just
-- before the batch's first position, `first_seq`, which is all it needs
-- besides the request's fingerprint (src/idempotency.rs). `response` stays
-- for the previous release, whose replicas serve on this schema until
-- replaced; new rows leave it NULL, and a later release drops it. Rows
-- from before have no `first_seq`: their replay answers since the start.
ALTER TABLE sync_idempotency ALTER COLUMN response DROP NOT NULL;
ALTER TABLE sync_idempotency ADD COLUMN first_seq BIGINT;

-- How many outcomes the user keeps, at most (rows swept since are still
-- counted): past IDEMPOTENCY_MAX_KEYS the push that adds one counts them
-- again and drops the oldest. Rows from before are not counted; they
-- expire within IDEMPOTENCY_TTL.
ALTER TABLE sync_clocks ADD COLUMN outcomes BIGINT NOT NULL DEFAULT 0;

-- Expired outcomes are swept across users by every replica, oldest first.
CREATE INDEX sync_idempotency_created_idx ON sync_idempotency (created_at);

-- The sweep is maintenance (`mana_sync.maintenance`), told the TTL in
-- `mana_sync.outcome_ttl` (seconds): it may see and delete expired
-- outcomes (a fingerprint and a position, no user data) and nothing else.
-- A DELETE with a WHERE clause needs the rows to be visible, hence the
-- SELECT policy too.
CREATE POLICY sync_idempotency_expired_read ON sync_idempotency FOR SELECT
    USING (current_setting('mana_sync.maintenance', true) = 'on'
           AND created_at <= now() - make_interval(secs => nullif(current_setting('mana_sync.outcome_ttl', true), '')::float8));
CREATE POLICY sync_idempotency_expired_sweep ON sync_idempotency FOR DELETE
    USING (current_setting('mana_sync.maintenance', true) = 'on'
           AND created_at <= now() - make_interval(secs => nullif(current_setting('mana_sync.outcome_ttl', true), '')::float8));
