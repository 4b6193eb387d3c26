-- A push appends its batch and reads the records it folds into in one
-- statement, whose snapshot is taken before it locks the user's clock.
-- Locking it sets previous_seq to the clock as found; when that differs
-- from the clock the snapshot saw, another transaction of the user's
-- committed in between, and the push reads again (src/store/postgres/sql.rs).
ALTER TABLE sync_clocks ADD COLUMN previous_seq BIGINT;
