-- Each user's stored records and their bytes (table name, record id and
-- state), kept on the clock row by every push in its transaction, so that
-- a quota is checked without a scan (MAX_RECORDS_PER_USER,
-- MAX_BYTES_PER_USER). They hold for the clock as it was at `counted_seq`:
-- a push that finds the clock elsewhere (a push by the previous release,
-- or a user from before this migration) counts the user's records once
-- and goes on from there. `mana-sync rebuild` counts them afresh.
ALTER TABLE sync_clocks
    ADD COLUMN records BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN bytes BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN counted_seq BIGINT;
