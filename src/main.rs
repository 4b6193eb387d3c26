use anyhow::Context;
use clap::{Parser, Subcommand};
use mana_sync::auth::local::LocalIssuer;
use mana_sync::config::Config;
use mana_sync::lifecycle::Signals;
use mana_sync::state::AppState;
use mana_sync::store::Store;
use mana_sync::{api, startup, sync, telemetry, validate};

// The request path allocates and frees many small values (JSON, rows,
// headers); under the push load glibc's malloc took about a sixth of the
// server's CPU (README, Benchmark), mimalloc much less.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Sync server for local-first apps. Configured by environment variables (see README).
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Print the OpenAPI document.
    Openapi,
    /// Ask the server on this machine (`PORT`) whether it serves: exit 0 if
    /// `GET /health` answers 200 within 5 s. For a container's HEALTHCHECK,
    /// in an image without curl.
    Health,
    /// Re-derive the record projection from the change log.
    Rebuild,
    /// Print a token signed by the local key (local mode: no JWKS_URL).
    Token {
        /// The user (`sub`).
        #[arg(long)]
        sub: String,
        /// How long the token is valid, e.g. 1h, 24h, 30d.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Some(Command::Openapi) = cli.command {
        println!("{}", api::spec());
        return;
    }
    let telemetry = match telemetry::init() {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("mana-sync: {e:#}");
            std::process::exit(1);
        }
    };
    let result = run(cli.command.unwrap_or(Command::Serve)).await;
    // The last spans (the shutdown's included) go out before exiting.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    if let Err(e) = result {
        eprintln!("mana-sync: {e:#}");
        std::process::exit(1);
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    let config = Config::from_env()?;
    match command {
        Command::Serve => {
            let signals = Signals::install();
            let addr = (config.host, config.port);
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("failed to bind {}:{} (HOST/PORT)", addr.0, addr.1))?;
            let state = AppState::connect(config).await?;
            startup::serve(state, listener, signals.nth(1), signals.nth(2)).await
        }
        Command::Migrate => {
            let store = Store::open(&config).await?;
            store.prepare(Some(std::time::Duration::from_secs(60))).await?;
            tracing::info!("migrations applied to {}", store.describe());
            Ok(())
        }
        Command::Rebuild => {
            let store = Store::open(&config).await?;
            store.prepare(Some(std::time::Duration::from_secs(60))).await?;
            let (users, entries, records) = sync::rebuild(&store).await?;
            tracing::info!(users, entries, records, "projection rebuilt from the change log");
            Ok(())
        }
        Command::Token { sub, ttl } => {
            anyhow::ensure!(
                config.jwks_url.is_none(),
                "JWKS_URL is set: tokens come from the auth service, not from mana-sync"
            );
            validate::id("--sub", &sub)?;
            let issuer = LocalIssuer::load_or_create(&config.data_dir)?;
            println!("{}", issuer.token(&sub, ttl)?);
            Ok(())
        }
        Command::Health => health(&config).await,
        Command::Openapi => unreachable!("handled before configuration"),
    }
}

async fn health(config: &Config) -> anyhow::Result<()> {
    // A server listening on every interface answers on loopback too.
    let host = if config.host.is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        config.host
    };
    let url = format!("http://{}/health", std::net::SocketAddr::from((host, config.port)));
    let response = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(5))
        .build()?
        .get(&url)
        .send()
        .await
        .with_context(|| format!("no answer from {url}"))?;
    anyhow::ensure!(response.status().is_success(), "{url} answered {}", response.status());
    Ok(())
}
