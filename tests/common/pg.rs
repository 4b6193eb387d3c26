//! A real PostgreSQL for integration tests — never a mock.
//!
//! * `TEST_DATABASE_URL` set (a superuser URL): that server is used.
//! * Otherwise a throwaway cluster is started once per test process (lazily,
//!   on first use) from the highest `/usr/lib/postgresql/<version>/bin`, as
//!   the `postgres` user when the tests run as root, on a free loopback
//!   port. It lives in `mana-sync-pg-<pid>` under the tmpfs `/dev/shm` if
//!   roomy, else the temp dir; dies with the test process
//!   (`PR_SET_PDEATHSIG`), and leftovers of dead processes are removed on the
//!   next start.
//! * Neither available: tests panic with the fix; they never skip silently.
//! * [`DURABLE_VAR`] set (the load benchmark sets it): the throwaway cluster
//!   is kept as production keeps one, on disk with `fsync`, full page writes
//!   and synchronous commit on, rather than on tmpfs with all three off.
//!
//! Once per process two ordinary login roles are ensured, as a production
//! deployment has them: [`OWNER_ROLE`] owns a template database and migrates
//! it; [`APP_ROLE`], which the server under test connects as, owns nothing
//! and is only granted `SELECT, INSERT, UPDATE, DELETE` on the tables (the
//! grants SECURITY.md gives). Neither is a superuser nor BYPASSRLS, so
//! row-level security binds the server in every test. Every test then gets a
//! fresh copy of the template from [`test_database`]; test databases are
//! dropped when their [`TestDatabase`] is dropped.

use std::fmt::Write as _;
use std::io::{self, Read as _};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection as _, PgConnection};
use url::Url;

/// The ordinary (NOSUPERUSER, NOBYPASSRLS) login role the server connects
/// as: granted what serving needs, owner of nothing.
pub const APP_ROLE: &str = "mana_sync_app";
/// The ordinary login role that owns the databases and runs the migrations.
pub const OWNER_ROLE: &str = "mana_sync_owner";
/// The roles' password (the local cluster trusts loopback anyway).
const PASSWORD: &str = "mana_sync";

/// Set (to anything) before the first use to start the throwaway cluster
/// on disk with durable commits (see the module docs).
pub const DURABLE_VAR: &str = "MANA_SYNC_TEST_PG_DURABLE";
/// More `name=value` settings for the throwaway cluster, space-separated
/// (the load benchmark's `--statements` preloads pg_stat_statements).
pub const SETTINGS_VAR: &str = "MANA_SYNC_TEST_PG_SETTINGS";

const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a fast shutdown ([`restart_server`]) may take.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
const DIR_PREFIX: &str = "mana-sync-pg-";
/// Arbitrary key for the advisory lock serialising role creation across
/// processes sharing one `TEST_DATABASE_URL` server.
const ROLE_LOCK_KEY: i64 = 0x6d61_6e61_7379_6e63; // "manasync"
/// Test databases and templates left behind on an external server by killed
/// test processes are dropped once they are this old.
const EXTERNAL_STALE_AFTER: Duration = Duration::from_secs(24 * 3600);

// ---------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------

/// One test's own database: a fresh, migrated copy of the template.
#[derive(Debug)]
pub struct TestDatabase {
    /// Database name (`test_<uuid v7 simple>`).
    pub name: String,
    /// URL connecting as [`APP_ROLE`] (RLS enforced): what the server uses.
    pub app_url: String,
    /// URL connecting as [`OWNER_ROLE`], which owns the tables (and is still
    /// subject to RLS, which is forced): for migrations.
    pub owner_url: String,
    /// Superuser URL to the same database (bypasses RLS): for setup/inspection.
    pub admin_url: String,
}

impl TestDatabase {
    /// A pool connected as [`APP_ROLE`] (max 10 connections, opened lazily).
    pub async fn app_pool(&self) -> PgPool {
        pool(&self.app_url, 10).await
    }

