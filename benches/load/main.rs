//! The load benchmark: how many changes mana-sync absorbs, how fast other
//! devices hear of them, and how many devices one replica holds, each next
//! to the physical limit measured in the same run.
//!
//! ```sh
//! cargo bench --bench load -- --all            # everything, ~6 minutes here
//! cargo bench --bench load -- --push --fanout  # some scenarios
//! cargo bench --bench load -- --poll           # empty pulls against /health
//! ```
//!
//! It starts its own PostgreSQL through the tests' harness, on disk with
//! `fsync` on (or uses `TEST_DATABASE_URL`), and replicas of the built
//! binary, or measures servers already running (`--target`). Its clients
//! are its own: async HTTP and WebSocket clients in this process. Load
//! generator, servers and database share the machine; every comparison is
//! a ratio of two figures measured in the same run, and every row says how
//! many cores each of the three used while it was measured. Results are
//! printed as a table and written as JSON (`--json`).
//!
//! Under `cargo test` (no `--bench` argument) it runs every scenario with
//! tiny sizes for a few seconds, as a smoke test.

#[path = "../../tests/common/mod.rs"]
mod common;

mod cluster;
mod measure;
mod poll;
mod pull;
mod push;
mod sockets;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;

use crate::cluster::{Deployment, Environment};
use crate::measure::{Goal, Results};

/// What to run, and against what.
#[derive(Parser)]
#[command(about = "mana-sync's load benchmark")]
struct Options {
    /// Every scenario (the default when none is named).
    #[arg(long)]
    all: bool,
    /// 1. Push batches of 1, 10 and 100 on both stores, and the raw ceiling.
    #[arg(long)]
    push: bool,
    /// 2. Pull 1,000 records written once and written 100 times.
    #[arg(long)]
    pull: bool,
    /// 3. A new device pulls 100,000 records through every page.
    #[arg(long)]
    initial: bool,
    /// 4. Push and pull with 10 thousand and 1 million records stored.
    #[arg(long)]
    growth: bool,
    /// 5. A push on replica A reaching sockets on replica B.
    #[arg(long)]
    fanout: bool,
    /// 6. Idle sockets on one replica: memory per socket, and the most it holds.
    #[arg(long)]
    capacity: bool,
    /// 7. Empty pulls (polling) against `/health` on one replica.
    #[arg(long)]
    poll: bool,
    /// How long each push load and each ceiling runs.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// A server already running (repeat it: the first is replica A, the
    /// second B). It must check tokens against the benchmark's key set
    /// (`JWKS_URL=http://127.0.0.1:<--jwks-port>/jwks`, issuer
    /// `https://auth.mana.test`, audience `mana-sync`) and not rate limit.
    #[arg(long = "target")]
    targets: Vec<String>,
    /// With `--target`: a superuser URL to its database, for the ceiling.
    #[arg(long)]
    database_url: Option<String>,
    /// The port the benchmark serves its key set on (default: any free one).
    #[arg(long)]
    jwks_port: Option<u16>,
    /// Where the results are written as JSON (default
    /// `target/load-bench.json`; a smoke run's, `target/load-bench-smoke.json`).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Tiny sizes, a few seconds in all (what the test suite runs).
    #[arg(long)]
    smoke: bool,
    /// A setting for the servers the benchmark starts, `NAME=value`
    /// (repeatable): to compare configurations in one command.
    #[arg(long = "server-env", value_parser = parse_setting)]
    server_env: Vec<(String, String)>,
    /// Preloads pg_stat_statements and prints, after each push load on
    /// PostgreSQL, the statements a push ran: calls per push, mean time.
    #[arg(long)]
    statements: bool,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

/// The sizes of one run.
struct Sizes {
    batches: &'static [usize],
    clients: usize,
    users: usize,
    duration: Duration,
    pull_records: usize,
    pull_samples: usize,
    initial_records: usize,
    growth: (usize, usize),
    growth_samples: usize,
    fan_sockets: usize,
    fan_pushes: usize,
    fan_users: usize,
    idle_sockets: usize,
    most_sockets: usize,
    poll_connections: usize,
}

impl Sizes {
    fn full(duration: Duration) -> Sizes {
        Sizes {
            batches: &[1, 10, 100],
            clients: 32,
            users: 100,
            duration,
            pull_records: 1000,
            pull_samples: 200,
            initial_records: 100_000,
            growth: (10_000, 1_000_000),
            growth_samples: 200,
            fan_sockets: 1000,
            fan_pushes: 200,
            fan_users: 10_000,
            idle_sockets: 10_000,
            most_sockets: 19_000,
            poll_connections: 16,
        }
    }

