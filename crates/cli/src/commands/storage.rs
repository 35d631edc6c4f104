//! `ferry storage move` and `ferry backup …`: a running VM's disks to
//! another datastore of its host, and point-in-time copies of a VM to come
//! back to. Both go through the controller; a storage move is reported like
//! a migration (`ferry migration show ID`).

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use ferry_api::{BackupInfo, BackupRequest, RestoreRequest, StorageMoveRequest};
use ferry_core::spec::DiskFormat;

use super::migration;
use crate::config::Connection;
use crate::output::{self, Format};

#[derive(Debug, Subcommand)]
pub enum StorageCommand {
    /// Move disks of a VM to another datastore of its host, running or
    /// stopped, optionally changing their format.
    ///
    /// A running guest keeps running: each disk is mirrored to its new file
    /// (guest writes reach both once in sync), then the guest is paused
    /// briefly while source and copy are compared (qemu-img compare) and the
    /// disk is switched to the copy; the old file is removed only after the
    /// switch. A copy that differs is discarded and the VM keeps its old
    /// disks. Refused when the datastore lacks room for the disks' allocated
    /// size, or when the move would land on the same file.
    Move(MoveArgs),
}

#[derive(Debug, Args)]
pub struct MoveArgs {
    /// The VM whose disks move.
    pub vm: String,
    /// A disk to move (repeatable).
    #[arg(
        long = "disk",
        value_name = "ID",
        required_unless_present = "all_disks"
    )]
    pub disks: Vec<String>,
    /// Move every disk of the VM.
    #[arg(long, conflicts_with = "disks")]
    pub all_disks: bool,
    /// The datastore of the VM's host to move them to.
    #[arg(long, value_name = "DATASTORE")]
    pub to: String,
    /// The moved disks' format (default: each keeps its own).
    #[arg(long, value_enum)]
    pub format: Option<FormatArg>,
    /// Cap on the copy, e.g. 200MiB/s, 1Gbit/s (default: unlimited).
    #[arg(long, value_name = "RATE", value_parser = super::migrate::bandwidth_arg)]
    pub bandwidth: Option<u64>,
    /// Take a backup of the VM first (`ferry backup list`); the report names
    /// it. Off by default for a move within the host; a migration that
    /// copies the disks to another host (or --offline) takes one by default.
    #[arg(long)]
    pub backup: bool,
    /// Show the progress until the move ends, print its report, and exit
    /// non-zero unless it completed.
    #[arg(long)]
    pub wait: bool,
}

/// `--format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    Raw,
    Qcow2,
}

impl From<FormatArg> for DiskFormat {
    fn from(arg: FormatArg) -> Self {
        match arg {
            FormatArg::Raw => DiskFormat::Raw,
            FormatArg::Qcow2 => DiskFormat::Qcow2,
        }
    }
}

