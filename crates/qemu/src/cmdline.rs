//! A validated [`VmSpec`] → QEMU 10 command line.
//!
//! The command line is a pure function of the spec and a [`LaunchContext`]
//! (where this host keeps sockets, logs and datastores). Migration depends on
//! that: the destination QEMU must present the identical device model, so
//! both ends build their command lines here from the same spec, and every
//! guest-visible choice (device order, bus addresses, ids, node names) comes
//! from the spec alone, never from the host.
//!
//! Choices made here, and why:
//!
//! - `-nodefaults -no-user-config`: nothing QEMU or a host config file adds
//!   on its own, so two hosts produce the same machine.
//! - RAM is a named `memory-backend-memfd` (`ram0`): migration matches RAM
//!   blocks by name on both ends, and a memfd lets tests look at guest RAM.
//! - `-blockdev`/`-device`/`-netdev`/`-object` take JSON, which carries any
//!   path verbatim (commas and spaces included). `-chardev` has no JSON form in
//!   QEMU 10, so its paths are escaped QemuOpts-style (`,` → `,,`).
//! - Each disk is two named block nodes, file (protocol) under format, named
//!   by [`ferry_core::names`], so block jobs and NBD exports can address them.
//!   Locking stays on (a disk opened by two QEMUs at once is corruption).
//!   `discard: unmap` lets guest TRIM keep images sparse, which keeps mirrors
//!   and copies small.
//! - Buses: `virtio` → `virtio-blk-pci`; `scsi` → `scsi-hd` on one
//!   `virtio-scsi-pci` controller, target = position among SCSI disks; `sata` →
//!   `ide-hd` on q35's built-in AHCI (`ide.0`…`ide.5`), or on an added
//!   `ich9-ahci` on i440fx; `ide` → `ide-hd` on i440fx's PIIX IDE (`ide.0`/
//!   `ide.1`, units 0/1). `ide` on q35 is rejected by spec validation rather
//!   than silently turned into AHCI: a guest that asked for IDE may have no
//!   AHCI driver.
//! - NICs carry `romfile: ""`: no PXE option ROM. Ferry never network-boots,
//!   the ROM would need the `ipxe-qemu` package on every host, and a ROM whose
//!   size differs between two hosts' packages makes migration fail.
//! - `NicBackend::None` is a NIC with no netdev at all: QEMU accepts it (with a
//!   "nic … has no peer" warning on stderr), the guest sees a NIC whose
//!   packets go nowhere, and migration is unaffected.
//! - A bridge or cluster-network NIC gets a tap named by [`bridge_tap_name`],
//!   which QEMU (as root) creates; attaching it to the bridge is the agent's
//!   job. QEMU creates it non-persistent, so the kernel removes it when QEMU
//!   exits, however QEMU ends: no tap outlives its VM.
//! - `-pidfile` is always given (it is how a QEMU is found again); `-daemonize`
//!   when asked, so that QEMU outlives the agent and is never its child.

use ferry_core::names;
use ferry_core::spec::{
    BootSpec, CacheMode, DiskBus, DiskSource, DiskSpec, MachineFamily, NicBackend, NicModel,
    NicSpec, SpecError, VmSpec,
};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Longest unix socket path (`sun_path` is 108 bytes with its NUL). QEMU
/// would reject a longer one too, but with a message that names no field.
const MAX_UNIX_SOCKET_PATH: usize = 107;

/// Where and how one QEMU instance runs on this host: everything
/// [`build`] needs besides the spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchContext {
    /// QMP unix socket (QEMU listens). Absolute.
    pub qmp_socket: PathBuf,
    /// Serial console unix socket (QEMU listens). Absolute; unused when the
    /// spec has no serial console.
    pub serial_socket: PathBuf,
    /// File QEMU appends all serial output to, whether or not anyone is
    /// connected to the socket. Absolute.
    pub serial_log: PathBuf,
    /// Where QEMU writes (and locks) its pid. Absolute.
    pub pidfile: PathBuf,
    /// `"kvm"` or `"tcg"`.
    pub accel: String,
    /// This host's datastores: name → folder (absolute).
    pub datastores: BTreeMap<String, PathBuf>,
    /// `-incoming` value for a migration destination, e.g. `"defer"`.
    pub incoming: Option<String>,
    /// `-S`: stay paused (in `prelaunch`) until `cont`.
    pub start_paused: bool,
    /// `-daemonize`: QEMU detaches once initialised and is no child of ours.
    pub daemonize: bool,
}