    /// A pool connected as the superuser (max 5 connections).
    pub async fn admin_pool(&self) -> PgPool {
        pool(&self.admin_url, 5).await
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime; do the async work on a thread
        // of its own with a private runtime. WITH (FORCE) ends any
        // connections the test's pools or servers still hold.
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let admin = server_admin_url();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            let drop_db = async {
                let mut conn = PgConnection::connect(&admin).await.ok()?;
                let _ = sqlx::query(AssertSqlSafe(sql)).execute(&mut conn).await;
                let _ = conn.close().await;
                Some(())
            };
            rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), drop_db).await.ok()? })
        })
        .join();
    }
}

/// A fresh database for one test, migrated, owned by [`OWNER_ROLE`].
///
/// The first call in a process starts the cluster (if needed), ensures the
/// roles and builds the template; later calls only copy the template.
pub async fn test_database() -> TestDatabase {
    let template = &shared().await.template;
    create_database(&format!("TEMPLATE {template}")).await
}

/// A fresh database with no tables, owned by [`OWNER_ROLE`], which has
/// granted [`APP_ROLE`] what serving needs: as an operator prepares one
/// before the first `mana-sync migrate`.
pub async fn empty_database() -> TestDatabase {
    shared().await;
    let db = create_database("TEMPLATE template0").await;
    let mut owner = connect_retrying(&Url::parse(&db.owner_url).unwrap(), Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for grant in serving_grants(APP_ROLE) {
        exec(&mut owner, grant).await.unwrap_or_else(|e| panic!("{e}"));
    }
    let _ = owner.close().await;
    db
}

/// `CREATE DATABASE … {from} OWNER` [`OWNER_ROLE`] under a new name.
async fn create_database(from: &str) -> TestDatabase {
    let name = format!("test_{}", uuid::Uuid::now_v7().simple());
    let admin_server = admin_server_url();
    let mut conn = connect_retrying(admin_server, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // Postgres refuses to copy a template while anything else is connected to
    // it, so copies are serialised within the process (each process has its
    // own template) and retried on "being accessed by other users".
    static CREATE_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    {
        let _guard = CREATE_LOCK.lock().await;
        let sql = format!("CREATE DATABASE {name} {from} OWNER {OWNER_ROLE}");
        let mut attempt = 0;
        loop {
            attempt += 1;
            match sqlx::query(AssertSqlSafe(sql.clone())).execute(&mut conn).await {
                Ok(_) => break,
                Err(e) if attempt < 8 && is_object_in_use(&e) => {
                    tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
                }
                Err(e) => panic!("{sql}: {e}"),
            }
        }
    }
    let _ = conn.close().await;

    TestDatabase {
        app_url: with_db(&role_server_url(APP_ROLE), &name).into(),
        owner_url: with_db(&role_server_url(OWNER_ROLE), &name).into(),
        admin_url: with_db(admin_server, &name).into(),
        name,
    }
}

/// Superuser URL of the server's maintenance database (`postgres` for the
/// local cluster; `TEST_DATABASE_URL` as given otherwise). Starts the local
/// cluster on first use (blocking).
pub fn server_admin_url() -> String {
    admin_server_url().to_string()
}

fn admin_server_url() -> &'static Url {
    match server() {
        Server::External { admin_url } => admin_url,
        Server::Local(c) => &c.admin_url,
    }
}

/// The maintenance database as `role` (one of the test roles).
fn role_server_url(role: &str) -> Url {
    let mut url = admin_server_url().clone();
    url.set_username(role)
        .and_then(|()| url.set_password(Some(PASSWORD)))
        .unwrap_or_else(|()| panic!("{} takes no user name: it names no host", redact(&url)));
    url
}

/// True when tests run against a throwaway cluster owned by this process
/// (false with `TEST_DATABASE_URL`).
pub fn is_local_cluster() -> bool {
    matches!(server(), Server::Local(_))
}

/// Restarts the local cluster's server: a fast shutdown (SIGINT to the
/// postmaster; open connections are terminated, committed data survives),
/// `down_for` of downtime, then a start on the same port and data directory
/// with the same settings. Returns once the server accepts connections again.
///
/// Every pool and connection to the server breaks, including those of other
/// tests running concurrently in the same process: put tests that restart
/// the server in a test binary of their own. Concurrent calls are
/// serialised; calling it several times is fine.
///
/// # Panics
///
/// With `TEST_DATABASE_URL` set (an external server cannot be restarted by
/// the tests: unset it to run such tests), or if the server fails to stop
/// or to come back.
pub async fn restart_server(down_for: Duration) {
    let cluster = match server() {
        Server::Local(c) => c,
        Server::External { .. } => panic!(
            "this test restarts the PostgreSQL server and needs the local throwaway cluster, \
             but TEST_DATABASE_URL is set (an external server cannot be restarted by the tests); \
             unset TEST_DATABASE_URL to run it"
        ),
    };
    static RESTART_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _guard = RESTART_LOCK.lock().await;

    blocking(move || cluster.stop()).await;
    tokio::time::sleep(down_for).await;
    blocking(move || cluster.start()).await;
    // The postmaster is ready; make sure a real session works too.
    let conn = connect_retrying(admin_server_url(), Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("after restarting the test PostgreSQL: {e}"));
    let _ = conn.close().await;
}

/// Runs a blocking cluster operation off the async workers; panics with its error.
async fn blocking(op: impl FnOnce() -> Result<(), String> + Send + 'static) {
    match tokio::task::spawn_blocking(op).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{e}"),
        Err(e) => match e.try_into_panic() {
            Ok(payload) => std::panic::resume_unwind(payload),
            Err(e) => panic!("test PostgreSQL restart task: {e}"),
        },
    }
}