    fn smoke() -> Sizes {
        Sizes {
            batches: &[1, 10],
            clients: 4,
            users: 8,
            duration: Duration::from_millis(500),
            pull_records: 50,
            pull_samples: 5,
            initial_records: 2500,
            growth: (200, 1000),
            growth_samples: 5,
            fan_sockets: 20,
            fan_pushes: 3,
            fan_users: 50,
            idle_sockets: 50,
            most_sockets: 200,
            poll_connections: 2,
        }
    }
}

fn main() {
    let mut options = Options::parse();
    let smoke = options.smoke || !options.bench;
    if options.targets.is_empty() && !smoke {
        // Before the harness starts its cluster: production's durability.
        // SAFETY: nothing else runs yet; no thread reads the environment.
        unsafe { std::env::set_var(common::pg::DURABLE_VAR, "1") };
    }
    if options.statements {
        // SAFETY: as above.
        unsafe { std::env::set_var(common::pg::SETTINGS_VAR, "shared_preload_libraries=pg_stat_statements") };
    }
    let everything = !(options.push
        || options.pull
        || options.initial
        || options.growth
        || options.fanout
        || options.capacity
        || options.poll);
    if options.all || everything {
        options.push = true;
        options.pull = true;
        options.initial = true;
        options.growth = true;
        options.fanout = true;
        options.capacity = true;
        options.poll = true;
    }
    let sizes = if smoke {
        Sizes::smoke()
    } else {
        Sizes::full(options.duration)
    };
    // Ten thousand sockets need ten thousand descriptors here too.
    let descriptors = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024) as usize;
    let started = Instant::now();
    let results = common::runtime().block_on(run(&options, &sizes, descriptors, smoke));
    println!("\n{}", header(&options, smoke, started.elapsed()));
    println!("{}", results.table());
    let document = json!({
        "date": time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap(),
        "machine": machine(),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "smoke": smoke,
        "postgres_durable": !smoke && options.targets.is_empty(),
        "results": results.rows,
    });
    let json = options.json.clone().unwrap_or_else(|| {
        PathBuf::from(if smoke {
            "target/load-bench-smoke.json"
        } else {
            "target/load-bench.json"
        })
    });
    if let Some(dir) = json.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(&json, serde_json::to_string_pretty(&document).unwrap()).expect("write the results");
    println!("results written to {}", json.display());
    if smoke {
        println!("load bench smoke run: 1 passed, 0 failed");
    }
}

async fn run(options: &Options, sizes: &Sizes, descriptors: usize, smoke: bool) -> Results {
    let mut results = Results::new(!smoke);
    let env = Environment::start(options.jwks_port, options.server_env.clone()).await;
    let postgres = if options.targets.is_empty() {
        env.postgres(2).await
    } else {
        cluster::targets(&options.targets, options.database_url.clone())
    };
    if options.push {
        push_scenarios(&postgres, sizes, options.statements, &mut results).await;
        if options.targets.is_empty() {
            push_scenarios(&env.sqlite().await, sizes, false, &mut results).await;
        }
    }
    if options.pull {
        pull::history(&postgres, sizes.pull_records, sizes.pull_samples, &mut results).await;
        if options.targets.is_empty() {
            pull::history(
                &env.sqlite().await,
                sizes.pull_records,
                sizes.pull_samples,
                &mut results,
            )
            .await;
        }
    }
    if options.initial {
        pull::initial_sync(&postgres, sizes.initial_records, &mut results).await;
    }
    if options.growth {
        let fresh = if options.targets.is_empty() {
            Some(env.postgres(1).await)
        } else {
            None
        };
        let deployment = fresh.as_ref().unwrap_or(&postgres);
        pull::growth(
            deployment,
            sizes.growth.0,
            sizes.growth.1,
            sizes.growth_samples,
            &mut results,
        )
        .await;
    }
    if options.fanout {
        if postgres.replicas.len() < 2 {
            eprintln!("fan-out needs two replicas (--target twice): skipped");
        } else {
            sockets::one_user(&postgres, sizes.fan_sockets, sizes.fan_pushes, &mut results).await;
            sockets::many_users(&postgres, sizes.fan_users, &mut results).await;
        }
    }
    if options.capacity {
        if options.targets.is_empty() {
            let replica = env.postgres(1).await;
            // Every socket is a descriptor here too; keep some for the rest.
            let most = sizes.most_sockets.min(descriptors.saturating_sub(200));
            sockets::capacity(&replica.replicas[0], sizes.idle_sockets, most, &mut results).await;
        } else {
            eprintln!("capacity measures the memory of a replica the benchmark started: skipped with --target");
        }
    }
    if options.poll {
        let fresh = if options.targets.is_empty() {
            Some(env.postgres(1).await)
        } else {
            None
        };
        let deployment = fresh.as_ref().unwrap_or(&postgres);
        poll::empty_pulls(deployment, sizes.poll_connections, sizes.duration, &mut results).await;
    }
    results
}

