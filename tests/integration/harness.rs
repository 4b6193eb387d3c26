//! Tests of the shared test support in `tests/common/`.

use crate::common;

use std::time::{Duration, Instant};

use common::pg::{self, APP_ROLE, OWNER_ROLE};
use common::tokens::{self, JwksServer, TestKey};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};

async fn table_exists(pool: &sqlx::PgPool, table: &str) -> bool {
    sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(format!("public.{table}"))
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn test_databases_are_distinct_and_migrated() {
    let a = pg::test_database().await;
    let b = pg::test_database().await;
    assert_ne!(a.name, b.name);

    let (pa, pb) = (a.app_pool().await, b.app_pool().await);
    let name_a: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&pa)
        .await
        .unwrap();
    let name_b: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&pb)
        .await
        .unwrap();
    assert_eq!(name_a, a.name);
    assert_eq!(name_b, b.name);

    for table in ["sync_changes", "sync_clocks", "sync_records", "sync_idempotency"] {
        assert!(table_exists(&pa, table).await, "{table} missing in {}", a.name);
        assert!(table_exists(&pb, table).await, "{table} missing in {}", b.name);
    }
    let migrations: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&pa)
        .await
        .unwrap();
    let on_disk = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/postgres"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "sql"))
        .count();
    assert_eq!(migrations as usize, on_disk);

    // Isolation: a row written in one database is not in the other.
    let admin_a = a.admin_pool().await;
    sqlx::query("INSERT INTO sync_clocks (user_id, last_seq) VALUES ('alice', 7)")
        .execute(&admin_a)
        .await
        .unwrap();
    let admin_b = b.admin_pool().await;
    let in_b: i64 = sqlx::query_scalar("SELECT count(*) FROM sync_clocks")
        .fetch_one(&admin_b)
        .await
        .unwrap();
    let in_a: i64 = sqlx::query_scalar("SELECT count(*) FROM sync_clocks")
        .fetch_one(&admin_a)
        .await
        .unwrap();
    assert_eq!((in_a, in_b), (1, 0));

    // The database and its tables belong to the owner role (it ran the
    // migrations); the serving role owns nothing and may change no schema.
    let owner: String =
        sqlx::query_scalar("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()")
            .fetch_one(&pa)
            .await
            .unwrap();
    assert_eq!(owner, OWNER_ROLE);
    let table_owner: String =
        sqlx::query_scalar("SELECT tableowner::text FROM pg_tables WHERE tablename = 'sync_changes'")
            .fetch_one(&pa)
            .await
            .unwrap();
    assert_eq!(table_owner, OWNER_ROLE);
    let owned_by_app: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_class WHERE relowner = current_user::regrole")
        .fetch_one(&pa)
        .await
        .unwrap();
    assert_eq!(owned_by_app, 0, "{APP_ROLE} owns no table, index or sequence");
    for ddl in [
        "CREATE TABLE intruder (id int)",
        "ALTER TABLE sync_changes NO FORCE ROW LEVEL SECURITY",
        "DROP POLICY sync_changes_read ON sync_changes",
        "TRUNCATE sync_changes",
    ] {
        let refused = sqlx::query(ddl).execute(&pa).await.expect_err(ddl);
        assert_eq!(
            refused.as_database_error().and_then(|e| e.code()).as_deref(),
            Some("42501"),
            "{ddl}: insufficient_privilege, got {refused}"
        );
    }
}

