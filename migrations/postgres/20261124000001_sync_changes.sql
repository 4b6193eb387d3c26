-- The change log: one immutable row per accepted change. Normal operation
-- only ever INSERTs here; everything else is derived from it.
CREATE TABLE sync_changes (
    id               UUID        PRIMARY KEY,
    -- Per-user log position: a nanosecond UTC timestamp taken from the
    -- user's clock row while it is locked, so it is unique per user and
    -- increases in commit order. Cursors are values of this column.
    seq              BIGINT      NOT NULL,
    app_id           TEXT        NOT NULL,
    table_name       TEXT        NOT NULL,
    record_id        TEXT        NOT NULL,
    user_id          TEXT        NOT NULL,
    op               TEXT        NOT NULL CHECK (op IN ('insert', 'update', 'delete')),
    -- The fields this change writes: {"field": value, ...}. A delete writes
    -- {"deletedAt": "<timestamp>"}.
    data             JSONB       NOT NULL DEFAULT '{}',
    -- The effective (clamped, normalised RFC 3339) timestamp of each field.
    field_timestamps JSONB       NOT NULL DEFAULT '{}',
    client_id        TEXT        NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT sync_changes_user_seq_key UNIQUE (user_id, seq)
);
CREATE INDEX sync_changes_record_idx ON sync_changes (user_id, app_id, table_name, record_id, seq);

-- One row per user: the last log position handed out. A push locks it
-- until commit, which orders a user's pushes and makes cursors gap-free.
CREATE TABLE sync_clocks (
    user_id  TEXT   PRIMARY KEY,
    last_seq BIGINT NOT NULL
);

-- Projection of the fold: the current field-level LWW state of every
-- record. Derived from sync_changes only; `mana-sync rebuild` re-derives it.
CREATE TABLE sync_records (
    user_id     TEXT   NOT NULL,
    app_id      TEXT   NOT NULL,
    table_name  TEXT   NOT NULL,
    record_id   TEXT   NOT NULL,
    -- {"field": {"v": value, "t": field time (ns), "s": winning seq, "w": last write seq}}
    fields      JSONB  NOT NULL,
    created_seq BIGINT NOT NULL,
    touched_seq BIGINT NOT NULL,
    PRIMARY KEY (user_id, app_id, table_name, record_id)
);
CREATE INDEX sync_records_table_delta_idx ON sync_records (user_id, app_id, table_name, touched_seq);
CREATE INDEX sync_records_app_delta_idx ON sync_records (user_id, app_id, touched_seq);

-- First outcome of each idempotent push, replayed for a retry.
CREATE TABLE sync_idempotency (
    user_id         TEXT        NOT NULL,
    idempotency_key TEXT        NOT NULL,
    request_hash    BYTEA       NOT NULL,
    response        JSONB       NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, idempotency_key)
);
CREATE INDEX sync_idempotency_expiry_idx ON sync_idempotency (user_id, created_at);

-- Row-level security as defence in depth: every transaction of the server
-- sets `mana_sync.user_id` (transaction-local) to the token's subject, and a
-- query that forgets its user filter still cannot see or write another
-- user's rows. The one cross-user read is the list of users in
-- sync_clocks, for `mana-sync rebuild`, which sets `mana_sync.maintenance`;
-- it then works user by user like a request. FORCE makes the policies
-- apply to the table owner too; superusers and BYPASSRLS roles are never
-- subject to RLS, so production must connect as an ordinary role (see
-- SECURITY.md).
ALTER TABLE sync_changes ENABLE ROW LEVEL SECURITY;
ALTER TABLE sync_changes FORCE ROW LEVEL SECURITY;
ALTER TABLE sync_clocks ENABLE ROW LEVEL SECURITY;
ALTER TABLE sync_clocks FORCE ROW LEVEL SECURITY;
ALTER TABLE sync_records ENABLE ROW LEVEL SECURITY;
ALTER TABLE sync_records FORCE ROW LEVEL SECURITY;
ALTER TABLE sync_idempotency ENABLE ROW LEVEL SECURITY;
ALTER TABLE sync_idempotency FORCE ROW LEVEL SECURITY;

-- The log is append-only: there is no UPDATE or DELETE policy, so such
-- statements match no rows even for the owner.
CREATE POLICY sync_changes_read ON sync_changes FOR SELECT
    USING (user_id = current_setting('mana_sync.user_id', true));
CREATE POLICY sync_changes_append ON sync_changes FOR INSERT
    WITH CHECK (user_id = current_setting('mana_sync.user_id', true));

CREATE POLICY sync_clocks_owner ON sync_clocks
    USING (user_id = current_setting('mana_sync.user_id', true))
    WITH CHECK (user_id = current_setting('mana_sync.user_id', true));
CREATE POLICY sync_clocks_list ON sync_clocks FOR SELECT
    USING (current_setting('mana_sync.maintenance', true) = 'on');

CREATE POLICY sync_records_owner ON sync_records
    USING (user_id = current_setting('mana_sync.user_id', true))
    WITH CHECK (user_id = current_setting('mana_sync.user_id', true));

CREATE POLICY sync_idempotency_owner ON sync_idempotency
    USING (user_id = current_setting('mana_sync.user_id', true))
    WITH CHECK (user_id = current_setting('mana_sync.user_id', true));
