-- Each user's stored records and their bytes, kept on the clock row by
-- every push (see migrations/postgres). `previous_seq` is the clock before
-- the last push, as on PostgreSQL: the counters hold when it equals
-- `counted_seq`; users from before this migration are counted at their
-- next push.
ALTER TABLE sync_clocks ADD COLUMN previous_seq INTEGER;
ALTER TABLE sync_clocks ADD COLUMN records INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sync_clocks ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sync_clocks ADD COLUMN counted_seq INTEGER;
