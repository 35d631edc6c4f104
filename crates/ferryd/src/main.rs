//! ferryd: the daemon on every host. Its agent role owns the host's VMs; the
//! controller role (a later issue) will orchestrate the cluster. One binary,
//! roles by configuration.

mod config;
mod server;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tracing::info;

#[derive(Debug, Parser)]
#[command(name = "ferryd", version, about = "Ferry's host daemon (agent role)")]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, env = "FERRYD_CONFIG")]
    config: PathBuf,
    /// Where VM records and runtime files live (overrides the config file).
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("ferryd: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ferryd: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let config = config::Config::load(&args.config)?;
    let state_dir = args
        .state_dir
        .or_else(|| config.state_dir.clone())
        .context("no state folder: give --state-dir or state_dir in the configuration")?;
    let read = |path: &PathBuf| {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
    };
    let tls = ferry_pki::server_config(
        &read(&config.tls.ca)?,
        &read(&config.tls.cert)?,
        &read(&config.tls.key)?,
    )
    .context("cannot set up TLS")?;
    // Listen first: a taken port is the most common start-up failure and
    // must be reported before any VM is touched.
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let agent_config = ferry_agent::AgentConfig {
        host_name: config.name.clone(),
        address: config.advertised(),
        state_dir,
        datastores: config.datastores.clone(),
        accel: config
            .accel
            .parse()
            .map_err(|_| anyhow::anyhow!("invalid accel {:?}", config.accel))?,
        qemu_binary: config.qemu.clone(),
        stop_timeout: Duration::from_secs(config.stop_timeout_secs),
        migration_address: config
            .migration_address
            .clone()
            .unwrap_or_else(|| config.listen.ip().to_string()),
        reserve_memory_bytes: config
            .reserve_memory
            .as_deref()
            .map(ferry_core::units::parse_size)
            .transpose()
            .context("invalid reserve_memory")?
            .unwrap_or(0),
        cpu_models: config.cpu_models.clone(),
        networks: ferry_agent::network::NetworkConfig {
            serve: config.networks.serve.clone(),
            create_bridges: config.networks.create_bridges,
        },
        pki: Some(ferry_agent::host::AgentPki {
            ca_pem: read(&config.tls.ca)?,
            cert_pem: read(&config.tls.cert)?,
            key_pem: read(&config.tls.key)?,
        }),
    };
    let agent = ferry_agent::Agent::open(agent_config.clone())
        .await
        .context("cannot open the agent")?;
    let client_tls = ferry_pki::client_config(
        &read(&config.tls.ca)?,
        &read(&config.tls.cert)?,
        &read(&config.tls.key)?,
    )
    .context("cannot set up TLS for calls to other hosts")?;
    info!(host = %config.name, listen = %config.listen, "ferryd serving (mutual TLS)");
    let mut router = ferry_agent::routes::router(Arc::clone(&agent));
    if let Some(role) = config.controller_role.as_ref().filter(|r| r.enabled) {
        let path = if role.store.is_relative() {
            agent_config.state_dir.join(&role.store)
        } else {
            role.store.clone()
        };
        let store = ferry_controller::store::SqliteStore::open(&path)
            .with_context(|| format!("cannot open the controller store {}", path.display()))?;
        let mut defaults = ferry_controller::MigrationDefaults::default();
        if let Some(v) = role.default_bandwidth_bytes_per_sec {
            defaults.bandwidth_bytes_per_sec = v;
        }
        if let Some(v) = role.default_max_downtime_ms {
            defaults.max_downtime_ms = v;
        }
        if let Some(v) = role.default_deadline_secs {
            defaults.deadline_secs = v;
        }
        let controller =
            ferry_controller::Controller::new(Arc::new(store), client_tls.clone(), defaults);
        // Test builds only (the `failpoints` feature): arm the saga's
        // failpoints from FAILPOINTS.
        ferry_controller::failpoints::setup_from_env();
        // Migrations a previous run left in flight are settled in the
        // background: the hosts (this one included) may not answer yet.
        tokio::spawn({
            let controller = controller.clone();
            async move { controller.recover().await }
        });
        // Clean-ups a host could not do when asked are done when it answers.
        tokio::spawn(controller.clone().janitor());
        router = router.merge(ferry_controller::routes::router(controller));
        info!(store = %path.display(), "controller role on");
    }
    if let Some(url) = &config.controller {
        tokio::spawn(join_controller(
            url.clone(),
            client_tls.clone(),
            config.name.clone(),
            config.advertised(),
        ));
    }
    server::serve(listener, tls, router, shutdown_signal()).await;
    // QEMU processes are deliberately left running: they are not our
    // children and a restarted ferryd reattaches to them.
    info!("ferryd stopped; VMs keep running");
    Ok(())
}

/// Announces this host to the controller, retrying until it answers, then
/// now and again so that a restarted controller learns it back.
async fn join_controller(
    url: String,
    tls: Arc<rustls::ClientConfig>,
    name: String,
    advertised: String,
) {
    let client = match ferry_api::Client::new(&url, tls) {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%url, error = %ferry_api::error_chain(&error), "cannot make a client for the controller");
            return;
        }
    };
    let request = ferry_api::JoinRequest {
        name,
        url: advertised,
    };
    let mut joined = false;
    loop {
        match client.join(&request).await {
            Ok(()) => {
                if !joined {
                    info!(controller = %url, "joined the controller");
                }
                joined = true;
            }
            Err(error) => {
                if joined {
                    tracing::warn!(controller = %url, error = %ferry_api::error_chain(&error), "controller unreachable");
                }
                joined = false;
            }
        }
        let pause = if joined { 30 } else { 1 };
        tokio::time::sleep(Duration::from_secs(pause)).await;
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}
