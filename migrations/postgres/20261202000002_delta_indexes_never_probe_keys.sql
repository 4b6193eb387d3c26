-- A push looks its records up by primary key. Without planner statistics
-- (a new database, until autovacuum first analyzes it) PostgreSQL costs
-- the table's delta index, which matches three of the key's four columns,
-- the same as the primary key, and took it: every lookup then filtered the
-- user's whole table (1.4 ms instead of 0.1 ms for a push of 10 records of
-- a user with 1,000). A partial index serves only queries that state its
-- predicate, and only the pulls do (`touched_seq > 0`, true of every
-- record: positions are nanosecond timestamps), so a key lookup can no
-- longer pick either delta index, with statistics or without.
DROP INDEX sync_records_table_delta_idx;
DROP INDEX sync_records_app_delta_idx;
CREATE INDEX sync_records_table_delta_idx ON sync_records (user_id, app_id, table_name, touched_seq) WHERE touched_seq > 0;
CREATE INDEX sync_records_app_delta_idx ON sync_records (user_id, app_id, touched_seq) WHERE touched_seq > 0;
