-- An idempotent outcome no longer keeps the answer (up to 8 MB of page
-- per keyed push): a replay answers afresh from the projection since just
-- before the batch's first position, `first_seq`, which is all it needs
-- besides the request's fingerprint (src/idempotency.rs). One process
-- serves a SQLite file, so the table is remade at once; rows from before
-- keep no `first_seq`, and their replay answers since the start.
CREATE TABLE sync_idempotency_compact (
    user_id         TEXT    NOT NULL,
    idempotency_key TEXT    NOT NULL,
    request_hash    BLOB    NOT NULL,
    first_seq       INTEGER,
    created_at      INTEGER NOT NULL,
    PRIMARY KEY (user_id, idempotency_key)
) STRICT, WITHOUT ROWID;
INSERT INTO sync_idempotency_compact (user_id, idempotency_key, request_hash, first_seq, created_at)
SELECT user_id, idempotency_key, request_hash, NULL, created_at FROM sync_idempotency;
DROP TABLE sync_idempotency;
ALTER TABLE sync_idempotency_compact RENAME TO sync_idempotency;
CREATE INDEX sync_idempotency_expiry_idx ON sync_idempotency (user_id, created_at);
-- Expired outcomes are swept across users, oldest first.
CREATE INDEX sync_idempotency_created_idx ON sync_idempotency (created_at);

-- How many outcomes the user keeps, at most (see migrations/postgres).
ALTER TABLE sync_clocks ADD COLUMN outcomes INTEGER NOT NULL DEFAULT 0;