/// Name of this process's migrated template database.
pub async fn template_name() -> String {
    shared().await.template.clone()
}

/// How long the once-per-process setup took: (cluster start — zero with
/// `TEST_DATABASE_URL`, role + template creation and migration).
pub async fn setup_timings() -> (Duration, Duration) {
    let shared = shared().await;
    let cluster = match server() {
        Server::Local(c) => c.startup,
        Server::External { .. } => Duration::ZERO,
    };
    (cluster, shared.setup)
}

// ---------------------------------------------------------------------------
// Server selection and the local cluster
// ---------------------------------------------------------------------------

enum Server {
    External { admin_url: Url },
    Local(LocalCluster),
}

struct LocalCluster {
    dir: PathBuf,
    port: u16,
    /// The superuser `postgres` on database `postgres`.
    admin_url: Url,
    startup: Duration,
    /// How to start the postmaster again ([`restart_server`]).
    bin: PathBuf,
    data: PathBuf,
    run_as: Option<(libc::uid_t, libc::gid_t)>,
    log_path: PathBuf,
    /// The running postmaster; `None` while [`restart_server`] has it down.
    postmaster: Mutex<Option<Postmaster>>,
}

/// A postmaster started by [`start_postmaster`].
struct Postmaster {
    pid: libc::pid_t,
    /// The supervisor thread's events; [`PostmasterEvent::Exited`] comes
    /// once the postmaster has exited and been reaped.
    events: mpsc::Receiver<PostmasterEvent>,
}