#[tokio::test]
async fn app_role_is_not_superuser_and_rls_is_enforced() {
    let db = pg::test_database().await;
    let app = db.app_pool().await;
    let (user, rolsuper, bypass): (String, bool, bool) =
        sqlx::query_as("SELECT current_user::text, rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user")
            .fetch_one(&app)
            .await
            .unwrap();
    assert_eq!(user, APP_ROLE);
    assert!(!rolsuper, "{APP_ROLE} must not be a superuser");
    assert!(!bypass, "{APP_ROLE} must not bypass RLS");

    let admin = db.admin_pool().await;
    let admin_super: bool = sqlx::query_scalar("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        .fetch_one(&admin)
        .await
        .unwrap();
    assert!(admin_super, "admin_url must be a superuser");

    // Without the per-transaction user setting, RLS refuses the write...
    let err = sqlx::query("INSERT INTO sync_clocks (user_id, last_seq) VALUES ('alice', 1)")
        .execute(&app)
        .await
        .expect_err("RLS must reject a write with no mana_sync.user_id");
    // SQLSTATE 42501 insufficient_privilege: what a policy violation raises.
    assert_eq!(
        err.as_database_error().and_then(|e| e.code()).as_deref(),
        Some("42501"),
        "{err}"
    );

    // ...accepts it for the matching user...
    let mut tx = app.begin().await.unwrap();
    sqlx::query("SELECT set_config('mana_sync.user_id', 'alice', true)")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("INSERT INTO sync_clocks (user_id, last_seq) VALUES ('alice', 1)")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    // ...and hides it from another user, while the superuser sees it.
    let mut tx = app.begin().await.unwrap();
    sqlx::query("SELECT set_config('mana_sync.user_id', 'bob', true)")
        .execute(&mut *tx)
        .await
        .unwrap();
    let seen_by_bob: i64 = sqlx::query_scalar("SELECT count(*) FROM sync_clocks")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(seen_by_bob, 0);
    let seen_by_admin: i64 = sqlx::query_scalar("SELECT count(*) FROM sync_clocks")
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(seen_by_admin, 1);
}

#[tokio::test]
async fn concurrent_test_databases_and_drop() {
    let dbs = futures_util::future::join_all((0..6).map(|_| pg::test_database())).await;
    let mut names: Vec<_> = dbs.iter().map(|d| d.name.clone()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 6);

    let server = sqlx::PgPool::connect(&pg::server_admin_url()).await.unwrap();
    let exists = |name: String| {
        let server = server.clone();
        async move {
            sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(name)
                .fetch_one(&server)
                .await
                .unwrap()
        }
    };
    for name in &names {
        assert!(exists(name.clone()).await);
    }

    // Dropping a TestDatabase drops the database, even with open connections.
    let first = dbs.into_iter().next().unwrap();
    let name = first.name.clone();
    let _still_open = first.app_pool().await;
    drop(first);
    assert!(!exists(name).await, "test database not dropped");

    // The template accepts no connections, so copies never collide with one.
    let tpl = pg::template_name().await;
    let (is_template, allow_conn): (bool, bool) =
        sqlx::query_as("SELECT datistemplate, datallowconn FROM pg_database WHERE datname = $1")
            .bind(&tpl)
            .fetch_one(&server)
            .await
            .unwrap();
    assert!(is_template && !allow_conn);
}

#[tokio::test]
async fn setup_timings_are_reported() {
    // Run alone (`cargo test --test integration harness::setup_timings -- --nocapture`)
    // for clean numbers; alongside the other tests it includes their load.
    let (cluster, template) = pg::setup_timings().await;
    const N: u32 = 5;
    let (mut create, mut dropping) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..N {
        let started = Instant::now();
        let db = pg::test_database().await;
        create += started.elapsed();
        let started = Instant::now();
        drop(db);
        dropping += started.elapsed();
    }
    eprintln!(
        "harness timings: cluster start {cluster:?}, role+template+migrations {template:?}, \
         per-test database {:?}, drop {:?} (local cluster: {})",
        create / N,
        dropping / N,
        pg::is_local_cluster()
    );
    assert!(create / N < Duration::from_secs(10));
}

fn validation(alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.set_issuer(&[tokens::ISSUER]);
    v.set_audience(&[tokens::AUDIENCE]);
    v.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
    v.validate_nbf = true;
    v
}

/// Finds `kid` in a JWKS document, like a server would.
fn key_from_jwks(jwks: &Value, kid: &str) -> Option<DecodingKey> {
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_value(jwks.clone()).unwrap();
    set.find(kid).map(|jwk| DecodingKey::from_jwk(jwk).unwrap())
}

/// Why [`verify`] refused a token.
#[derive(Debug)]
enum Refused {
    NoKid,
    UnknownKid,
    Jwt(ErrorKind),
}

fn verify(jwks: &Value, token: &str) -> Result<Value, Refused> {
    let jwt = |e: jsonwebtoken::errors::Error| Refused::Jwt(e.into_kind());
    let header = jsonwebtoken::decode_header(token).map_err(jwt)?;
    let kid = header.kid.ok_or(Refused::NoKid)?;
    let key = key_from_jwks(jwks, &kid).ok_or(Refused::UnknownKid)?;
    jsonwebtoken::decode::<Value>(token, &key, &validation(header.alg))
        .map(|d| d.claims)
        .map_err(jwt)
}

#[test]
fn tokens_verify_against_the_published_jwks() {
    let jwks = tokens::default_jwks();
    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 3);
    let kids: Vec<_> = keys.iter().map(|k| k["kid"].as_str().unwrap()).collect();
    assert_eq!(kids, ["ed-1", "rsa-1", "ec-1"]);
    assert_eq!(keys[0]["kty"], "OKP");
    assert_eq!(keys[0]["crv"], "Ed25519");
    assert_eq!(keys[0]["alg"], "EdDSA");
    assert_eq!(keys[1]["kty"], "RSA");
    assert_eq!(keys[1]["alg"], "RS256");
    assert_eq!(keys[2]["kty"], "EC");
    assert_eq!(keys[2]["crv"], "P-256");
    assert_eq!(keys[2]["alg"], "ES256");

    let claims = verify(&jwks, &tokens::token_for("alice")).expect("ed token verifies");
    assert_eq!(claims["sub"], "alice");
    for key in [TestKey::rsa(), TestKey::ec()] {
        let token = key.sign(&tokens::claims_for("bob"));
        let claims = verify(&jwks, &token).unwrap_or_else(|e| panic!("{} token: {e:?}", key.kid));
        assert_eq!(claims["sub"], "bob");
        assert_eq!(
            jsonwebtoken::decode_header(&token).unwrap().kid.as_deref(),
            Some(key.kid.as_str())
        );
    }

    // Negative cases.
    let refused = |token: String| verify(&jwks, &token).expect_err("the token is refused");
    assert!(matches!(refused(tokens::foreign_token_for("eve")), Refused::UnknownKid));
    assert!(matches!(
        refused(tokens::forged_token_for("eve")),
        Refused::Jwt(ErrorKind::InvalidSignature)
    ));
    assert!(matches!(
        refused(tokens::unknown_kid_token_for("eve")),
        Refused::UnknownKid
    ));
    assert!(matches!(refused(tokens::no_kid_token_for("eve")), Refused::NoKid));
    assert!(matches!(
        refused(tokens::expired_token_for("eve")),
        Refused::Jwt(ErrorKind::ExpiredSignature)
    ));
    assert!(matches!(
        refused(tokens::not_yet_valid_token_for("eve")),
        Refused::Jwt(ErrorKind::ImmatureSignature)
    ));
    assert!(matches!(
        refused(tokens::wrong_issuer_token_for("eve")),
        Refused::Jwt(ErrorKind::InvalidIssuer)
    ));
    assert!(matches!(
        refused(tokens::wrong_audience_token_for("eve")),
        Refused::Jwt(ErrorKind::InvalidAudience)
    ));

    // The foreign key verifies against its own JWK (so it is a real key),
    // but never against the published ed-1.
    let foreign = TestKey::foreign();
    let token = foreign.sign(&tokens::claims_for("eve"));
    let ok = jsonwebtoken::decode::<Value>(&token, &foreign.decoding_key(), &validation(Algorithm::EdDSA));
    assert!(ok.is_ok());
    let bad = jsonwebtoken::decode::<Value>(&token, &TestKey::ed().decoding_key(), &validation(Algorithm::EdDSA));
    assert!(bad.is_err());

    // Crafted tokens are well-formed JWTs with the advertised header.
    let hs = tokens::sign_hs256(
        TestKey::ed().public_pem().as_bytes(),
        Some("ed-1"),
        &tokens::claims_for("eve"),
    );
    assert_eq!(jsonwebtoken::decode_header(&hs).unwrap().alg, Algorithm::HS256);
    let none = tokens::unsigned_token(Some("ed-1"), &json!({"sub": "eve"}));
    assert!(none.ends_with('.') && none.split('.').count() == 3);
    assert!(
        jsonwebtoken::decode_header(&none).is_err(),
        "alg none must not be a known algorithm"
    );
}

