-- Pushes look records up by primary key. Until a table has planner
-- statistics, PostgreSQL may pick a (user_id, app_id, ...) delta index for
-- those lookups and filter every record of the user, so let autovacuum
-- analyze these fast-growing tables early and often.
ALTER TABLE sync_records SET (autovacuum_analyze_threshold = 500, autovacuum_analyze_scale_factor = 0.02);
ALTER TABLE sync_changes SET (autovacuum_analyze_threshold = 500, autovacuum_analyze_scale_factor = 0.02);
