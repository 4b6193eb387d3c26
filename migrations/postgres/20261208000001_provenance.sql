-- What a change says of itself besides its writes (see src/provenance.rs):
-- {"schemaVersion", "actor", "origin", "spaceId", "client"}, each left out
-- at its default; NULL when it says nothing (every change of the seed's
-- clients).
ALTER TABLE sync_changes ADD COLUMN meta JSONB;
-- The provenance of each log entry that holds one of the record's winning
-- fields, by its position: {"<seq>": {...}}; NULL when none kept any.
ALTER TABLE sync_records ADD COLUMN writers JSON;
