//! `ferry import` and `ferry export`: VMs in from VMware, VirtualBox,
//! Hyper-V and libvirt, and out again.
//!
//! The inspection, mapping and conversion happen here, on the machine that
//! runs the CLI and with its user's rights (crate `ferry-convert`); the
//! converted disks then go through the controller into the chosen host's
//! datastore as partial files, and the VM's create renames them into place
//! after checking their digests. So a crafted image meets qemu-img only
//! under limits and as this user, never in a host's agent.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use ferry_api::{CreateVmRequest, FileDigest, VmState};
use ferry_convert::detect::ImagePolicy;
use ferry_convert::export::package::{self, ExportFormat, FetchedDisk, PackageProgress};
use ferry_convert::import::{self, ConvertProgress};
use ferry_convert::mapping::ImportOptions;
use ferry_convert::qemu_img::QemuImg;
use ferry_core::spec::DiskFormat;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use sha2::Digest;

use super::storage::FormatArg;
use crate::config::Connection;
use crate::output::{self, Format};

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// What to import: an .ova, an .ovf (its disks beside it), a VMware
    /// .vmx, a libvirt domain XML, a VirtualBox .vbox, a Hyper-V
    /// configuration XML, or a bare disk image (raw, qcow2, vmdk, vhd,
    /// vhdx, vdi). Recognised by its bytes, not its name. The converted
    /// disks are staged in a private folder under $TMPDIR (room for them is
    /// needed there), then sent to the host.
    pub path: PathBuf,
    /// The host to define the VM on (default: the one with the most free
    /// memory).
    #[arg(long)]
    pub host: Option<String>,
    /// The datastore of that host for the disks (default: `local`, else the
    /// host's first).
    #[arg(long)]
    pub datastore: Option<String>,
    /// The VM's name (default: the source's, made valid).
    #[arg(long)]
    pub name: Option<String>,
    /// Format of the disks written into the datastore.
    #[arg(long, value_enum, default_value = "qcow2")]
    pub format: FormatArg,
    /// Print the import report (every device mapping) and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// vCPUs (required for a bare image or a source that gives none;
    /// overrides the source's otherwise).
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Memory, e.g. 2GiB (required like --vcpus).
    #[arg(long, value_parser = size_arg)]
    pub memory: Option<u64>,
    /// The cluster network every NIC joins (default: user-mode networking).
    #[arg(long, value_name = "NAME")]
    pub network: Option<String>,
    /// Give every NIC a new MAC (importing a copy of a VM that still runs).
    #[arg(long)]
    pub new_macs: bool,
    /// Largest virtual disk size accepted, e.g. 4TiB: an image claiming more
    /// is refused before any conversion.
    #[arg(long, value_parser = size_arg, default_value = "4TiB")]
    pub max_disk_size: u64,
    /// Start the VM once imported.
    #[arg(long)]
    pub start: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ExportFormatArg {
    /// An OVA: OVF 1.0 envelope, SHA-256 manifest, streamOptimized VMDKs.
    Ova,
    /// A libvirt domain XML (`virsh define`), disks beside it.
    LibvirtXml,
    /// A VMware .vmx with monolithicSparse VMDKs beside it.
    Vmx,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The VM to export (stopped: its disks are copied as they are on disk).
    pub vm: String,
    #[arg(long, value_enum)]
    pub format: ExportFormatArg,
    /// Given as `-o PATH` (the global `-o`, see `ferry --help`): the file
    /// to write (.ova, .xml or .vmx); disk files go beside it. Nothing
    /// existing is overwritten.
    #[arg(skip)]
    pub output: Option<PathBuf>,
}

