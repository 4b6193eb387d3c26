-- Every push rewrites the rows of the records it touches, so sync_records
-- gathers dead row versions (and their delta index entries, which every
-- pull walks) at the rate of pushes. Autovacuum's default waits for a
-- fifth of the table to be dead; at a million records that is 200,000
-- dead rows in the pulls' way (the benchmark measured pulls of records
-- written a hundred times 1.39 times slower than of records written once
-- before a vacuum, 1.05 after). Vacuum it at a twentieth.
ALTER TABLE sync_records SET (autovacuum_vacuum_threshold = 1000, autovacuum_vacuum_scale_factor = 0.05);