/// Scenario 1 on one store: push loads of each batch size, then (on
/// PostgreSQL) the raw ceiling on the same database.
async fn push_scenarios(deployment: &Deployment, sizes: &Sizes, statements: bool, results: &mut Results) {
    let base = &deployment.replicas[0].base;
    let mut at_10 = None;
    for &batch in sizes.batches {
        let load = push::Load {
            batch,
            clients: sizes.clients,
            users: sizes.users,
            duration: sizes.duration,
        };
        let label = format!("push-{}-{batch}", deployment.store);
        let profile = match &deployment.admin_url {
            Some(url) if statements => Some(push::Statements::reset(url).await),
            _ => None,
        };
        let outcome = push::run(base, &load, &label, &deployment.pids()).await;
        if let Some(profile) = profile {
            profile.print(outcome.changes / batch as u64).await;
        }
        let scenario = format!("push, batch {batch} ({}, {} clients)", deployment.store, sizes.clients);
        let p99_goal = (batch == 10).then_some(Goal::AtMost(25.0));
        results.add(
            &scenario,
            "changes/s",
            outcome.per_second(),
            "changes/s",
            None,
            Some(outcome.cpu),
        );
        results.add(&scenario, "p50", outcome.latencies.p50(), "ms", None, None);
        results.add(&scenario, "p99", outcome.latencies.p99(), "ms", p99_goal, None);
        if batch == 10 {
            at_10 = Some(outcome.per_second());
        }
    }
    let Some(admin_url) = &deployment.admin_url else {
        return;
    };
    for connections in [8, 32] {
        let (rate, cpu) = push::ceiling(admin_url, 10, connections, sizes.duration).await;
        let scenario = format!("raw ceiling, 10 rows/tx ({connections} connections)");
        results.add(&scenario, "rows/s", rate, "rows/s", None, Some(cpu));
        if let Some(pushed) = at_10 {
            let measure = format!("push batch 10 / this ceiling ({})", deployment.store);
            let goal = (connections == 8).then_some(Goal::AtLeast(50.0));
            results.add(&scenario, measure, pushed / rate * 100.0, "%", goal, None);
        }
    }
}

fn parse_setting(setting: &str) -> Result<(String, String), String> {
    let (name, value) = setting.split_once('=').ok_or("expected NAME=value")?;
    Ok((name.to_owned(), value.to_owned()))
}

/// What the table is about: when, where, and how.
fn header(options: &Options, smoke: bool, took: Duration) -> String {
    let machine = machine();
    format!(
        "mana-sync load benchmark, {} ({}), {} s\nmachine: {} cores, {} GiB, {}; load generator, servers and PostgreSQL share it\n\
         PostgreSQL: {}",
        time::OffsetDateTime::now_utc().date(),
        if smoke { "smoke run, tiny sizes" } else { "full run" },
        took.as_secs(),
        machine["cores"],
        machine["memory_gib"],
        machine["kernel"].as_str().unwrap_or("?"),
        if !options.targets.is_empty() {
            "the targets' own"
        } else if smoke {
            "the tests' throwaway cluster (fsync off)"
        } else if std::env::var_os("TEST_DATABASE_URL").is_some() {
            "TEST_DATABASE_URL's server (its own durability settings)"
        } else {
            "started by the harness on disk, fsync, full_page_writes and synchronous_commit on"
        }
    )
}

fn machine() -> serde_json::Value {
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next()?.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    json!({
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "memory_gib": (memory as f64 / (1 << 20) as f64).round(),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
    })
}