#[test]
fn derived_jwks_match_openssl_fixtures() {
    let fixture: Value = serde_json::from_str(include_str!("../fixtures/jwks_public.json")).unwrap();
    let derived = tokens::default_jwks();
    for (want, got) in fixture["keys"]
        .as_array()
        .unwrap()
        .iter()
        .zip(derived["keys"].as_array().unwrap())
    {
        for field in ["kty", "crv", "x", "y", "n", "e", "kid", "alg"] {
            assert_eq!(want.get(field), got.get(field), "{field} of {}", want["kid"]);
        }
    }
    let foreign: Value = serde_json::from_str(include_str!("../fixtures/foreign_jwk.json")).unwrap();
    assert_eq!(foreign["x"], TestKey::foreign().public_jwk()["x"]);
    assert_ne!(foreign["x"], TestKey::ed().public_jwk()["x"]);
    // And the public PEMs agree with the JWKs.
    let jwk: Jwk = serde_json::from_value(TestKey::ed().public_jwk()).unwrap();
    let token = tokens::token_for("alice");
    let from_pem = DecodingKey::from_ed_pem(TestKey::ed().public_pem().as_bytes()).unwrap();
    let v = validation(Algorithm::EdDSA);
    assert!(jsonwebtoken::decode::<Value>(&token, &from_pem, &v).is_ok());
    assert!(jsonwebtoken::decode::<Value>(&token, &DecodingKey::from_jwk(&jwk).unwrap(), &v).is_ok());
}