impl LocalCluster {
    /// Fast shutdown: SIGINT to the postmaster, then waits until it has
    /// exited and its port is free. A no-op when it is not running.
    fn stop(&self) -> Result<(), String> {
        let mut running = self.postmaster.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(pm) = running.as_ref() {
            let exited = |event: &PostmasterEvent| matches!(event, PostmasterEvent::Exited(_));
            let already_gone = match pm.events.try_recv() {
                Ok(event) => exited(&event),
                Err(mpsc::TryRecvError::Disconnected) => true,
                Err(mpsc::TryRecvError::Empty) => false,
            };
            if !already_gone {
                // SAFETY: plain syscall. Only the supervisor thread reaps the
                // postmaster, and it had not (no Exited event) a moment ago;
                // the pid is not reused before that.
                if unsafe { libc::kill(pm.pid, libc::SIGINT) } != 0 {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::ESRCH) {
                        return Err(format!("stop the test PostgreSQL (SIGINT to pid {}): {e}", pm.pid));
                    }
                }
                let deadline = Instant::now() + STOP_TIMEOUT;
                loop {
                    match pm
                        .events
                        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                    {
                        Ok(event) if exited(&event) => break,
                        Ok(_) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            return Err(format!(
                                "test PostgreSQL (pid {}) still running {STOP_TIMEOUT:?} after a fast \
                                 shutdown request; log {}:\n{}",
                                pm.pid,
                                self.log_path.display(),
                                read_log(&self.log_path)
                            ));
                        }
                    }
                }
            }
            *running = None;
        }
        drop(running);

        // The listening socket closes when the postmaster exits; make sure.
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match TcpListener::bind((Ipv4Addr::LOCALHOST, self.port)) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!(
                        "port {} still in use {STOP_TIMEOUT:?} after stopping the test PostgreSQL: {e}",
                        self.port
                    ));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Starts the postmaster again on the same port and data directory and
    /// waits until it is ready. A no-op when it is running.
    fn start(&self) -> Result<(), String> {
        let mut running = self.postmaster.lock().unwrap_or_else(PoisonError::into_inner);
        if running.is_some() {
            return Ok(());
        }
        // Something else may have grabbed the port while the server was
        // down (another process probing for a free port holds it briefly).
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match start_postmaster(&self.bin, &self.dir, &self.data, self.port, self.run_as, &self.log_path) {
                Ok(pm) => {
                    *running = Some(pm);
                    return Ok(());
                }
                Err(StartError::PortTaken(e)) if Instant::now() >= deadline => {
                    return Err(format!(
                        "restarting the test PostgreSQL: port {} stayed taken for {READY_TIMEOUT:?}: {e}",
                        self.port
                    ));
                }
                Err(StartError::PortTaken(_)) => std::thread::sleep(Duration::from_millis(100)),
                Err(StartError::Fatal(e)) => return Err(format!("restarting the test PostgreSQL: {e}")),
            }
        }
    }
}

fn server() -> &'static Server {
    // The outcome, failure included, is remembered so a broken setup fails
    // every test quickly with the same message instead of retrying.
    static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();
    let server = SERVER.get_or_init(|| match std::env::var("TEST_DATABASE_URL") {
        Ok(url) if !url.trim().is_empty() => Url::parse(url.trim())
            .map(|admin_url| Server::External { admin_url })
            .map_err(|e| {
                format!("TEST_DATABASE_URL is not a URL ({e}): set it to postgres://user:password@host:port/db")
            }),
        _ => start_local_cluster().map(Server::Local),
    });
    match server {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    }
}

