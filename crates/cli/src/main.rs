//! `ferry`: the command-line client. Human tables by default, `-o json` for
//! scripts; every error is printed with its whole chain.

mod commands;
mod config;
mod output;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    about = "Move virtual machines between hosts: live, with their storage, and across hypervisors"
)]
struct Cli {
    /// Client configuration (default: $FERRY_CONFIG, then the local cluster's).
    #[arg(long, global = true, env = "FERRY_CONFIG")]
    config: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = output::Format::Table)]
    output: output::Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Define, run and watch VMs.
    #[command(subcommand)]
    Vm(commands::vm::VmCommand),
    /// The cluster's hosts.
    #[command(subcommand)]
    Host(commands::host::HostCommand),
    /// Move a VM to another host: live, or stopped with --offline (through
    /// the controller).
    Migrate(commands::migrate::MigrateArgs),
    /// Move a VM's disks to another datastore of its host.
    #[command(subcommand)]
    Storage(commands::storage::StorageCommand),
    /// Point-in-time copies of VMs: take, list, restore, delete.
    #[command(subcommand)]
    Backup(commands::storage::BackupCommand),
    /// List, show, watch and cancel migrations.
    #[command(subcommand)]
    Migration(commands::migration::MigrationCommand),
    /// The cluster's networks (bridges every host maps them to).
    #[command(subcommand)]
    Network(commands::network::NetworkCommand),
    /// The cluster's certificate authority.
    #[command(subcommand)]
    Pki(commands::pki::PkiCommand),
    /// A complete cluster on this machine.
    #[command(subcommand)]
    Local(commands::local::LocalCommand),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Pki(command) => commands::pki::run(command),
        Command::Local(command) => commands::local::run(command, cli.output).await,
        Command::Vm(command) => {
            let conn = config::connect(cli.config.as_deref())?;
            commands::vm::run(command, &conn, cli.output).await
        }
        Command::Host(command) => {
            let conn = config::connect(cli.config.as_deref())?;
            commands::host::run(command, &conn, cli.output).await
        }
        Command::Migrate(args) => {
            let conn = config::connect(cli.config.as_deref())?;
            commands::migrate::run(args, &conn, cli.output).await
        }
        Command::Storage(command) => {
            let conn = config::connect(cli.config.as_deref())?;
            commands::storage::run(command, &conn, cli.output).await
        }
        Command::Backup(command) => {
            let conn = config::connect(cli.config.as_deref())?;
            commands::storage::run_backup(command, &conn, cli.output).await
        }
        Command::Network(command) => {
            let conn = config::connect(cli.config.as_deref())?;
            commands::network::run(command, &conn, cli.output).await
        }
        Command::Migration(command) => {
            let conn = config::connect(cli.config.as_deref())?;
            commands::migration::run(command, &conn, cli.output).await
        }
    }
}
