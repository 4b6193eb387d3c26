-- The migration history is the owner's alone. The owner's default
-- privileges (deploy/init-role.sql) give the serving role the rows of
-- every table the owner creates, sqlx's history among them; a role that
-- could write it could make the next `migrate` skip or repeat a migration.
-- Reading stays: a replica checks at start that nothing is pending.
DO $$
DECLARE
    grantee text;
BEGIN
    FOR grantee IN
        SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END
        FROM pg_class c, aclexplode(c.relacl) a
        WHERE c.oid = '_sqlx_migrations'::regclass
          AND a.grantee <> c.relowner
          AND a.privilege_type IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE')
    LOOP
        EXECUTE format('REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON _sqlx_migrations FROM %s', grantee);
    END LOOP;
END
$$;