/// Why no command line could be built.
#[derive(Debug, thiserror::Error)]
pub enum CmdlineError {
    #[error("the VM spec is invalid")]
    InvalidSpec(#[source] SpecError),
    #[error("unsupported accelerator {0:?}: expected \"kvm\" or \"tcg\"")]
    UnsupportedAccel(String),
    #[error("disk {disk:?} is on datastore {datastore:?}, which this host does not have")]
    UnknownDatastore { disk: String, datastore: String },
    #[error("{what} {path:?} must be an absolute path")]
    RelativePath { what: String, path: PathBuf },
    #[error("{what} {path:?} is not valid UTF-8")]
    NonUtf8Path { what: String, path: PathBuf },
    #[error("{what} {value:?} contains a NUL byte")]
    Nul { what: String, value: String },
    #[error("{what} {path:?} is {len} bytes long; unix socket paths must be at most {MAX_UNIX_SOCKET_PATH}")]
    SocketPathTooLong {
        what: String,
        path: PathBuf,
        len: usize,
    },
    #[error("empty -incoming value: use e.g. \"defer\"")]
    EmptyIncoming,
}

/// Builds the QEMU argument list (without the binary) for `spec` on the
/// host described by `ctx`. The spec is validated again first: it may come
/// from the API, and nothing unvalidated may reach a command line.
pub fn build(spec: &VmSpec, ctx: &LaunchContext) -> Result<Vec<String>, CmdlineError> {
    spec.validate().map_err(CmdlineError::InvalidSpec)?;
    let family = spec.machine_family().ok_or_else(|| {
        // Unreachable after validation, which accepts only known families;
        // kept as an error rather than a panic in case the rules drift.
        CmdlineError::InvalidSpec(SpecError::Invalid(vec![ferry_core::spec::Problem {
            field: "machine".to_owned(),
            message: format!("unsupported machine type {:?}", spec.machine_type),
        }]))
    })?;
    let accel = match ctx.accel.as_str() {
        "kvm" | "tcg" => ctx.accel.as_str(),
        other => return Err(CmdlineError::UnsupportedAccel(other.to_owned())),
    };

    let mut args = Args::default();
    args.pair("-name", format!("guest={},debug-threads=on", spec.name));
    args.pair("-uuid", spec.uuid.to_string());
    args.flag("-nodefaults");
    args.flag("-no-user-config");
    args.pair("-display", "none");
    // Timestamps on QEMU's own stderr messages, for correlating its log
    // with the agent's.
    args.pair("-msg", "timestamp=on");

    args.pair("-accel", accel);
    args.pair(
        "-machine",
        format!(
            "{},memory-backend={}",
            spec.machine_type,
            names::MEMORY_BACKEND_ID
        ),
    );
    args.json(
        "-object",
        json!({
            "qom-type": "memory-backend-memfd",
            "id": names::MEMORY_BACKEND_ID,
            "size": spec.memory_bytes,
        }),
    );
    // `-m` without a suffix means MiB; say so explicitly. Validation
    // guarantees a whole number of MiB, so this equals the backend's size.
    args.pair(
        "-m",
        format!("{}M", spec.memory_bytes / ferry_core::units::MIB),
    );
    args.pair("-cpu", spec.cpu_model.clone());
    args.pair("-smp", spec.vcpus.to_string());

    let qmp = socket_path("QMP socket", &ctx.qmp_socket)?;
    args.pair(
        "-chardev",
        format!(
            "socket,id={},path={},server=on,wait=off",
            names::QMP_CHARDEV_ID,
            escape_opt(qmp)
        ),
    );
    args.pair(
        "-mon",
        format!("chardev={},mode=control", names::QMP_CHARDEV_ID),
    );

    if spec.serial_console {
        let socket = socket_path("serial socket", &ctx.serial_socket)?;
        let log = host_path("serial log", &ctx.serial_log)?;
        args.pair(
            "-chardev",
            format!(
                "socket,id={},path={},server=on,wait=off,logfile={},logappend=on",
                names::SERIAL_CHARDEV_ID,
                escape_opt(socket),
                escape_opt(log)
            ),
        );
        args.pair("-serial", format!("chardev:{}", names::SERIAL_CHARDEV_ID));
    }

    args.pair("-pidfile", host_path("pidfile", &ctx.pidfile)?);
    if ctx.daemonize {
        args.flag("-daemonize");
    }

    add_disks(&mut args, spec, ctx, family)?;
    for nic in &spec.nics {
        add_nic(&mut args, nic, ctx);
    }

    if let BootSpec::Kernel {
        kernel,
        initrd,
        cmdline,
    } = &spec.boot
    {
        // These three take their value verbatim (no QemuOpts parsing), as
        // verified with commas and spaces in paths on QEMU 10.0.
        args.pair("-kernel", host_path("kernel", kernel)?);
        if let Some(initrd) = initrd {
            args.pair("-initrd", host_path("initrd", initrd)?);
        }
        if !cmdline.is_empty() {
            args.pair("-append", cmdline.clone());
        }
    }

    if ctx.start_paused {
        args.flag("-S");
    }
    if let Some(incoming) = &ctx.incoming {
        if incoming.is_empty() {
            return Err(CmdlineError::EmptyIncoming);
        }
        no_nul("-incoming value", incoming)?;
        args.pair("-incoming", incoming.clone());
    }
    Ok(args.0)
}

/// The tap device a bridge NIC of the QEMU instance with this QMP socket
/// uses: `fy` and 13 hex digits of a hash of the socket path and the NIC id
/// (15 characters, Linux's limit).
///
/// Why derived from the QMP socket: during a same-host migration the source
/// and the destination QEMU both run the same spec at once, so a name derived
/// from the spec alone would collide; each instance has its own QMP socket.
/// The hash is spelled out (FNV-1a) rather than `std`'s, whose output may
/// change between Rust releases, so an upgraded agent finds its taps again.
pub fn bridge_tap_name(qmp_socket: &Path, nic_id: &str) -> String {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let bytes = qmp_socket
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .chain(&[0u8])
        .chain(nic_id.as_bytes());
    let hash = bytes.fold(OFFSET, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(PRIME));
    format!("fy{:013x}", hash >> 12)
}

/// The arguments being built.
#[derive(Default)]
struct Args(Vec<String>);

impl Args {
    fn flag(&mut self, option: &str) {
        self.0.push(option.to_owned());
    }

    fn pair(&mut self, option: &str, value: impl Into<String>) {
        self.0.push(option.to_owned());
        self.0.push(value.into());
    }

    fn json(&mut self, option: &str, value: Value) {
        self.pair(option, value.to_string());
    }
}

/// Escapes a QemuOpts value: a comma is written as two.
fn escape_opt(value: &str) -> String {
    value.replace(',', ",,")
}

fn no_nul(what: &str, value: &str) -> Result<(), CmdlineError> {
    if value.contains('\0') {
        return Err(CmdlineError::Nul {
            what: what.to_owned(),
            value: value.replace('\0', "\\0"),
        });
    }
    Ok(())
}

/// A host path as it goes to QEMU: absolute (a daemonized QEMU changes its
/// folder to `/`, and relative paths would depend on the agent's), UTF-8,
/// without NUL.
fn host_path<'a>(what: &str, path: &'a Path) -> Result<&'a str, CmdlineError> {
    if !path.is_absolute() {
        return Err(CmdlineError::RelativePath {
            what: what.to_owned(),
            path: path.to_owned(),
        });
    }
    let text = path.to_str().ok_or_else(|| CmdlineError::NonUtf8Path {
        what: what.to_owned(),
        path: path.to_owned(),
    })?;
    no_nul(what, text)?;
    Ok(text)
}

