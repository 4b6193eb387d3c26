-- The migration history is the owner's alone. The owner's default
-- privileges (deploy/init-role.sql) give the serving role the rows of
-- every table the owner creates, sqlx's history among them; a role that
-- could write it could make the next `migrate` skip or repeat a migration.
-- Reading stays: a replica checks at start that nothing is pending.
--
-- Every privilege but SELECT is taken from every role but the owner and
-- the roles this migration runs as (which must keep writing the history),
-- with CASCADE, so that a grant passed on does not fail the migration.
DO $$
DECLARE
    grant_ record;
BEGIN
    FOR grant_ IN
        SELECT DISTINCT
            CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END AS grantee,
            a.privilege_type AS privilege
        FROM pg_class c, aclexplode(c.relacl) a
        WHERE c.oid = '_sqlx_migrations'::regclass
          AND a.grantee <> c.relowner
          AND a.privilege_type <> 'SELECT'
          AND (a.grantee = 0 OR NOT pg_has_role(current_user, a.grantee, 'MEMBER'))
    LOOP
        EXECUTE format('REVOKE %s ON _sqlx_migrations FROM %s CASCADE', grant_.privilege, grant_.grantee);
    END LOOP;
END
$$;
