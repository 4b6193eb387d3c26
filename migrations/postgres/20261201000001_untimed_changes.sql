-- A change whose data came without a timestamp of its own (an insert with
-- neither `updatedAt` nor `createdAt`): its fields carry the receive time
-- in field_timestamps, and rank below every timed write of the same field
-- (see src/fold.rs). Changes logged before this column are timed, as they
-- were folded when acknowledged.
ALTER TABLE sync_changes ADD COLUMN untimed BOOLEAN NOT NULL DEFAULT false;