fn start_local_cluster() -> Result<LocalCluster, String> {
    let started = Instant::now();
    let bin = find_pg_bin_dir().ok_or_else(|| {
        "no PostgreSQL server found for the integration tests: install the PostgreSQL server \
         (apt-get install postgresql: initdb and postgres in /usr/lib/postgresql/<version>/bin) \
         or set TEST_DATABASE_URL=postgres://... (a superuser URL)"
            .to_owned()
    })?;

    for base in base_dir_candidates() {
        remove_stale_dirs(&base);
    }

    let dir = cluster_base_dir().join(format!("{DIR_PREFIX}{}", std::process::id()));
    if dir.exists() {
        // Left by an earlier process with our (now reused) pid.
        let _ = std::fs::remove_dir_all(&dir);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let data = dir.join("data");

    // initdb and postgres refuse to run as root: use the `postgres` user.
    let run_as = if unsafe { libc::geteuid() } == 0 {
        let ids = lookup_user("postgres").ok_or(
            "running as root, but there is no `postgres` system user to run the test PostgreSQL \
             as (initdb and postgres refuse root): install the postgresql package, which makes \
             one, or set TEST_DATABASE_URL",
        )?;
        let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
        if unsafe { libc::chown(path.as_ptr(), ids.0, ids.1) } != 0 {
            return Err(format!("chown {}: {}", dir.display(), io::Error::last_os_error()));
        }
        Some(ids)
    } else {
        None
    };

    let mut initdb = Command::new(bin.join("initdb"));
    initdb
        .arg("-D")
        .arg(&data)
        .args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ])
        .current_dir(&dir)
        .env_remove("PGDATA")
        .stdin(Stdio::null());
    if let Some((uid, gid)) = run_as {
        initdb.uid(uid).gid(gid);
    }
    let out = initdb
        .output()
        .map_err(|e| format!("run {}: {e}", bin.join("initdb").display()))?;
    if !out.status.success() {
        return Err(format!(
            "initdb failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }

    let log_path = dir.join("postgres.log");
    let mut last_error = String::new();
    for _attempt in 0..3 {
        let port = free_port().map_err(|e| format!("find a free port: {e}"))?;
        match start_postmaster(&bin, &dir, &data, port, run_as, &log_path) {
            Ok(postmaster) => {
                let admin_url = format!("postgres://postgres@127.0.0.1:{port}/postgres?sslmode=disable");
                return Ok(LocalCluster {
                    admin_url: Url::parse(&admin_url).expect("the local cluster's URL"),
                    dir,
                    port,
                    startup: started.elapsed(),
                    bin,
                    data,
                    run_as,
                    log_path,
                    postmaster: Mutex::new(Some(postmaster)),
                });
            }
            Err(StartError::PortTaken(e)) => last_error = e, // raced for the port: retry
            Err(StartError::Fatal(e)) => return Err(e),
        }
    }
    Err(last_error)
}

enum StartError {
    PortTaken(String),
    Fatal(String),
}

enum PostmasterEvent {
    Started(libc::pid_t),
    SpawnFailed(io::Error),
    Exited(io::Result<ExitStatus>),
}

fn start_postmaster(
    bin: &Path,
    dir: &Path,
    data: &Path,
    port: u16,
    run_as: Option<(libc::uid_t, libc::gid_t)>,
    log_path: &Path,
) -> Result<Postmaster, StartError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(|e| StartError::Fatal(format!("open {}: {e}", log_path.display())))?;
    let log_err = log.try_clone().map_err(|e| StartError::Fatal(e.to_string()))?;

    let mut cmd = Command::new(bin.join("postgres"));
    cmd.arg("-D")
        .arg(data)
        .arg("-p")
        .arg(port.to_string())
        .arg("-k")
        .arg(dir)
        .args(["-c", "listen_addresses=127.0.0.1", "-c", "max_connections=300"])
        .args(durability_settings().iter().flat_map(|setting| ["-c", setting]))
        .args(
            extra_settings()
                .into_iter()
                .flat_map(|setting| ["-c".to_owned(), setting]),
        )
        .current_dir(dir)
        .env_remove("PGDATA")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err));
    if let Some((uid, gid)) = run_as {
        cmd.uid(uid).gid(gid);
    }
    // SAFETY: only async-signal-safe calls between fork and exec. The
    // closure runs after std's setgid/setuid (a credential change clears
    // the death signal, so it must come after them). SIGQUIT is an immediate
    // shutdown: the postmaster takes its backends down with it.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }

    // The death signal fires when the *thread* that forked the child exits,
    // so fork from a thread that lives as long as the server does.
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("mana-sync-test-postgres".into())
        .spawn(move || match cmd.spawn() {
            Err(e) => {
                let _ = tx.send(PostmasterEvent::SpawnFailed(e));
            }
            Ok(mut child) => {
                let _ = tx.send(PostmasterEvent::Started(child.id() as libc::pid_t));
                let status = child.wait();
                let _ = tx.send(PostmasterEvent::Exited(status));
            }
        })
        .map_err(|e| StartError::Fatal(format!("spawn the postgres supervisor thread: {e}")))?;

    let pid = match rx.recv() {
        Ok(PostmasterEvent::Started(pid)) => pid,
        Ok(PostmasterEvent::SpawnFailed(e)) => {
            return Err(StartError::Fatal(format!(
                "start {}: {e}",
                bin.join("postgres").display()
            )));
        }
        _ => {
            return Err(StartError::Fatal("postgres supervisor thread vanished".into()));
        }
    };

    let deadline = Instant::now() + READY_TIMEOUT;
    let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
    loop {
        if let Ok(PostmasterEvent::Exited(status)) = rx.try_recv() {
            let log = read_log(log_path);
            let msg = format!(
                "test PostgreSQL exited during startup ({status:?}); log {}:\n{log}",
                log_path.display()
            );
            return Err(if log.contains("Address already in use") {
                StartError::PortTaken(msg)
            } else {
                StartError::Fatal(msg)
            });
        }
        // postmaster.pid's 8th line says "ready" once connections are accepted.
        let ready = std::fs::read_to_string(data.join("postmaster.pid"))
            .is_ok_and(|pid_file| pid_file.lines().nth(7).is_some_and(|l| l.trim() == "ready"));
        if ready && TcpStream::connect_timeout(&addr.into(), Duration::from_secs(1)).is_ok() {
            return Ok(Postmaster { pid, events: rx });
        }
        if Instant::now() > deadline {
            return Err(StartError::Fatal(format!(
                "test PostgreSQL not ready on port {port} after {READY_TIMEOUT:?}; log {}:\n{}",
                log_path.display(),
                read_log(log_path)
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether the cluster keeps commits as production does ([`DURABLE_VAR`]).
fn durable() -> bool {
    std::env::var_os(DURABLE_VAR).is_some()
}

/// Durable: production's defaults, with the memory a dedicated server of
/// this machine's size would give PostgreSQL. Otherwise nothing is synced:
/// a test database need not survive a power cut.
fn durability_settings() -> &'static [&'static str] {
    if durable() {
        &[
            "fsync=on",
            "synchronous_commit=on",
            "full_page_writes=on",
            "shared_buffers=1GB",
        ]
    } else {
        &["fsync=off", "synchronous_commit=off", "full_page_writes=off"]
    }
}

/// The settings [`SETTINGS_VAR`] adds.
fn extra_settings() -> Vec<String> {
    std::env::var(SETTINGS_VAR)
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

fn read_log(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port())
}

/// The highest `/usr/lib/postgresql/<version>/bin` with `initdb` and `postgres`.
pub fn find_pg_bin_dir() -> Option<PathBuf> {
    let has_server = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version: Vec<u32> = e
                .file_name()
                .to_str()?
                .split('.')
                .map(|p| p.parse().ok())
                .collect::<Option<_>>()?;
            let bin = e.path().join("bin");
            has_server(&bin).then_some((version, bin))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, bin)| bin)
}

fn lookup_user(name: &str) -> Option<(libc::uid_t, libc::gid_t)> {
    let cname = std::ffi::CString::new(name).ok()?;
    // SAFETY: getpwnam returns a pointer to static storage or null; it is
    // read immediately (the once-per-process setup is the only caller).
    unsafe {
        let pw = libc::getpwnam(cname.as_ptr());
        if pw.is_null() {
            None
        } else {
            Some(((*pw).pw_uid, (*pw).pw_gid))
        }
    }
}

fn pid_alive(pid: i32) -> bool {
    // A zombie (exited, not yet reaped) is as good as dead.
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        && stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    {
        return false;
    }
    // SAFETY: signal 0 only checks for existence/permission.
    pid > 0 && (unsafe { libc::kill(pid, 0) } == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

/// Where cluster directories may live.
fn base_dir_candidates() -> [PathBuf; 2] {
    [PathBuf::from("/dev/shm"), std::env::temp_dir()]
}

/// The cluster's parent directory: `/dev/shm` when it is a writable tmpfs
/// with at least 1 GiB free (several times faster than disk for CREATE
/// DATABASE: fsync is off, but the copy is still written); else the temp
/// dir, which a [`durable`] cluster always takes (tmpfs is memory, not disk).
fn cluster_base_dir() -> PathBuf {
    if durable() {
        return std::env::temp_dir();
    }
    let shm = Path::new("/dev/shm");
    let cpath = std::ffi::CString::new("/dev/shm").unwrap();
    // SAFETY: plain syscalls on a valid C string and a zeroed out-struct.
    let roomy = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        libc::statvfs(cpath.as_ptr(), &mut st) == 0
            && (st.f_bavail as u128) * (st.f_frsize as u128) >= 1 << 30
            && libc::access(cpath.as_ptr(), libc::W_OK | libc::X_OK) == 0
    };
    if shm.is_dir() && roomy {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// Removes `mana-sync-pg-<pid>` directories of processes that are gone
/// (and whose postmaster, if any, is gone too).
fn remove_stale_dirs(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    let me = std::process::id() as i32;
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(DIR_PREFIX))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me || pid_alive(pid) {
            continue;
        }
        let postmaster = std::fs::read_to_string(entry.path().join("data/postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()));
        if postmaster.is_some_and(pid_alive) {
            continue;
        }
        let _ = std::fs::remove_dir_all(entry.path());
    }
}

// ---------------------------------------------------------------------------
// Once-per-process database setup: role and template
// ---------------------------------------------------------------------------

struct Shared {
    template: String,
    setup: Duration,
}

async fn shared() -> &'static Shared {
    static SHARED: tokio::sync::OnceCell<Result<Shared, String>> = tokio::sync::OnceCell::const_new();
    // Only plain data is kept: every #[tokio::test] has its own runtime, and
    // connections must not outlive the runtime that opened them.
    let shared = SHARED.get_or_init(|| async { init_shared().await }).await;
    match shared {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    }
}

async fn init_shared() -> Result<Shared, String> {
    let started = Instant::now();
    let mut admin = connect_retrying(admin_server_url(), Duration::from_secs(10)).await?;

    ensure_roles(&mut admin).await?;
    if !is_local_cluster() {
        drop_stale_external_databases(&mut admin).await;
    }

    let template = format!("mana_sync_tpl_{}", uuid::Uuid::now_v7().simple());
    exec(&mut admin, format!("CREATE DATABASE {template} OWNER {OWNER_ROLE}")).await?;

    // As a deployment does it: the owner grants the serving role its
    // privileges on whatever it creates, then migrates.
    let mut owner = connect_retrying(
        &with_db(&role_server_url(OWNER_ROLE), &template),
        Duration::from_secs(5),
    )
    .await?;
    for grant in serving_grants(APP_ROLE) {
        exec(&mut owner, grant).await?;
    }
    mana_sync::store::postgres::MIGRATOR
        .run(&mut owner)
        .await
        .map_err(|e| format!("migrating the test template {template} as {OWNER_ROLE}: {e}"))?;
    // The migrations table came under the default privileges too; serving
    // only reads it (to see that nothing is pending).
    exec(
        &mut owner,
        format!("REVOKE INSERT, UPDATE, DELETE ON _sqlx_migrations FROM {APP_ROLE}"),
    )
    .await?;
    owner.close().await.map_err(|e| e.to_string())?;

    // Nothing may connect to a template while it is copied; forbid it.
    exec(
        &mut admin,
        format!("ALTER DATABASE {template} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false"),
    )
    .await?;
    let _ = admin.close().await;
    Ok(Shared {
        template,
        setup: started.elapsed(),
    })
}

/// What the owner of a fresh database runs, before migrating it, so that
/// `role` may serve from every table the migrations create and nothing more:
/// SECURITY.md gives these statements to deployments.
pub fn serving_grants(role: &str) -> [String; 2] {
    [
        format!("GRANT USAGE ON SCHEMA public TO {role}"),
        format!("ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {role}"),
    ]
}

async fn ensure_roles(admin: &mut PgConnection) -> Result<(), String> {
    // Roles are cluster-wide and CREATE ROLE has no IF NOT EXISTS: serialise
    // with other test processes sharing the server.
    exec(admin, format!("SELECT pg_advisory_lock({ROLE_LOCK_KEY})")).await?;
    let mut result = Ok(());
    for role in [OWNER_ROLE, APP_ROLE] {
        result = ensure_role(admin, role).await;
        if result.is_err() {
            break;
        }
    }
    exec(admin, format!("SELECT pg_advisory_unlock({ROLE_LOCK_KEY})")).await?;
    result
}

/// Creates `role` as an ordinary login role, or makes it one again.
async fn ensure_role(admin: &mut PgConnection, role: &str) -> Result<(), String> {
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
        .bind(role)
        .fetch_one(&mut *admin)
        .await
        .map_err(|e| format!("look up role {role}: {e}"))?;
    let verb = if exists { "ALTER" } else { "CREATE" };
    exec(
        admin,
        format!("{verb} ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE PASSWORD '{PASSWORD}'"),
    )
    .await
}

/// On a shared external server, drops test databases and templates of this
/// harness whose name (a v7 UUID) says they are over a day old.
async fn drop_stale_external_databases(admin: &mut PgConnection) {
    let Ok(names) = sqlx::query_scalar::<_, String>(
        "SELECT datname FROM pg_database WHERE datname ~ '^(test|mana_sync_tpl)_[0-9a-f]{12}7[0-9a-f]{19}$'",
    )
    .fetch_all(&mut *admin)
    .await
    else {
        return;
    };
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    for name in names {
        let hex = &name[name.rfind('_').unwrap() + 1..];
        let Ok(created_ms) = u128::from_str_radix(&hex[..12], 16) else {
            continue;
        };
        if now_ms.saturating_sub(created_ms) > EXTERNAL_STALE_AFTER.as_millis() {
            let _ = exec(admin, format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
        }
    }
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

async fn pool(url: &str, max: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(15))
        .connect(url)
        .await
        .unwrap_or_else(|e| match Url::parse(url) {
            Ok(url) => panic!("connect pool to {}: {e}", redact(&url)),
            Err(_) => panic!("connect pool: {e}"),
        })
}

async fn exec(conn: &mut PgConnection, sql: String) -> Result<(), String> {
    sqlx::query(AssertSqlSafe(sql.clone()))
        .execute(conn)
        .await
        .map(|_| ())
        .map_err(|e| format!("{sql}: {e}"))
}

async fn connect_retrying(url: &Url, patience: Duration) -> Result<PgConnection, String> {
    let deadline = Instant::now() + patience;
    loop {
        match PgConnection::connect(url.as_str()).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() >= deadline => {
                let mut msg = format!("connect to test PostgreSQL {}: {e}", redact(url));
                if let Server::Local(cluster) = server() {
                    let _ = write!(msg, "\nserver log:\n{}", read_log(&cluster.log_path));
                }
                return Err(msg);
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// SQLSTATE 55006 object_in_use: here, a template being copied elsewhere.
fn is_object_in_use(e: &sqlx::Error) -> bool {
    e.as_database_error().and_then(|d| d.code()).as_deref() == Some("55006")
}

/// `url` pointing at database `db` instead.
fn with_db(url: &Url, db: &str) -> Url {
    let mut url = url.clone();
    url.set_path(&format!("/{db}"));
    url
}

/// `url` without its password, for messages.
fn redact(url: &Url) -> Url {
    let mut url = url.clone();
    if url.password().is_some() {
        let _ = url.set_password(Some("***"));
    }
    url
}
