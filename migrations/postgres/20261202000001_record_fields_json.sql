-- The projection's record states are written and read whole by the
-- server and never looked into by SQL. As `json` (the text as written,
-- checked but not converted) PostgreSQL no longer parses each one into
-- jsonb's binary form on every push, nor prints it back as text on every
-- pull: a page of a thousand records cost a thousand conversions. The
-- projection is rewritten once here (it can always be rebuilt from the
-- log, which stays jsonb).
ALTER TABLE sync_records ALTER COLUMN fields TYPE json USING fields::json;
