//! `ferry`: the command-line client. Human tables by default, `-o json` for
//! scripts; every error is printed with its whole chain.

mod commands;
mod config;
mod output;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

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
    /// Output format: table or json. For `ferry export`, `-o PATH` names
    /// the file to write (and `-o json` may be given as well).
    // One flag for both because the export contract spells its file
    // `-o PATH` while every command takes `-o json`; clap cannot give a
    // subcommand its own `-o` beside a global one.
    #[arg(short = 'o', long = "output", global = true, value_name = "FORMAT", action = clap::ArgAction::Append)]
    output: Vec<String>,
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
    /// Import a VM from VMware, VirtualBox, Hyper-V or libvirt (OVA, OVF,
    /// .vmx, .vbox, domain XML, VHD/VHDX or any disk image).
    Import(commands::convert::ImportArgs),
    /// Export a stopped VM as an OVA, a libvirt domain XML or a VMware .vmx.
    Export(commands::convert::ExportArgs),
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

/// The output format from the `-o` values: the last one that names a
/// format (table when none does); `path` receives any other value (only
/// `ferry export` takes one).
pub(crate) fn output_format(
    values: &[String],
    path: Option<&mut Option<PathBuf>>,
) -> anyhow::Result<output::Format> {
    let mut format = output::Format::Table;
    let mut path = path;
    for value in values {
        match output::Format::from_str(value, true) {
            Ok(named) => format = named,
            Err(_) => match path.as_deref_mut() {
                Some(slot) if slot.is_none() => *slot = Some(PathBuf::from(value)),
                Some(_) => anyhow::bail!("-o {value}: the output file is already given"),
                None => anyhow::bail!("-o {value}: the output format is table or json"),
            },
        }
    }
    Ok(format)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // Only `ferry export` takes a file through `-o`.
    let mut export_path = None;
    let path_slot = matches!(cli.command, Command::Export(_)).then_some(&mut export_path);
    let format = output_format(&cli.output, path_slot)?;
    match cli.command {
        Command::Pki(command) => commands::pki::run(command),
        Command::Local(command) => commands::local::run(command, format).await,
        Command::Vm(command) => {
            let conn = config::connect(cli.config.as_deref())?;
            commands::vm::run(command, &conn, format).await
        }
        Command::Host(command) => {
            let conn = config::connect(cli.config.as_deref())?;
            commands::host::run(command, &conn, format).await
        }
        Command::Migrate(args) => {
            let conn = config::connect(cli.config.as_deref())?;
            commands::migrate::run(args, &conn, format).await
        }
        Command::Storage(command) => {
            let conn = config::connect(cli.config.as_deref())?;
            commands::storage::run(command, &conn, format).await
        }
        Command::Backup(command) => {
            let conn = config::connect(cli.config.as_deref())?;
            commands::storage::run_backup(command, &conn, format).await
        }
        Command::Import(args) => {
            let conn = config::connect(cli.config.as_deref())?;
            commands::convert::run_import(args, &conn, format).await
        }
        Command::Export(mut args) => {
            args.output = export_path;
            let conn = config::connect(cli.config.as_deref())?;
            commands::convert::run_export(args, &conn, format).await
        }
        Command::Network(command) => {
            let conn = config::connect(cli.config.as_deref())?;
            commands::network::run(command, &conn, format).await
        }
        Command::Migration(command) => {
            let conn = config::connect(cli.config.as_deref())?;
            commands::migration::run(command, &conn, format).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(args).expect("parses")
    }

    #[test]
    fn dash_o_is_a_format_everywhere_and_the_file_for_export() {
        let cli = parse(&["ferry", "vm", "list", "-o", "json"]);
        assert_eq!(
            output_format(&cli.output, None).unwrap(),
            output::Format::Json
        );
        let cli = parse(&["ferry", "-o", "json", "vm", "list"]);
        assert_eq!(
            output_format(&cli.output, None).unwrap(),
            output::Format::Json
        );
        let cli = parse(&["ferry", "vm", "list"]);
        assert_eq!(
            output_format(&cli.output, None).unwrap(),
            output::Format::Table
        );
        let cli = parse(&["ferry", "vm", "list", "-o", "yaml"]);
        let error = output_format(&cli.output, None).unwrap_err().to_string();
        assert!(error.contains("table or json"), "{error}");

        let cli = parse(&[
            "ferry", "export", "demo", "--format", "ova", "-o", "demo.ova", "-o", "json",
        ]);
        let mut path = None;
        assert_eq!(
            output_format(&cli.output, Some(&mut path)).unwrap(),
            output::Format::Json
        );
        assert_eq!(path, Some(PathBuf::from("demo.ova")));
        let cli = parse(&[
            "ferry", "export", "demo", "--format", "vmx", "-o", "a.vmx", "-o", "b.vmx",
        ]);
        let mut path = None;
        let error = output_format(&cli.output, Some(&mut path))
            .unwrap_err()
            .to_string();
        assert!(error.contains("already given"), "{error}");
    }
}
