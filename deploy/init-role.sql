-- The database and its two roles, run once by a superuser with psql
-- (docker-entrypoint-initdb.d runs it so; again, it changes nothing):
--
--   psql -v owner_password=… -v app_password=… -f deploy/init-role.sql
--
-- - mana_sync_owner owns the database and its tables: `mana-sync migrate`
--   (the one-shot step, or the Kubernetes Job) connects as it.
-- - mana_sync is what every replica connects as: it may read and write
--   the rows of the tables the owner creates, and nothing more. It owns
--   no table and does not bypass row-level security, so the policies that
--   keep each user's rows to that user bind it.
-- Neither is a superuser; both are NOBYPASSRLS.

\set ON_ERROR_STOP on
\if :{?owner_password}
\else
\set owner_password 'mana_sync_owner'
\endif
\if :{?app_password}
\else
\set app_password 'mana_sync'
\endif

SELECT format('CREATE ROLE mana_sync_owner LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS PASSWORD %L', :'owner_password')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mana_sync_owner') \gexec
SELECT format('CREATE ROLE mana_sync LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS PASSWORD %L', :'app_password')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mana_sync') \gexec
SELECT 'CREATE DATABASE mana_sync OWNER mana_sync_owner'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mana_sync') \gexec

\connect mana_sync
-- Only the owner creates in `public`: PostgreSQL 15 makes it so, older
-- versions let every role (a replica connected as mana_sync could then
-- migrate, and own, the tables).
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT CREATE ON SCHEMA public TO mana_sync_owner;
-- What the owner grants, before it migrates: use of the schema, and rows
-- (not tables) in every table its migrations create. PostgreSQL 15 lets
-- only the database's owner create in `public`.
SET ROLE mana_sync_owner;
GRANT USAGE ON SCHEMA public TO mana_sync;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO mana_sync;
RESET ROLE;