#[tokio::test]
async fn jwks_server_serves_counts_rotates_and_fails() {
    let server = JwksServer::start_default().await;
    let http = reqwest::Client::new();
    assert_eq!(server.hits(), 0);

    let resp = http.get(&server.url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body, tokens::default_jwks());
    assert!(verify(&body, &tokens::token_for("alice")).is_ok());
    assert_eq!(server.hits(), 1);

    // Rotation: ed-1 is replaced by ed-2 (the former foreign key).
    let rotated = TestKey::foreign().with_kid("ed-2");
    server.set_keys(tokens::jwks_json([&rotated]));
    let body: Value = http.get(&server.url).send().await.unwrap().json().await.unwrap();
    assert!(verify(&body, &tokens::token_for("alice")).is_err());
    assert!(verify(&body, &rotated.sign(&tokens::claims_for("alice"))).is_ok());
    assert_eq!(server.hits(), 2);

    // Outage.
    server.set_failing(true);
    let resp = http.get(&server.url).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(server.hits(), 3);
    server.set_failing(false);
    let well_known = format!("{}/.well-known/jwks.json", server.base_url);
    assert_eq!(http.get(&well_known).send().await.unwrap().status(), 200);
    assert_eq!(server.hits.load(std::sync::atomic::Ordering::SeqCst), 4);

    // Junk body, cache header, delay, unknown path.
    server.set_raw_body(Some("not json"));
    server.set_cache_control(Some("max-age=60"));
    let resp = http.get(&server.url).send().await.unwrap();
    assert_eq!(resp.headers()["cache-control"], "max-age=60");
    assert_eq!(resp.text().await.unwrap(), "not json");
    server.set_raw_body(None);
    server.set_delay(Duration::from_millis(300));
    let started = Instant::now();
    let err = http
        .get(&server.url)
        .timeout(Duration::from_millis(100))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout());
    assert!(started.elapsed() < Duration::from_millis(290));
    server.set_delay(Duration::ZERO);
    assert_eq!(
        http.get(format!("{}/nope", server.base_url))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(server.hits(), 7);
    server.reset_hits();
    assert_eq!(server.hits(), 0);

    // Dropping the server stops it.
    let url = server.url.clone();
    drop(server);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(http.get(&url).timeout(Duration::from_secs(2)).send().await.is_err());
}
