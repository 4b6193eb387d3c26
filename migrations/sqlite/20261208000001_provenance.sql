-- What a change says of itself, and the provenance of a record's winning
-- entries (see migrations/postgres).
ALTER TABLE sync_changes ADD COLUMN meta TEXT;
ALTER TABLE sync_records ADD COLUMN writers TEXT;
