-- An ordinary role that owns the mana-sync database. Not a superuser and
-- not BYPASSRLS: PostgreSQL row-level security only binds such roles.
CREATE ROLE mana_sync LOGIN PASSWORD 'mana_sync' NOSUPERUSER NOBYPASSRLS;
CREATE DATABASE mana_sync OWNER mana_sync;
