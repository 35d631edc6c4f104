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
    };
    let agent = ferry_agent::Agent::open(agent_config)
        .await
        .context("cannot open the agent")?;
    info!(host = %config.name, listen = %config.listen, "ferryd serving (mutual TLS)");
    let router = ferry_agent::routes::router(Arc::clone(&agent));
    server::serve(listener, tls, router, shutdown_signal()).await;
    // QEMU processes are deliberately left running: they are not our
    // children and a restarted ferryd reattaches to them.
    info!("ferryd stopped; VMs keep running");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}