/// SIGINT (Ctrl-C) or SIGTERM during an import or export. Caught rather
/// than left to kill the CLI, so the work ends through its error path: the
/// temporary folder is removed and partial uploads are discarded. qemu-img,
/// in the terminal's process group, gets the terminal's SIGINT itself and
/// stops; the flag is checked after it and between transferred chunks.
#[derive(Clone)]
struct Interrupt(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Interrupt {
    fn install() -> anyhow::Result<Interrupt> {
        let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(signal, flag.clone())
                .context("cannot install the interrupt handler")?;
        }
        Ok(Interrupt(flag))
    }

    fn happened(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// An error when an interrupt arrived.
    fn check(&self) -> anyhow::Result<()> {
        if self.happened() {
            bail!("interrupted; the temporary files and partial uploads were removed");
        }
        Ok(())
    }
}

fn size_arg(text: &str) -> Result<u64, String> {
    ferry_core::units::parse_size(text).map_err(|e| e.to_string())
}

pub async fn run_import(args: ImportArgs, conn: &Connection, format: Format) -> anyhow::Result<()> {
    let controller = conn.controller()?;
    let hosts = controller
        .cluster_host_list()
        .await
        .context("cannot list the cluster's hosts")?;
    let host = match &args.host {
        Some(name) => hosts
            .iter()
            .find(|h| &h.name == name)
            .with_context(|| format!("no host named {name:?} in the cluster"))?,
        None => hosts
            .iter()
            .filter(|h| h.info.is_some())
            .max_by_key(|h| h.info.as_ref().map(|i| i.memory_available_bytes))
            .context("no host of the cluster answers")?,
    };
    let info = host.info.as_ref().with_context(|| {
        format!(
            "host {} does not answer: {}",
            host.name,
            host.error.as_deref().unwrap_or("no reason given")
        )
    })?;
    let datastore = match &args.datastore {
        Some(name) => info
            .datastores
            .iter()
            .find(|d| &d.name == name)
            .with_context(|| {
                format!(
                    "host {} has no datastore {name:?} (it has: {})",
                    host.name,
                    names(info.datastores.iter().map(|d| d.name.as_str()))
                )
            })?,
        None => info
            .datastores
            .iter()
            .find(|d| d.name == "local")
            .or_else(|| info.datastores.first())
            .with_context(|| format!("host {} has no datastore", host.name))?,
    };
    let options = ImportOptions {
        name: args.name.clone(),
        vcpus: args.vcpus,
        memory_bytes: args.memory,
        datastore: datastore.name.clone(),
        target_format: DiskFormat::from(args.format),
        network: args.network.clone(),
        new_macs: args.new_macs,
    };
    let policy = ImagePolicy {
        max_virtual_size: args.max_disk_size,
    };
    let mut plan = import::plan(&args.path, &options, &policy)
        .with_context(|| format!("cannot import {}", args.path.display()))?;
    plan.report.host = Some(host.name.clone());
    let spec = plan.report.spec.clone();

    // What the cluster would refuse, refused before any conversion.
    match controller.with_cluster_paths().get_vm(&spec.name).await {
        Ok(existing) => bail!(
            "a VM named {:?} exists already (on host {}); pass --name to import under another name",
            spec.name,
            existing.host
        ),
        Err(error) if error.is_not_found() => {}
        Err(error) => return Err(error).context("cannot check VM names"),
    }
    let vms = controller
        .with_cluster_paths()
        .list_vms()
        .await
        .context("cannot list the cluster's VMs")?;
    for nic in &spec.nics {
        if let Some(other) = vms
            .iter()
            .find(|vm| vm.spec.nics.iter().any(|n| n.mac == nic.mac))
        {
            bail!(
                "NIC {} keeps the source's MAC {}, which VM {} already uses; pass --new-macs to give the imported NICs new ones",
                nic.id,
                nic.mac,
                other.name
            );
        }
    }
    if let Some(network) = &args.network {
        controller
            .get_network(network)
            .await
            .with_context(|| format!("no cluster network {network:?} (ferry network list)"))?;
    }
    if args.dry_run {
        return print_report(&plan.report, format);
    }

    let interrupt = Interrupt::install()?;
    let work = tempfile::Builder::new()
        .prefix("ferry-import-")
        .tempdir()
        .context("cannot make a private work folder (TMPDIR)")?;
    let qemu_img = QemuImg::default();
    let mut bars = Bars::new(format);
    let converted = plan.convert(work.path(), &policy, &qemu_img, &mut bars);
    bars.finish();
    interrupt.check()?;
    let converted = converted.with_context(|| format!("cannot import {}", args.path.display()))?;

    let needed: u64 = converted
        .iter()
        .map(|d| std::fs::metadata(&d.path).map(|m| m.len()).unwrap_or(0))
        .sum();
    if needed > datastore.free_bytes {
        bail!(
            "datastore {} of host {} has {} free; the converted disks take {}",
            datastore.name,
            host.name,
            output::bytes(datastore.free_bytes),
            output::bytes(needed)
        );
    }

    let mut arriving = std::collections::BTreeMap::new();
    let mut sent: Vec<String> = Vec::new();
    let result: anyhow::Result<ferry_api::VmInfo> = async {
        for disk in &converted {
            let file = plan
                .report
                .disks
                .iter()
                .find(|d| d.id == disk.id)
                .map(|d| d.target_file.clone())
                .expect("every converted disk is in the report");
            sent.push(file.clone());
            let digest = send_file(
                controller,
                (&host.name, &datastore.name, &file),
                &disk.path,
                format,
                &interrupt,
            )
            .await
            .with_context(|| format!("cannot send disk {} to host {}", disk.id, host.name))?;
            arriving.insert(disk.id.clone(), digest);
        }
        controller
            .place_vm(
                &CreateVmRequest {
                    spec: spec.clone(),
                    start: args.start,
                    networks: Vec::new(),
                    arriving_disks: arriving.clone(),
                },
                Some(&host.name),
            )
            .await
            .context("cannot define the imported VM")
    }
    .await;
    if let Err(error) = result {
        for file in &sent {
            let _ = controller
                .cluster_discard_arriving(&host.name, &datastore.name, file)
                .await;
        }
        return Err(error);
    }
    plan.report.dry_run = false;
    print_report(&plan.report, format)
}

fn print_report(
    report: &ferry_convert::report::ImportReport,
    format: Format,
) -> anyhow::Result<()> {
    match format {
        Format::Json => output::json(report),
        Format::Table => output::print_text(&report.render_text()),
    }
}

fn names<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let list: Vec<&str> = names.collect();
    if list.is_empty() {
        "none".into()
    } else {
        list.join(", ")
    }
}