fn socket_path<'a>(what: &str, path: &'a Path) -> Result<&'a str, CmdlineError> {
    let text = host_path(what, path)?;
    if text.len() > MAX_UNIX_SOCKET_PATH {
        return Err(CmdlineError::SocketPathTooLong {
            what: what.to_owned(),
            path: path.to_owned(),
            len: text.len(),
        });
    }
    Ok(text)
}

/// Host-side cache flags of a cache mode, as QEMU's `-drive cache=` maps them.
struct CacheFlags {
    /// O_DIRECT: bypass the host page cache.
    direct: bool,
    /// Ignore guest flushes.
    no_flush: bool,
    /// The guest-visible volatile write cache.
    write_cache: bool,
}

fn cache_flags(mode: CacheMode) -> CacheFlags {
    let (direct, no_flush, write_cache) = match mode {
        CacheMode::None => (true, false, true),
        CacheMode::Writeback => (false, false, true),
        CacheMode::Writethrough => (false, false, false),
        CacheMode::Directsync => (true, false, false),
        CacheMode::Unsafe => (false, true, true),
    };
    CacheFlags {
        direct,
        no_flush,
        write_cache,
    }
}

fn add_disks(
    args: &mut Args,
    spec: &VmSpec,
    ctx: &LaunchContext,
    family: MachineFamily,
) -> Result<(), CmdlineError> {
    // Controllers first, so that their PCI slots come before the disks' and
    // stay put whatever the disks are.
    if spec.disks.iter().any(|d| d.bus == DiskBus::Scsi) {
        args.json(
            "-device",
            json!({"driver": "virtio-scsi-pci", "id": names::SCSI_CONTROLLER_ID}),
        );
    }
    let sata_bus_prefix = match family {
        MachineFamily::Q35 => "ide",
        MachineFamily::I440fx => {
            if spec.disks.iter().any(|d| d.bus == DiskBus::Sata) {
                args.json(
                    "-device",
                    json!({"driver": "ich9-ahci", "id": names::AHCI_CONTROLLER_ID}),
                );
            }
            names::AHCI_CONTROLLER_ID
        }
    };

    let boot_disk = match &spec.boot {
        BootSpec::Firmware { disk } => Some(disk.as_str()),
        BootSpec::Kernel { .. } => None,
    };
    // Position of each disk among the disks of its bus: its address there.
    let mut positions: BTreeMap<&'static str, usize> = BTreeMap::new();
    for disk in &spec.disks {
        let position = positions.entry(disk.bus.as_str()).or_default();
        let slot = *position;
        *position += 1;

        let filename = disk_path(disk, ctx)?;
        add_block_nodes(args, disk, &filename);

        let mut device = json!({
            "id": names::disk_device_id(&disk.id),
            "drive": names::disk_format_node(&disk.id),
            "write-cache": if cache_flags(disk.cache).write_cache { "on" } else { "off" },
        });
        let fields = device.as_object_mut().expect("a JSON object literal");
        match disk.bus {
            DiskBus::Virtio => {
                fields.insert("driver".into(), json!("virtio-blk-pci"));
            }
            DiskBus::Scsi => {
                fields.insert("driver".into(), json!("scsi-hd"));
                fields.insert(
                    "bus".into(),
                    json!(format!("{}.0", names::SCSI_CONTROLLER_ID)),
                );
                fields.insert("channel".into(), json!(0));
                fields.insert("scsi-id".into(), json!(slot));
                fields.insert("lun".into(), json!(0));
            }
            DiskBus::Sata => {
                // One drive per AHCI port.
                fields.insert("driver".into(), json!("ide-hd"));
                fields.insert("bus".into(), json!(format!("{sata_bus_prefix}.{slot}")));
            }
            DiskBus::Ide => {
                // PIIX: two buses with a master (unit 0) and a slave each.
                fields.insert("driver".into(), json!("ide-hd"));
                fields.insert("bus".into(), json!(format!("ide.{}", slot / 2)));
                fields.insert("unit".into(), json!(slot % 2));
            }
        }
        if boot_disk == Some(disk.id.as_str()) {
            fields.insert("bootindex".into(), json!(1));
        }
        args.json("-device", device);
    }
    Ok(())
}

/// The host file behind a disk.
fn disk_path(disk: &DiskSpec, ctx: &LaunchContext) -> Result<String, CmdlineError> {
    let what = format!("disk {}", disk.id);
    match &disk.source {
        DiskSource::Path { path } => host_path(&what, path).map(str::to_owned),
        DiskSource::Datastore { datastore, file } => {
            let folder =
                ctx.datastores
                    .get(datastore)
                    .ok_or_else(|| CmdlineError::UnknownDatastore {
                        disk: disk.id.clone(),
                        datastore: datastore.clone(),
                    })?;
            // Validation keeps `file` a single plain component, so the join
            // stays inside the datastore.
            host_path(&what, &folder.join(file)).map(str::to_owned)
        }
    }
}

fn add_block_nodes(args: &mut Args, disk: &DiskSpec, filename: &str) {
    let cache = cache_flags(disk.cache);
    let cache_json = json!({"direct": cache.direct, "no-flush": cache.no_flush});
    let file_node = names::disk_file_node(&disk.id);
    args.json(
        "-blockdev",
        json!({
            "driver": "file",
            "node-name": file_node,
            "filename": filename,
            // Linux AIO needs O_DIRECT; the thread pool works with both.
            "aio": if cache.direct { "native" } else { "threads" },
            "cache": cache_json,
            "read-only": disk.read_only,
            "locking": "on",
            "discard": "unmap",
        }),
    );
    args.json(
        "-blockdev",
        json!({
            "driver": disk.format.as_str(),
            "node-name": names::disk_format_node(&disk.id),
            "file": file_node,
            "cache": cache_json,
            "read-only": disk.read_only,
            "discard": "unmap",
        }),
    );
}

