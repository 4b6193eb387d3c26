-- The SQLite store: the same tables as the PostgreSQL store (see
-- migrations/postgres), for a single process. JSON is kept as text,
-- positions and times as integers.

-- The change log: one immutable row per accepted change.
CREATE TABLE sync_changes (
    id               TEXT    PRIMARY KEY,
    -- Per-user log position: a nanosecond UTC timestamp, unique per user,
    -- increasing in commit order. Cursors are values of this column.
    seq              INTEGER NOT NULL,
    app_id           TEXT    NOT NULL,
    table_name       TEXT    NOT NULL,
    record_id        TEXT    NOT NULL,
    user_id          TEXT    NOT NULL,
    op               TEXT    NOT NULL CHECK (op IN ('insert', 'update', 'delete')),
    data             TEXT    NOT NULL DEFAULT '{}',
    field_timestamps TEXT    NOT NULL DEFAULT '{}',
    client_id        TEXT    NOT NULL,
    created_at       TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE (user_id, seq)
) STRICT;
CREATE INDEX sync_changes_record_idx ON sync_changes (user_id, app_id, table_name, record_id, seq);

-- The log is append-only.
CREATE TRIGGER sync_changes_no_update BEFORE UPDATE ON sync_changes
BEGIN SELECT RAISE(ABORT, 'sync_changes is append-only'); END;
CREATE TRIGGER sync_changes_no_delete BEFORE DELETE ON sync_changes
BEGIN SELECT RAISE(ABORT, 'sync_changes is append-only'); END;

-- One row per user: the last log position handed out.
CREATE TABLE sync_clocks (
    user_id  TEXT    PRIMARY KEY,
    last_seq INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

-- Projection of the fold; derived from sync_changes only.
CREATE TABLE sync_records (
    user_id     TEXT    NOT NULL,
    app_id      TEXT    NOT NULL,
    table_name  TEXT    NOT NULL,
    record_id   TEXT    NOT NULL,
    fields      TEXT    NOT NULL,
    created_seq INTEGER NOT NULL,
    touched_seq INTEGER NOT NULL,
    PRIMARY KEY (user_id, app_id, table_name, record_id)
) STRICT, WITHOUT ROWID;
CREATE INDEX sync_records_table_delta_idx ON sync_records (user_id, app_id, table_name, touched_seq);
CREATE INDEX sync_records_app_delta_idx ON sync_records (user_id, app_id, touched_seq);

-- First outcome of each idempotent push; created_at in Unix milliseconds.
CREATE TABLE sync_idempotency (
    user_id         TEXT    NOT NULL,
    idempotency_key TEXT    NOT NULL,
    request_hash    BLOB    NOT NULL,
    response        TEXT    NOT NULL,
    created_at      INTEGER NOT NULL,
    PRIMARY KEY (user_id, idempotency_key)
) STRICT, WITHOUT ROWID;
CREATE INDEX sync_idempotency_expiry_idx ON sync_idempotency (user_id, created_at);