pub async fn run(command: StorageCommand, conn: &Connection, format: Format) -> anyhow::Result<()> {
    let controller = conn.controller()?;
    match command {
        StorageCommand::Move(args) => {
            let request = StorageMoveRequest {
                vm: args.vm.clone(),
                disks: args.disks.clone(),
                all_disks: args.all_disks,
                to_datastore: args.to.clone(),
                format: args.format.map(Into::into),
                bandwidth_bytes_per_sec: args.bandwidth,
                backup: args.backup,
            };
            let report = controller
                .storage_move(&request)
                .await
                .with_context(|| format!("cannot move the disks of {} to {}", args.vm, args.to))?;
            if args.wait {
                return migration::wait_and_report(controller, report, format, None).await;
            }
            if format == Format::Json {
                return output::json(&report);
            }
            println!(
                "storage move {} of {} to datastore {} started (`ferry migration watch {}`)",
                report.id, report.vm, args.to, report.id
            );
            Ok(())
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Take a backup of a VM: every disk as of one instant (crash-consistent,
    /// like a power cut at that instant), without stopping it, and its spec.
    Create {
        vm: String,
        /// A datastore of the VM's host (default: its first disk's).
        #[arg(long, value_name = "DATASTORE")]
        to: Option<String>,
    },
    /// List the backups (of one VM when given).
    List { vm: Option<String> },
    /// Show one backup.
    Show { id: String },
    /// Define a VM (stopped) from a backup. An existing VM of that name is
    /// never replaced without --force.
    Restore {
        id: String,
        /// Restore as a new VM of this name (new uuid, MACs and disk files),
        /// next to the original.
        #[arg(long = "as", value_name = "NAME")]
        as_name: Option<String>,
        /// The host to restore on (default: the backup's). On another host
        /// the VM is restored on the backup's host, then moved by an offline
        /// migration (its files checked by SHA-256 on both hosts).
        #[arg(long, value_name = "HOST")]
        host: Option<String>,
        /// Replace an existing VM of that name: it is stopped and deleted
        /// with its disks, then restored.
        #[arg(long)]
        force: bool,
    },
    /// Delete a backup and its files.
    Delete { id: String },
}

pub async fn run_backup(
    command: BackupCommand,
    conn: &Connection,
    format: Format,
) -> anyhow::Result<()> {
    let controller = conn.controller()?;
    match command {
        BackupCommand::Create { vm, to } => {
            let backup = controller
                .backup_create(&BackupRequest {
                    vm: vm.clone(),
                    datastore: to,
                    reason: None,
                })
                .await
                .with_context(|| format!("cannot back up {vm}"))?;
            if format == Format::Json {
                return output::json(&backup);
            }
            println!(
                "backup {} of {} taken on {} ({}, {} disk{})",
                backup.id,
                backup.vm,
                backup.host,
                output::bytes(backup.size_bytes),
                backup.disks.len(),
                if backup.disks.len() == 1 { "" } else { "s" }
            );
            Ok(())
        }
        BackupCommand::List { vm } => {
            let backups = controller
                .backup_list(vm.as_deref())
                .await
                .context("cannot list the backups")?;
            if format == Format::Json {
                return output::json(&backups);
            }
            print!("{}", render_list(&backups));
            Ok(())
        }
        BackupCommand::Show { id } => {
            let backup = controller
                .backup_show(&id)
                .await
                .with_context(|| format!("cannot show backup {id}"))?;
            if format == Format::Json {
                return output::json(&backup);
            }
            print!("{}", render_list(std::slice::from_ref(&backup)));
            for disk in &backup.disks {
                println!(
                    "  disk {}: {} ({} of {}, was {})",
                    disk.disk_id,
                    disk.file,
                    output::bytes(disk.allocated_bytes),
                    output::bytes(disk.virtual_size_bytes),
                    disk.source_format.as_str()
                );
            }
            Ok(())
        }
        BackupCommand::Restore {
            id,
            as_name,
            host,
            force,
        } => {
            let vm = controller
                .backup_restore(
                    &id,
                    &RestoreRequest {
                        as_name,
                        host,
                        force,
                    },
                )
                .await
                .with_context(|| format!("cannot restore backup {id}"))?;
            if format == Format::Json {
                return output::json(&vm);
            }
            println!(
                "VM {} restored from backup {id} on {} (stopped: `ferry vm start {}`)",
                vm.name, vm.host, vm.name
            );
            Ok(())
        }
        BackupCommand::Delete { id } => {
            controller
                .backup_delete(&id)
                .await
                .with_context(|| format!("cannot delete backup {id}"))?;
            if format == Format::Json {
                return output::json(&serde_json::json!({ "deleted": id }));
            }
            println!("backup {id} deleted");
            Ok(())
        }
    }
}

fn render_list(backups: &[BackupInfo]) -> String {
    if backups.is_empty() {
        return "no backups\n".to_string();
    }
    let rows: Vec<Vec<String>> = backups
        .iter()
        .map(|b| {
            vec![
                b.id.clone(),
                b.vm.clone(),
                b.host.clone(),
                b.datastore.clone(),
                migration::timestamp(b.created_at_ms),
                b.vm_state.clone(),
                output::bytes(b.size_bytes),
                b.reason.clone(),
            ]
        })
        .collect();
    output::render_table(
        &[
            "ID",
            "VM",
            "HOST",
            "DATASTORE",
            "TAKEN",
            "VM WAS",
            "SIZE",
            "REASON",
        ],
        &rows,
    )
}