fn add_nic(args: &mut Args, nic: &NicSpec, ctx: &LaunchContext) {
    let netdev_id = names::nic_netdev_id(&nic.id);
    let netdev = match &nic.backend {
        NicBackend::User => Some(json!({"type": "user", "id": netdev_id})),
        NicBackend::None => None,
        NicBackend::Bridge { .. } | NicBackend::Network { .. } => Some(tap_netdev(
            &netdev_id,
            &bridge_tap_name(&ctx.qmp_socket, &nic.id),
        )),
        NicBackend::Tap { tap } => Some(tap_netdev(&netdev_id, tap)),
    };
    let mut device = json!({
        "driver": match nic.model {
            NicModel::Virtio => "virtio-net-pci",
            NicModel::E1000 => "e1000",
        },
        "id": names::nic_device_id(&nic.id),
        "mac": nic.mac,
        "romfile": "",
    });
    if let Some(netdev) = netdev {
        args.json("-netdev", netdev);
        device
            .as_object_mut()
            .expect("a JSON object literal")
            .insert("netdev".into(), json!(netdev_id));
    }
    args.json("-device", device);
}

/// A tap netdev. No helper scripts: bridging is the agent's job, done
/// explicitly rather than by `/etc/qemu-ifup`.
fn tap_netdev(id: &str, ifname: &str) -> Value {
    json!({
        "type": "tap",
        "id": id,
        "ifname": ifname,
        "script": "no",
        "downscript": "no",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::spec::DiskFormat;
    use ferry_core::units::MIB;

    fn ctx() -> LaunchContext {
        LaunchContext {
            qmp_socket: PathBuf::from("/run/ferry/vm/demo/qmp.sock"),
            serial_socket: PathBuf::from("/run/ferry/vm/demo/serial.sock"),
            serial_log: PathBuf::from("/var/log/ferry/demo/console.log"),
            pidfile: PathBuf::from("/run/ferry/vm/demo/qemu.pid"),
            accel: "tcg".to_owned(),
            datastores: BTreeMap::from([("local".to_owned(), PathBuf::from("/srv/ds/local"))]),
            incoming: None,
            start_paused: false,
            daemonize: true,
        }
    }

    const DEMO: &str = r#"
        name = "demo"
        uuid = "6f1c9e1e-7f0b-4d0c-9a59-1b1de0b0c001"
        memory = "512MiB"
        [boot]
        kernel = "/guest/vmlinuz"
        initrd = "/guest/initramfs.img"
        cmdline = "console=ttyS0 a=b,c"
        [[disks]]
        id = "vd0"
        datastore = "local"
        file = "demo.raw"
        [[nics]]
        id = "net0"
        mac = "52:54:00:12:34:56"
    "#;

    fn spec(text: &str) -> VmSpec {
        VmSpec::from_toml_str(text, Path::new("/specs")).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Every value that follows `option`.
    fn values<'a>(args: &'a [String], option: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == option)
            .map(|w| w[1].as_str())
            .collect()
    }

    /// The single value of `option`.
    fn value<'a>(args: &'a [String], option: &str) -> &'a str {
        match values(args, option).as_slice() {
            [one] => one,
            other => panic!("expected one {option}, got {other:?} in {args:?}"),
        }
    }

    /// The JSON values of `option`.
    fn jsons(args: &[String], option: &str) -> Vec<Value> {
        values(args, option)
            .into_iter()
            .map(|v| serde_json::from_str(v).unwrap_or_else(|e| panic!("{option} {v}: {e}")))
            .collect()
    }

    fn devices_with_driver(args: &[String], driver: &str) -> Vec<Value> {
        jsons(args, "-device")
            .into_iter()
            .filter(|d| d["driver"] == driver)
            .collect()
    }

    fn has_flag(args: &[String], flag: &str) -> bool {
        args.iter().any(|a| a == flag)
    }

    #[test]
    fn demo_spec_has_the_fixed_machine_options() {
        let args = build(&spec(DEMO), &ctx()).unwrap();
        assert_eq!(value(&args, "-name"), "guest=demo,debug-threads=on");
        assert_eq!(
            value(&args, "-uuid"),
            "6f1c9e1e-7f0b-4d0c-9a59-1b1de0b0c001"
        );
        assert!(has_flag(&args, "-nodefaults"));
        assert!(has_flag(&args, "-no-user-config"));
        assert_eq!(value(&args, "-display"), "none");
        assert_eq!(value(&args, "-accel"), "tcg");
        assert_eq!(value(&args, "-machine"), "pc-q35-10.0,memory-backend=ram0");
        assert_eq!(
            jsons(&args, "-object"),
            [json!({"qom-type": "memory-backend-memfd", "id": "ram0", "size": 512 * MIB})]
        );
        assert_eq!(value(&args, "-m"), "512M");
        assert_eq!(value(&args, "-cpu"), "qemu64");
        assert_eq!(value(&args, "-smp"), "1");
    }

    #[test]
    fn qmp_and_serial_chardevs_listen_on_unix_sockets() {
        let args = build(&spec(DEMO), &ctx()).unwrap();
        assert_eq!(
            values(&args, "-chardev"),
            [
                "socket,id=qmp,path=/run/ferry/vm/demo/qmp.sock,server=on,wait=off",
                "socket,id=serial0,path=/run/ferry/vm/demo/serial.sock,server=on,wait=off,\
                 logfile=/var/log/ferry/demo/console.log,logappend=on",
            ]
        );
        assert_eq!(value(&args, "-mon"), "chardev=qmp,mode=control");
        assert_eq!(value(&args, "-serial"), "chardev:serial0");
    }

    #[test]
    fn no_serial_console_means_no_serial_chardev() {
        let text = format!("serial_console = false\n{DEMO}");
        let args = build(&spec(&text), &ctx()).unwrap();
        assert_eq!(values(&args, "-chardev").len(), 1);
        assert!(values(&args, "-serial").is_empty());
    }

    #[test]
    fn daemonize_adds_the_flag_and_pidfile_is_always_there() {
        let args = build(&spec(DEMO), &ctx()).unwrap();
        assert!(has_flag(&args, "-daemonize"));
        assert_eq!(value(&args, "-pidfile"), "/run/ferry/vm/demo/qemu.pid");
        let args = build(
            &spec(DEMO),
            &LaunchContext {
                daemonize: false,
                ..ctx()
            },
        )
        .unwrap();
        assert!(!has_flag(&args, "-daemonize"));
        assert_eq!(value(&args, "-pidfile"), "/run/ferry/vm/demo/qemu.pid");
    }

    #[test]
    fn datastore_disk_becomes_file_and_format_nodes_and_a_virtio_device() {
        let args = build(&spec(DEMO), &ctx()).unwrap();
        assert_eq!(
            jsons(&args, "-blockdev"),
            [
                json!({
                    "driver": "file",
                    "node-name": "file-vd0",
                    "filename": "/srv/ds/local/demo.raw",
                    "aio": "native",
                    "cache": {"direct": true, "no-flush": false},
                    "read-only": false,
                    "locking": "on",
                    "discard": "unmap",
                }),
                json!({
                    "driver": "raw",
                    "node-name": "fmt-vd0",
                    "file": "file-vd0",
                    "cache": {"direct": true, "no-flush": false},
                    "read-only": false,
                    "discard": "unmap",
                }),
            ]
        );
        assert_eq!(
            devices_with_driver(&args, "virtio-blk-pci"),
            [json!({
                "driver": "virtio-blk-pci",
                "id": "disk-vd0",
                "drive": "fmt-vd0",
                "write-cache": "on",
            })]
        );
    }

    #[test]
    fn user_nic_gets_a_netdev_and_no_option_rom() {
        let args = build(&spec(DEMO), &ctx()).unwrap();
        assert_eq!(
            jsons(&args, "-netdev"),
            [json!({"type": "user", "id": "net-net0"})]
        );
        assert_eq!(
            devices_with_driver(&args, "virtio-net-pci"),
            [json!({
                "driver": "virtio-net-pci",
                "id": "nic-net0",
                "mac": "52:54:00:12:34:56",
                "romfile": "",
                "netdev": "net-net0",
            })]
        );
    }

    #[test]
    fn direct_kernel_boot_passes_kernel_initrd_and_cmdline_verbatim() {
        let args = build(&spec(DEMO), &ctx()).unwrap();
        assert_eq!(value(&args, "-kernel"), "/guest/vmlinuz");
        assert_eq!(value(&args, "-initrd"), "/guest/initramfs.img");
        assert_eq!(value(&args, "-append"), "console=ttyS0 a=b,c");
        assert!(jsons(&args, "-device")
            .iter()
            .all(|d| d.get("bootindex").is_none()));
    }

    #[test]
    fn paused_and_incoming_are_passed_through() {
        let args = build(&spec(DEMO), &ctx()).unwrap();
        assert!(!has_flag(&args, "-S"));
        assert!(values(&args, "-incoming").is_empty());
        let args = build(
            &spec(DEMO),
            &LaunchContext {
                start_paused: true,
                incoming: Some("defer".to_owned()),
                ..ctx()
            },
        )
        .unwrap();
        assert!(has_flag(&args, "-S"));
        assert_eq!(value(&args, "-incoming"), "defer");
    }

    #[test]
    fn kvm_is_accepted_and_other_accelerators_are_not() {
        let kvm = LaunchContext {
            accel: "kvm".to_owned(),
            ..ctx()
        };
        assert_eq!(value(&build(&spec(DEMO), &kvm).unwrap(), "-accel"), "kvm");
        let hvf = LaunchContext {
            accel: "hvf".to_owned(),
            ..ctx()
        };
        assert!(matches!(
            build(&spec(DEMO), &hvf),
            Err(CmdlineError::UnsupportedAccel(a)) if a == "hvf"
        ));
    }

    #[test]
    fn unknown_datastore_is_an_error_naming_disk_and_datastore() {
        let other = LaunchContext {
            datastores: BTreeMap::new(),
            ..ctx()
        };
        let err = build(&spec(DEMO), &other).unwrap_err();
        assert_eq!(
            err.to_string(),
            "disk \"vd0\" is on datastore \"local\", which this host does not have"
        );
    }

    #[test]
    fn invalid_spec_is_refused() {
        let mut bad = spec(DEMO);
        bad.machine_type = "pc-q35-10.0,accel=kvm".to_owned();
        assert!(matches!(
            build(&bad, &ctx()),
            Err(CmdlineError::InvalidSpec(_))
        ));
    }

    #[test]
    fn relative_or_overlong_context_paths_are_refused() {
        let relative = LaunchContext {
            pidfile: PathBuf::from("qemu.pid"),
            ..ctx()
        };
        assert!(matches!(
            build(&spec(DEMO), &relative),
            Err(CmdlineError::RelativePath { .. })
        ));
        let long = LaunchContext {
            qmp_socket: PathBuf::from(format!("/{}/qmp.sock", "x".repeat(100))),
            ..ctx()
        };
        assert!(matches!(
            build(&spec(DEMO), &long),
            Err(CmdlineError::SocketPathTooLong { .. })
        ));
    }

    #[test]
    fn paths_with_commas_and_spaces_survive() {
        let text = r#"
            name = "odd"
            memory = "64MiB"
            [boot]
            kernel = "/k dir/vm,linuz"
            [[disks]]
            id = "vd0"
            path = "/disks/a, b.raw"
        "#;
        let odd = LaunchContext {
            qmp_socket: PathBuf::from("/run/a,b c/qmp.sock"),
            serial_log: PathBuf::from("/log/x,y.log"),
            ..ctx()
        };
        let args = build(&spec(text), &odd).unwrap();
        assert_eq!(jsons(&args, "-blockdev")[0]["filename"], "/disks/a, b.raw");
        assert_eq!(value(&args, "-kernel"), "/k dir/vm,linuz");
        let chardevs = values(&args, "-chardev");
        assert!(
            chardevs[0].contains("path=/run/a,,b c/qmp.sock,"),
            "{chardevs:?}"
        );
        assert!(
            chardevs[1].contains("logfile=/log/x,,y.log,"),
            "{chardevs:?}"
        );
    }

    #[test]
    fn cache_modes_map_to_host_flags_and_guest_write_cache() {
        for (mode, direct, no_flush, aio, write_cache) in [
            ("none", true, false, "native", "on"),
            ("writeback", false, false, "threads", "on"),
            ("writethrough", false, false, "threads", "off"),
            ("directsync", true, false, "native", "off"),
            ("unsafe", false, true, "threads", "on"),
        ] {
            let text = DEMO.replace(
                "file = \"demo.raw\"",
                &format!("file = \"demo.raw\"\ncache = \"{mode}\""),
            );
            let args = build(&spec(&text), &ctx()).unwrap();
            let nodes = jsons(&args, "-blockdev");
            let cache = json!({"direct": direct, "no-flush": no_flush});
            assert_eq!(nodes[0]["cache"], cache, "{mode}");
            assert_eq!(nodes[1]["cache"], cache, "{mode}");
            assert_eq!(nodes[0]["aio"], aio, "{mode}");
            let device = &devices_with_driver(&args, "virtio-blk-pci")[0];
            assert_eq!(device["write-cache"], write_cache, "{mode}");
        }
    }

    #[test]
    fn read_only_disk_marks_both_nodes() {
        let text = DEMO.replace(
            "file = \"demo.raw\"",
            "file = \"demo.raw\"\nread_only = true",
        );
        let args = build(&spec(&text), &ctx()).unwrap();
        for node in jsons(&args, "-blockdev") {
            assert_eq!(node["read-only"], true, "{node}");
        }
    }

    /// A q35 spec with two disks on each of scsi and sata, firmware-booted
    /// from the second SATA disk.
    const Q35_MIXED: &str = r#"
        name = "mixed"
        memory = "128MiB"
        [boot]
        disk = "sb"
        [[disks]]
        id = "qa"
        path = "/d/qa.qcow2"
        bus = "scsi"
        [[disks]]
        id = "sa"
        path = "/d/sa.raw"
        bus = "sata"
        [[disks]]
        id = "qb"
        path = "/d/qb.raw"
        bus = "scsi"
        read_only = true
        [[disks]]
        id = "sb"
        path = "/d/sb.raw"
        bus = "sata"
    "#;

    #[test]
    fn scsi_disks_share_one_controller_with_targets_in_order() {
        let args = build(&spec(Q35_MIXED), &ctx()).unwrap();
        assert_eq!(
            devices_with_driver(&args, "virtio-scsi-pci"),
            [json!({"driver": "virtio-scsi-pci", "id": "scsi0"})]
        );
        let disks = devices_with_driver(&args, "scsi-hd");
        let targets: Vec<(&Value, &Value, &Value)> = disks
            .iter()
            .map(|d| (&d["id"], &d["bus"], &d["scsi-id"]))
            .collect();
        assert_eq!(
            targets,
            [
                (&json!("disk-qa"), &json!("scsi0.0"), &json!(0)),
                (&json!("disk-qb"), &json!("scsi0.0"), &json!(1)),
            ]
        );
        let formats: Vec<Value> = jsons(&args, "-blockdev")
            .into_iter()
            .filter(|n| n["node-name"] == "fmt-qa")
            .map(|n| n["driver"].clone())
            .collect();
        assert_eq!(formats, [json!(DiskFormat::Qcow2.as_str())]);
    }

    #[test]
    fn sata_on_q35_uses_builtin_ahci_ports_and_boot_disk_gets_bootindex() {
        let args = build(&spec(Q35_MIXED), &ctx()).unwrap();
        assert!(devices_with_driver(&args, "ich9-ahci").is_empty());
        let disks = devices_with_driver(&args, "ide-hd");
        assert_eq!(disks.len(), 2);
        assert_eq!(disks[0]["bus"], "ide.0");
        assert!(disks[0].get("bootindex").is_none());
        assert_eq!(disks[1]["bus"], "ide.1");
        assert_eq!(disks[1]["bootindex"], 1);
        assert!(values(&args, "-kernel").is_empty());
        // The controller comes before any disk device (stable PCI slots).
        let drivers: Vec<Value> = jsons(&args, "-device")
            .into_iter()
            .map(|d| d["driver"].clone())
            .collect();
        assert_eq!(drivers[0], "virtio-scsi-pci");
    }

    #[test]
    fn ide_and_sata_on_i440fx_use_piix_and_an_added_ahci() {
        let text = r#"
            name = "old"
            machine = "pc-i440fx-10.0"
            memory = "128MiB"
            [[disks]]
            id = "ia"
            path = "/d/ia.raw"
            bus = "ide"
            [[disks]]
            id = "ib"
            path = "/d/ib.raw"
            bus = "ide"
            [[disks]]
            id = "sa"
            path = "/d/sa.raw"
            bus = "sata"
            [[disks]]
            id = "ic"
            path = "/d/ic.raw"
            bus = "ide"
        "#;
        let args = build(&spec(text), &ctx()).unwrap();
        assert_eq!(
            devices_with_driver(&args, "ich9-ahci"),
            [json!({"driver": "ich9-ahci", "id": "ahci0"})]
        );
        let placement: Vec<(Value, Value, Option<Value>)> = devices_with_driver(&args, "ide-hd")
            .into_iter()
            .map(|d| (d["id"].clone(), d["bus"].clone(), d.get("unit").cloned()))
            .collect();
        assert_eq!(
            placement,
            [
                (json!("disk-ia"), json!("ide.0"), Some(json!(0))),
                (json!("disk-ib"), json!("ide.0"), Some(json!(1))),
                (json!("disk-sa"), json!("ahci0.0"), None),
                (json!("disk-ic"), json!("ide.1"), Some(json!(0))),
            ]
        );
        // Firmware boot from the first disk by default.
        let first = &devices_with_driver(&args, "ide-hd")[0];
        assert_eq!(first["bootindex"], 1);
    }

    #[test]
    fn nic_backends_and_models() {
        let text = r#"
            name = "net"
            memory = "128MiB"
            [boot]
            kernel = "/k"
            [[nics]]
            id = "a"
            backend = "none"
            [[nics]]
            id = "b"
            model = "e1000"
            tap = "tap9"
            [[nics]]
            id = "c"
            bridge = "br0"
        "#;
        let context = ctx();
        let args = build(&spec(text), &context).unwrap();
        let tap_c = bridge_tap_name(&context.qmp_socket, "c");
        assert_eq!(
            jsons(&args, "-netdev"),
            [
                json!({"type": "tap", "id": "net-b", "ifname": "tap9", "script": "no", "downscript": "no"}),
                json!({"type": "tap", "id": "net-c", "ifname": tap_c, "script": "no", "downscript": "no"}),
            ]
        );
        let unconnected = &devices_with_driver(&args, "virtio-net-pci")[0];
        assert_eq!(unconnected["id"], "nic-a");
        assert!(unconnected.get("netdev").is_none());
        let e1000 = devices_with_driver(&args, "e1000");
        assert_eq!(e1000.len(), 1);
        assert_eq!(e1000[0]["netdev"], "net-b");
    }

    #[test]
    fn bridge_tap_names_fit_linux_and_differ_per_instance() {
        let a = bridge_tap_name(Path::new("/run/ferry/vm/x/qmp.sock"), "net0");
        let b = bridge_tap_name(Path::new("/run/ferry/incoming/x/qmp.sock"), "net0");
        let c = bridge_tap_name(Path::new("/run/ferry/vm/x/qmp.sock"), "net1");
        assert_eq!(a.len(), names::MAX_IFNAME_LEN);
        assert!(names::is_valid_interface_name(&a));
        assert!(a.starts_with("fy"));
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            a,
            bridge_tap_name(Path::new("/run/ferry/vm/x/qmp.sock"), "net0"),
            "stable"
        );
    }

    #[test]
    fn same_spec_gives_same_command_line() {
        let s = spec(Q35_MIXED);
        assert_eq!(build(&s, &ctx()).unwrap(), build(&s, &ctx()).unwrap());
    }

    /// Runs the real `qemu-system-x86_64` with generated command lines.
    mod real_qemu {
        use super::*;
        use std::io::{BufRead, BufReader, Read, Write};
        use std::os::unix::net::UnixStream;
        use std::process::{Child, Command, Stdio};
        use std::time::{Duration, Instant};

        const QEMU: &str = "qemu-system-x86_64";
        /// Generous: two cores are shared with parallel builds and tests.
        const START_TIMEOUT: Duration = Duration::from_secs(60);

        fn qemu_binary() -> PathBuf {
            let found = std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join(QEMU))
                    .find(|candidate| candidate.is_file())
            });
            found.unwrap_or_else(|| {
                panic!(
                    "{QEMU} not found on PATH: install qemu-system-x86 from bookworm-backports \
                     (QEMU 10.0; see DESIGN.md, \"Facts about this environment\")"
                )
            })
        }

        /// A scratch folder, removed on drop.
        struct Scratch(PathBuf);

        impl Scratch {
            fn new(name: &str) -> Scratch {
                let dir = std::env::temp_dir()
                    .join(format!("ferry-cmdline-{name}-{}", std::process::id()));
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir).unwrap();
                Scratch(dir)
            }

            fn blank_disk(&self, name: &str) -> PathBuf {
                let path = self.0.join(name);
                let file = std::fs::File::create(&path).unwrap();
                file.set_len(MIB).unwrap();
                path
            }
        }

        impl Drop for Scratch {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }

        /// Our QEMU child; killed on drop so that a failing test leaks no
        /// process.
        struct Qemu(Child);

        impl Drop for Qemu {
            fn drop(&mut self) {
                if let Ok(None) = self.0.try_wait() {
                    let _ = self.0.kill();
                    let _ = self.0.wait();
                }
            }
        }

        impl Qemu {
            fn stderr(&mut self) -> String {
                let mut text = String::new();
                if let Some(mut stderr) = self.0.stderr.take() {
                    let _ = stderr.read_to_string(&mut text);
                }
                text
            }
        }

        fn scratch_ctx(scratch: &Scratch) -> LaunchContext {
            LaunchContext {
                qmp_socket: scratch.0.join("qmp.sock"),
                serial_socket: scratch.0.join("serial.sock"),
                serial_log: scratch.0.join("console.log"),
                pidfile: scratch.0.join("qemu.pid"),
                accel: "tcg".to_owned(),
                datastores: BTreeMap::from([("local".to_owned(), scratch.0.join("local"))]),
                incoming: None,
                start_paused: true,
                daemonize: false,
            }
        }

        struct QmpLines {
            reader: BufReader<UnixStream>,
            writer: UnixStream,
        }

        impl QmpLines {
            fn read(&mut self) -> std::io::Result<Value> {
                let mut line = String::new();
                if self.reader.read_line(&mut line)? == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "QMP closed the connection",
                    ));
                }
                Ok(
                    serde_json::from_str(&line)
                        .unwrap_or_else(|e| panic!("QMP sent {line:?}: {e}")),
                )
            }

            /// Sends a command and returns its `return`, skipping events.
            fn execute(&mut self, command: &str) -> std::io::Result<Value> {
                // One write for the whole line: QEMU acts on a command at its
                // closing brace, so after `quit` a separate newline write
                // could meet a closed socket.
                let line = format!("{}\n", json!({"execute": command}));
                self.writer.write_all(line.as_bytes())?;
                loop {
                    let reply = self.read()?;
                    if let Some(value) = reply.get("return") {
                        return Ok(value.clone());
                    }
                    assert!(reply.get("event").is_some(), "{command} failed: {reply}");
                }
            }
        }

        impl Qemu {
            /// Fails the test after the QMP connection broke, with what became
            /// of QEMU: a connection QEMU drops is almost always QEMU exiting,
            /// and its exit status and stderr say why.
            fn connection_broke(&mut self, during: &str, error: std::io::Error) -> ! {
                let deadline = Instant::now() + Duration::from_secs(5);
                let exit = loop {
                    match self.0.try_wait() {
                        Ok(Some(status)) => break format!("QEMU exited: {status}"),
                        _ if Instant::now() >= deadline => {
                            break "QEMU still runs".to_owned();
                        }
                        _ => std::thread::sleep(Duration::from_millis(50)),
                    }
                };
                panic!(
                    "QMP connection broke during {during}: {error}; {exit}; it said:\n{}",
                    self.stderr()
                );
            }
        }

        /// Starts QEMU with `args` (not daemonized), waits for its QMP socket,
        /// checks `query-status`, quits it through QMP, and waits for it to
        /// exit.
        fn run_and_quit(args: &[String], ctx: &LaunchContext, expected_status: &str) {
            let mut qemu = Qemu(
                Command::new(qemu_binary())
                    .args(args)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("spawn qemu-system-x86_64"),
            );
            let deadline = Instant::now() + START_TIMEOUT;
            let stream = loop {
                if let Some(status) = qemu.0.try_wait().unwrap() {
                    panic!(
                        "QEMU exited ({status}) before opening QMP; it said:\n{}\nargs: {args:?}",
                        qemu.stderr()
                    );
                }
                if let Ok(stream) = UnixStream::connect(&ctx.qmp_socket) {
                    break stream;
                }
                assert!(
                    Instant::now() < deadline,
                    "QEMU opened no QMP socket in time"
                );
                std::thread::sleep(Duration::from_millis(50));
            };
            stream.set_read_timeout(Some(START_TIMEOUT)).unwrap();
            let mut qmp = QmpLines {
                reader: BufReader::new(stream.try_clone().unwrap()),
                writer: stream,
            };
            let greeting = qmp
                .read()
                .unwrap_or_else(|e| qemu.connection_broke("the greeting", e));
            assert_eq!(
                greeting["QMP"]["version"]["qemu"]["major"], 10,
                "{greeting}"
            );
            for command in ["qmp_capabilities", "query-status"] {
                let reply = qmp
                    .execute(command)
                    .unwrap_or_else(|e| qemu.connection_broke(command, e));
                if command == "query-status" {
                    assert_eq!(reply["status"], expected_status, "{reply}");
                }
            }
            // QEMU may close the connection as it quits, before or after it
            // answered: either way the exit status below is the verdict.
            let _ = qmp.execute("quit");

            let deadline = Instant::now() + START_TIMEOUT;
            let exit = loop {
                if let Some(status) = qemu.0.try_wait().unwrap() {
                    break status;
                }
                assert!(Instant::now() < deadline, "QEMU did not quit");
                std::thread::sleep(Duration::from_millis(50));
            };
            assert!(exit.success(), "QEMU exited with {exit}: {}", qemu.stderr());
        }

        #[test]
        fn qemu_10_accepts_a_tiny_paused_vm() {
            let scratch = Scratch::new("tiny");
            std::fs::create_dir(scratch.0.join("local")).unwrap();
            let disk = scratch.blank_disk("local/tiny.raw");
            let text = r#"
                name = "tiny"
                memory = "64MiB"
                [[disks]]
                id = "vd0"
                datastore = "local"
                file = "tiny.raw"
                [[nics]]
                id = "net0"
            "#;
            let spec = VmSpec::from_toml_str(text, &scratch.0).unwrap();
            let ctx = scratch_ctx(&scratch);
            let args = build(&spec, &ctx).unwrap();
            assert!(disk.exists());
            run_and_quit(&args, &ctx, "prelaunch");
            assert!(ctx.serial_log.exists(), "QEMU creates the serial log");
        }

        #[test]
        fn qemu_10_accepts_every_q35_device_kind_as_a_migration_target() {
            let scratch = Scratch::new("q35-all");
            std::fs::create_dir(scratch.0.join("local")).unwrap();
            scratch.blank_disk("local/root.raw");
            scratch.blank_disk("odd, name.raw");
            scratch.blank_disk("ro.raw");
            scratch.blank_disk("sata.raw");
            let text = r#"
                name = "all"
                vcpus = 2
                memory = "128MiB"
                [boot]
                disk = "sd0"
                [[disks]]
                id = "vd0"
                datastore = "local"
                file = "root.raw"
                cache = "writeback"
                [[disks]]
                id = "sc0"
                path = "odd, name.raw"
                bus = "scsi"
                cache = "directsync"
                [[disks]]
                id = "sc1"
                path = "ro.raw"
                bus = "scsi"
                read_only = true
                cache = "unsafe"
                [[disks]]
                id = "sd0"
                path = "sata.raw"
                bus = "sata"
                cache = "writethrough"
                [[nics]]
                id = "net0"
                [[nics]]
                id = "net1"
                model = "e1000"
                [[nics]]
                id = "net2"
                backend = "none"
            "#;
            let spec = VmSpec::from_toml_str(text, &scratch.0).unwrap();
            let ctx = LaunchContext {
                incoming: Some("defer".to_owned()),
                ..scratch_ctx(&scratch)
            };
            let args = build(&spec, &ctx).unwrap();
            run_and_quit(&args, &ctx, "inmigrate");
        }

        #[test]
        fn qemu_10_accepts_ide_and_sata_on_i440fx() {
            let scratch = Scratch::new("i440fx");
            scratch.blank_disk("a.raw");
            scratch.blank_disk("b.raw");
            scratch.blank_disk("c.raw");
            let text = r#"
                name = "old"
                machine = "pc-i440fx-10.0"
                memory = "64MiB"
                serial_console = false
                [[disks]]
                id = "ia"
                path = "a.raw"
                bus = "ide"
                [[disks]]
                id = "ib"
                path = "b.raw"
                bus = "ide"
                [[disks]]
                id = "sa"
                path = "c.raw"
                bus = "sata"
            "#;
            let spec = VmSpec::from_toml_str(text, &scratch.0).unwrap();
            let ctx = scratch_ctx(&scratch);
            let args = build(&spec, &ctx).unwrap();
            run_and_quit(&args, &ctx, "prelaunch");
        }
    }
}
