-- A change whose data came without a timestamp of its own (an insert with
-- neither `updatedAt` nor `createdAt`): its fields carry the receive time
-- in field_timestamps, and rank below every timed write of the same field
-- (see src/fold.rs). Changes logged before this column are timed. JSON
-- true/false arrive as 1/0.
ALTER TABLE sync_changes ADD COLUMN untimed INTEGER NOT NULL DEFAULT 0 CHECK (untimed IN (0, 1));