/// Streams `path` to the host, hashing as it goes, and checks the host's
/// digest of what arrived against ours.
async fn send_file(
    controller: &ferry_api::Client,
    (host, datastore, name): (&str, &str, &str),
    path: &Path,
    format: Format,
    interrupt: &Interrupt,
) -> anyhow::Result<FileDigest> {
    let file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("cannot open {}", path.display()))?;
    let size = file.metadata().await?.len();
    let bar = bytes_bar(format, size, &format!("send {name}"));
    let hasher = std::sync::Arc::new(std::sync::Mutex::new(sha2::Sha256::new()));
    let inspect_hasher = hasher.clone();
    let inspect_bar = bar.clone();
    let stop = interrupt.clone();
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20).map(move |chunk| {
        if stop.happened() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                "interrupted",
            ));
        }
        if let Ok(bytes) = &chunk {
            inspect_hasher.lock().expect("hasher lock").update(bytes);
            inspect_bar.inc(bytes.len() as u64);
        }
        chunk
    });
    let sent = controller
        .cluster_send_arriving(
            host,
            datastore,
            name,
            size,
            reqwest::Body::wrap_stream(stream),
        )
        .await;
    interrupt.check()?;
    let arrived = sent?;
    bar.finish_and_clear();
    let ours = hex(&hasher.lock().expect("hasher lock").clone().finalize());
    if arrived.sha256 != ours || arrived.bytes != size {
        bail!(
            "{name} arrived damaged on {host}: sent {size} bytes sha256 {ours}, host has {arrived}"
        );
    }
    Ok(arrived)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn bytes_bar(format: Format, total: u64, message: &str) -> ProgressBar {
    if matches!(format, Format::Json) {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

/// The conversion's bars: one per disk, by virtual bytes.
struct Bars {
    format: Format,
    current: Option<ProgressBar>,
    total: u64,
}

impl Bars {
    fn new(format: Format) -> Bars {
        Bars {
            format,
            current: None,
            total: 0,
        }
    }

    fn start(&mut self, label: &str, total: u64) {
        self.finish();
        self.total = total;
        self.current = Some(bytes_bar(self.format, total, label));
    }

    fn fraction(&mut self, fraction: f64) {
        if let Some(bar) = &self.current {
            bar.set_position((self.total as f64 * fraction) as u64);
        }
    }

    fn verifying(&mut self, label: &str) {
        if let Some(bar) = &self.current {
            bar.set_position(self.total);
            bar.set_message(label.to_string());
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.current.take() {
            bar.finish_and_clear();
        }
    }
}

impl ConvertProgress for Bars {
    fn disk(&mut self, id: &str, virtual_size: u64) {
        self.start(&format!("convert {id}"), virtual_size);
    }
    fn converted(&mut self, fraction: f64) {
        self.fraction(fraction);
    }
    fn verifying(&mut self) {
        Bars::verifying(self, "verify (qemu-img compare)");
    }
}

impl PackageProgress for Bars {
    fn disk(&mut self, id: &str, virtual_size: u64) {
        self.start(&format!("convert {id}"), virtual_size);
    }
    fn converted(&mut self, fraction: f64) {
        self.fraction(fraction);
    }
    fn verifying(&mut self) {
        Bars::verifying(self, "verify (qemu-img compare)");
    }
}

/// What `ferry export -o json` prints.
#[derive(serde::Serialize)]
struct ExportReport {
    vm: String,
    format: &'static str,
    files: Vec<String>,
    /// Every converted disk was compared with the VM's (qemu-img compare).
    verified: bool,
}

pub async fn run_export(args: ExportArgs, conn: &Connection, format: Format) -> anyhow::Result<()> {
    let Some(output_path) = args.output.clone() else {
        bail!(
            "give the file to write with -o PATH (e.g. -o {}.ova)",
            args.vm
        );
    };
    let controller = conn.controller()?;
    let vm = controller
        .with_cluster_paths()
        .get_vm(&args.vm)
        .await
        .with_context(|| format!("cannot find VM {:?}", args.vm))?;
    if vm.state != VmState::Stopped {
        bail!(
            "VM {} is {}; stop it first (ferry vm stop {}): an export copies its disks as they are on disk",
            vm.name,
            format!("{:?}", vm.state).to_lowercase(),
            vm.name
        );
    }
    let export_format = match args.format {
        ExportFormatArg::Ova => ExportFormat::Ova,
        ExportFormatArg::LibvirtXml => ExportFormat::LibvirtXml,
        ExportFormatArg::Vmx => ExportFormat::Vmx,
    };
    let folder = output_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    if output_path.exists() {
        bail!(
            "{} exists already; not overwriting it",
            output_path.display()
        );
    }
    let interrupt = Interrupt::install()?;
    // The work folder sits beside the output so files move into place by
    // link, and goes (with whatever it holds) however the export ends.
    let work = tempfile::Builder::new()
        .prefix(".ferry-export-")
        .tempdir_in(&folder)
        .with_context(|| format!("cannot write in {}", folder.display()))?;
    let mut fetched = Vec::new();
    for disk in &vm.spec.disks {
        let virtual_size = vm
            .disks
            .iter()
            .find(|d| d.id == disk.id)
            .map(|d| d.virtual_size_bytes)
            .with_context(|| format!("host {} reports no size for disk {}", vm.host, disk.id))?;
        let path = work
            .path()
            .join(format!("{}.{}", disk.id, disk.format.as_str()));
        let fetched_disk =
            fetch_disk(controller, (&vm.name, &disk.id), &path, format, &interrupt).await;
        interrupt.check()?;
        fetched_disk.with_context(|| format!("cannot fetch disk {} of {}", disk.id, vm.name))?;
        fetched.push(FetchedDisk {
            id: disk.id.clone(),
            path,
            format: disk.format,
            virtual_size,
        });
    }
    let mut bars = Bars::new(format);
    let exported = package::package(
        &vm.spec,
        export_format,
        &output_path,
        &fetched,
        work.path(),
        &QemuImg::default(),
        &mut bars,
    );
    bars.finish();
    if interrupt.happened() {
        // An interrupt right after the files were placed: take them back.
        if let Ok(exported) = &exported {
            for file in &exported.files {
                let _ = std::fs::remove_file(file);
            }
        }
        interrupt.check()?;
    }
    let exported = exported.with_context(|| format!("cannot export {}", vm.name))?;
    let report = ExportReport {
        vm: vm.name.clone(),
        format: match args.format {
            ExportFormatArg::Ova => "ova",
            ExportFormatArg::LibvirtXml => "libvirt-xml",
            ExportFormatArg::Vmx => "vmx",
        },
        files: exported
            .files
            .iter()
            .map(|f| f.display().to_string())
            .collect(),
        verified: true,
    };
    match format {
        Format::Json => output::json(&report),
        Format::Table => {
            let mut text = format!("exported {} as {}:\n", report.vm, report.format);
            for file in &report.files {
                text.push_str(&format!("  {file}\n"));
            }
            if export_format != ExportFormat::LibvirtXml {
                text.push_str("every disk verified identical to the VM's (qemu-img compare)\n");
            }
            output::print_text(&text)
        }
    }
}

async fn fetch_disk(
    controller: &ferry_api::Client,
    (vm, disk): (&str, &str),
    path: &Path,
    format: Format,
    interrupt: &Interrupt,
) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let response = controller
        .with_cluster_paths()
        .disk_content(vm, disk)
        .await?;
    let total = response.content_length();
    let bar = bytes_bar(format, total.unwrap_or(0), &format!("fetch {disk}"));
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .await
        .with_context(|| format!("cannot create {}", path.display()))?;
    let mut stream = response.bytes_stream();
    let mut received = 0u64;
    while let Some(chunk) = stream.next().await {
        interrupt.check()?;
        let chunk = chunk.context("the transfer broke off")?;
        // Zero blocks become holes: a raw disk stays sparse here.
        if chunk.iter().all(|&b| b == 0) {
            use std::io::SeekFrom;
            use tokio::io::AsyncSeekExt;
            file.seek(SeekFrom::Current(chunk.len() as i64)).await?;
        } else {
            file.write_all(&chunk).await?;
        }
        received += chunk.len() as u64;
        bar.set_position(received);
    }
    file.set_len(received).await?;
    file.sync_all().await?;
    bar.finish_and_clear();
    if let Some(total) = total {
        if received != total {
            bail!("received {received} of {total} bytes");
        }
    }
    Ok(())
}
