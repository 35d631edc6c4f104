//! Writer of libvirt domain XML for the QEMU/KVM driver: what `virsh
//! define` takes and `virt-xml-validate FILE domain` accepts.
//!
//! Mapping:
//!
//! * name, uuid, memory (KiB), vCPUs, the spec's machine type and CPU model
//!   (`<cpu mode='custom' match='exact'>`, `fallback='forbid'`, so libvirt
//!   runs exactly that model; `+f`/`f=on` → `require`, `-f`/`f=off` →
//!   `disable`), ACPI and APIC, UTC clock;
//! * disks: `<disk type='file' device='disk'>` with the export's format and
//!   the spec disk's cache mode, `vdX` on virtio, `sdX` on SCSI and SATA,
//!   `hdX` on IDE (libvirt wants target names unique), `<readonly/>`; one
//!   `virtio-scsi` controller when any disk is on SCSI;
//! * firmware boot → `<boot order='1'/>` on the boot disk; kernel boot →
//!   `<kernel>`, `<initrd>`, `<cmdline>` in `<os>`;
//! * NICs: a cluster network → `type='network'` with that network name (a
//!   libvirt network of that name must exist), a bridge → `type='bridge'`,
//!   a tap → `type='ethernet'` on the existing tap (`managed='no'`), user
//!   networking → `type='user'`, no backend → `type='user'` with the link
//!   down (libvirt has no unconnected NIC); `<mac>` and `<model>` always;
//! * a serial console → `<serial type='pty'>` plus its `<console>`.

use std::fmt::Write as _;

use super::ExportDisk;
use ferry_core::spec::{BootSpec, DiskBus, NicBackend, VmSpec};

/// `text` escaped for XML text and single- or double-quoted attributes.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            // Line breaks in attributes would be normalised to spaces.
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            '\t' => out.push_str("&#9;"),
            c => out.push(c),
        }
    }
    out
}

/// The device-name suffix of the `index`th disk: a … z, aa, ab, …
fn disk_letters(mut index: usize) -> String {
    let mut letters = Vec::new();
    loop {
        letters.push(b'a' + (index % 26) as u8);
        if index < 26 {
            break;
        }
        index = index / 26 - 1;
    }
    letters.reverse();
    String::from_utf8(letters).unwrap_or_default()
}

/// `<feature>` elements for the flags of a QEMU CPU model string
/// (`qemu64,+ssse3,-x2apic,aes=on`), and the model itself.
fn cpu_model_and_features(cpu_model: &str) -> (&str, Vec<(&'static str, &str)>) {
    let mut parts = cpu_model.split(',');
    let model = parts.next().unwrap_or("").trim();
    let features = parts
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .map(|flag| {
            if let Some(name) = flag.strip_prefix('+') {
                ("require", name)
            } else if let Some(name) = flag.strip_prefix('-') {
                ("disable", name)
            } else if let Some((name, value)) = flag.split_once('=') {
                let off = matches!(value, "off" | "false" | "no");
                (if off { "disable" } else { "require" }, name)
            } else {
                ("require", flag)
            }
        })
        .collect();
    (model, features)
}

/// The libvirt text describing `spec` with `disks`.
pub fn write(spec: &VmSpec, disks: &[ExportDisk]) -> String {
    let mut out = String::new();
    let kib = spec.memory_bytes / 1024;
    out.push_str("<domain type='kvm'>\n");
    let _ = writeln!(out, "  <name>{}</name>", escape(&spec.name));
    let _ = writeln!(out, "  <uuid>{}</uuid>", spec.uuid.hyphenated());
    let _ = writeln!(out, "  <memory unit='KiB'>{kib}</memory>");
    let _ = writeln!(out, "  <currentMemory unit='KiB'>{kib}</currentMemory>");
    let _ = writeln!(out, "  <vcpu placement='static'>{}</vcpu>", spec.vcpus);

    out.push_str("  <os>\n");
    let _ = writeln!(
        out,
        "    <type arch='x86_64' machine='{}'>hvm</type>",
        escape(&spec.machine_type)
    );
    if let BootSpec::Kernel {
        kernel,
        initrd,
        cmdline,
    } = &spec.boot
    {
        let _ = writeln!(
            out,
            "    <kernel>{}</kernel>",
            escape(&kernel.to_string_lossy())
        );
        if let Some(initrd) = initrd {
            let _ = writeln!(
                out,
                "    <initrd>{}</initrd>",
                escape(&initrd.to_string_lossy())
            );
        }
        if !cmdline.is_empty() {
            let _ = writeln!(out, "    <cmdline>{}</cmdline>", escape(cmdline));
        }
    }
    out.push_str("  </os>\n");
    out.push_str("  <features>\n    <acpi/>\n    <apic/>\n  </features>\n");

    let (model, features) = cpu_model_and_features(&spec.cpu_model);
    out.push_str("  <cpu mode='custom' match='exact' check='none'>\n");
    let _ = writeln!(
        out,
        "    <model fallback='forbid'>{}</model>",
        escape(model)
    );
    for (policy, name) in features {
        let _ = writeln!(
            out,
            "    <feature policy='{policy}' name='{}'/>",
            escape(name)
        );
    }
    out.push_str("  </cpu>\n");
    out.push_str("  <clock offset='utc'/>\n");
    out.push_str("  <on_poweroff>destroy</on_poweroff>\n");
    out.push_str("  <on_reboot>restart</on_reboot>\n");
    out.push_str("  <on_crash>destroy</on_crash>\n");

    out.push_str("  <devices>\n");
    let boot_disk = match &spec.boot {
        BootSpec::Firmware { disk } => Some(disk.as_str()),
        BootSpec::Kernel { .. } => None,
    };
    let (mut vd, mut sd, mut hd) = (0, 0, 0);
    let mut any_scsi = false;
    let mut boot_written = false;
    for disk in disks {
        let (prefix, counter, bus) = match disk.bus {
            DiskBus::Virtio => ("vd", &mut vd, "virtio"),
            DiskBus::Scsi => ("sd", &mut sd, "scsi"),
            DiskBus::Sata => ("sd", &mut sd, "sata"),
            DiskBus::Ide => ("hd", &mut hd, "ide"),
        };
        let dev = format!("{prefix}{}", disk_letters(*counter));
        *counter += 1;
        any_scsi |= disk.bus == DiskBus::Scsi;
        let cache = spec
            .disks
            .iter()
            .find(|d| d.id == disk.id)
            .map(|d| format!(" cache='{}'", d.cache.as_str()))
            .unwrap_or_default();
        out.push_str("    <disk type='file' device='disk'>\n");
        let _ = writeln!(
            out,
            "      <driver name='qemu' type='{}'{cache}/>",
            escape(&disk.format)
        );
        let _ = writeln!(out, "      <source file='{}'/>", escape(&disk.file_name));
        let _ = writeln!(out, "      <target dev='{dev}' bus='{bus}'/>");
        if disk.read_only {
            out.push_str("      <readonly/>\n");
        }
        if !boot_written && boot_disk == Some(disk.id.as_str()) {
            out.push_str("      <boot order='1'/>\n");
            boot_written = true;
        }
        out.push_str("    </disk>\n");
    }
    if any_scsi {
        out.push_str("    <controller type='scsi' index='0' model='virtio-scsi'/>\n");
    }

    for nic in &spec.nics {
        let (kind, source, link_down) = match &nic.backend {
            NicBackend::Network { network } => (
                "network",
                format!("      <source network='{}'/>\n", escape(network)),
                false,
            ),
            NicBackend::Bridge { bridge } => (
                "bridge",
                format!("      <source bridge='{}'/>\n", escape(bridge)),
                false,
            ),
            NicBackend::Tap { tap } => (
                "ethernet",
                format!("      <target dev='{}' managed='no'/>\n", escape(tap)),
                false,
            ),
            NicBackend::User => ("user", String::new(), false),
            NicBackend::None => ("user", String::new(), true),
        };
        let _ = writeln!(out, "    <interface type='{kind}'>");
        let _ = writeln!(out, "      <mac address='{}'/>", escape(&nic.mac));
        out.push_str(&source);
        let _ = writeln!(out, "      <model type='{}'/>", nic.model.as_str());
        if link_down {
            out.push_str("      <link state='down'/>\n");
        }
        out.push_str("    </interface>\n");
    }

    if spec.serial_console {
        out.push_str("    <serial type='pty'>\n      <target port='0'/>\n    </serial>\n");
        out.push_str(
            "    <console type='pty'>\n      <target type='serial' port='0'/>\n    </console>\n",
        );
    }
    out.push_str("  </devices>\n");
    out.push_str("</domain>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::descriptors::libvirt;
    use crate::foreign::BusKind;
    use ferry_core::spec::{CacheMode, DiskFormat, DiskSource, DiskSpec, NicModel, NicSpec};
    use std::path::PathBuf;

    fn disk_spec(id: &str, bus: DiskBus, cache: CacheMode) -> DiskSpec {
        DiskSpec {
            id: id.into(),
            source: DiskSource::Path {
                path: PathBuf::from(format!("/vms/{id}.qcow2")),
            },
            format: DiskFormat::Qcow2,
            bus,
            cache,
            read_only: false,
            image: None,
            create_size_bytes: None,
        }
    }

    fn export_disk(id: &str, bus: DiskBus, format: &str, read_only: bool) -> ExportDisk {
        ExportDisk {
            id: id.into(),
            file_name: format!("/var/lib/libvirt/images/{id} & 'co'.{format}"),
            format: format.into(),
            capacity_bytes: 10 << 30,
            file_size_bytes: 1 << 30,
            bus,
            read_only,
        }
    }

    fn nic(id: &str, model: NicModel, last: u8, backend: NicBackend) -> NicSpec {
        NicSpec {
            id: id.into(),
            model,
            mac: format!("52:54:00:00:00:{last:02x}"),
            backend,
        }
    }

    fn spec() -> VmSpec {
        VmSpec {
            name: "web01".into(),
            uuid: uuid::Uuid::parse_str("6f3e2c1a-8b4d-4e5f-9a0b-1c2d3e4f5a6b").unwrap(),
            vcpus: 2,
            memory_bytes: 3 << 30,
            machine_type: "pc-q35-10.0".into(),
            cpu_model: "qemu64,+ssse3,-x2apic,aes=on".into(),
            disks: vec![
                disk_spec("root", DiskBus::Virtio, CacheMode::Writeback),
                disk_spec("data", DiskBus::Scsi, CacheMode::None),
                disk_spec("old", DiskBus::Sata, CacheMode::Directsync),
            ],
            nics: vec![
                nic(
                    "lan",
                    NicModel::Virtio,
                    1,
                    NicBackend::Network {
                        network: "prod<&>".into(),
                    },
                ),
                nic(
                    "br",
                    NicModel::E1000,
                    2,
                    NicBackend::Bridge {
                        bridge: "br0".into(),
                    },
                ),
                nic(
                    "tap",
                    NicModel::Virtio,
                    3,
                    NicBackend::Tap { tap: "tap7".into() },
                ),
                nic("user", NicModel::Virtio, 4, NicBackend::User),
                nic("off", NicModel::E1000, 5, NicBackend::None),
            ],
            serial_console: true,
            boot: BootSpec::Firmware {
                disk: "data".into(),
            },
        }
    }

    fn disks() -> Vec<ExportDisk> {
        vec![
            export_disk("root", DiskBus::Virtio, "qcow2", false),
            export_disk("data", DiskBus::Scsi, "raw", true),
            export_disk("old", DiskBus::Sata, "qcow2", false),
        ]
    }

    fn kernel_spec() -> VmSpec {
        let mut spec = spec();
        spec.cpu_model = "qemu64".into();
        spec.serial_console = false;
        spec.boot = BootSpec::Kernel {
            kernel: "/boot/vmlinuz-6.8".into(),
            initrd: Some("/boot/initrd.img-6.8".into()),
            cmdline: "console=ttyS0 root=/dev/vda1 quiet & 'x'".into(),
        };
        spec
    }

    #[test]
    fn written_domain_reads_back() {
        let text = write(&spec(), &disks());
        assert!(
            text.contains("<feature policy='require' name='ssse3'/>"),
            "{text}"
        );
        assert!(
            text.contains("<feature policy='disable' name='x2apic'/>"),
            "{text}"
        );
        assert!(
            text.contains("<feature policy='require' name='aes'/>"),
            "{text}"
        );
        assert!(text.contains("cache='writeback'"), "{text}");
        assert!(text.contains("model='virtio-scsi'"), "{text}");
        assert!(text.contains("<link state='down'/>"), "{text}");
        assert!(text.contains("<target dev='tap7' managed='no'/>"), "{text}");

        let vm = libvirt::parse(&text, "web01.xml").unwrap();
        assert_eq!(vm.name.as_deref(), Some("web01"));
        assert_eq!(
            vm.uuid.as_deref(),
            Some("6f3e2c1a-8b4d-4e5f-9a0b-1c2d3e4f5a6b")
        );
        assert_eq!(vm.vcpus, Some(2));
        assert_eq!(vm.memory_bytes, Some(3 << 30));
        assert_eq!(vm.platform.as_deref(), Some("pc-q35-10.0"));
        type Row<'a> = (
            &'a str,
            &'a str,
            BusKind,
            Option<&'a str>,
            Option<u32>,
            bool,
        );
        let read: Vec<Row> = vm
            .disks
            .iter()
            .map(|d| {
                (
                    d.label.as_str(),
                    d.file.as_str(),
                    d.bus,
                    d.format_claim.as_deref(),
                    d.boot_order,
                    d.read_only,
                )
            })
            .collect();
        assert_eq!(
            read,
            [
                (
                    "vda",
                    "/var/lib/libvirt/images/root & 'co'.qcow2",
                    BusKind::Virtio,
                    Some("qcow2"),
                    None,
                    false
                ),
                (
                    "sda",
                    "/var/lib/libvirt/images/data & 'co'.raw",
                    BusKind::Scsi,
                    Some("raw"),
                    Some(1),
                    true
                ),
                (
                    "sdb",
                    "/var/lib/libvirt/images/old & 'co'.qcow2",
                    BusKind::Sata,
                    Some("qcow2"),
                    None,
                    false
                ),
            ]
        );
        assert_eq!(vm.disks[1].controller, "virtio-scsi");
        let macs: Vec<&str> = vm.nics.iter().filter_map(|n| n.mac.as_deref()).collect();
        assert_eq!(
            macs,
            [
                "52:54:00:00:00:01",
                "52:54:00:00:00:02",
                "52:54:00:00:00:03",
                "52:54:00:00:00:04",
                "52:54:00:00:00:05"
            ]
        );
        assert_eq!(vm.nics[0].network.as_deref(), Some("prod<&>"));
        assert_eq!(vm.nics[1].network.as_deref(), Some("br0"));
        assert_eq!(vm.nics[1].model, "e1000");

        let kernel = write(&kernel_spec(), &disks());
        assert!(
            kernel.contains("<kernel>/boot/vmlinuz-6.8</kernel>"),
            "{kernel}"
        );
        assert!(kernel
            .contains("<cmdline>console=ttyS0 root=/dev/vda1 quiet &amp; &apos;x&apos;</cmdline>"));
        assert!(!kernel.contains("<boot order"), "{kernel}");
        let vm = libvirt::parse(&kernel, "k.xml").unwrap();
        assert!(vm.disks.iter().all(|d| d.boot_order.is_none()));
    }

    #[test]
    fn disk_letters_count_like_linux() {
        assert_eq!(disk_letters(0), "a");
        assert_eq!(disk_letters(25), "z");
        assert_eq!(disk_letters(26), "aa");
        assert_eq!(disk_letters(27), "ab");
        assert_eq!(disk_letters(26 + 26 * 26), "aaa");
    }

    /// Runs `virt-xml-validate` on `text`; panics with the install hint when
    /// the tool is missing.
    fn validate(text: &str) {
        let mut file = tempfile::Builder::new()
            .suffix(".xml")
            .tempfile()
            .expect("temporary file");
        std::io::Write::write_all(&mut file, text.as_bytes()).expect("write domain XML");
        let output = match std::process::Command::new("virt-xml-validate")
            .arg(file.path())
            .arg("domain")
            .output()
        {
            Ok(output) => output,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                panic!("install libvirt-clients (virt-xml-validate)")
            }
            Err(error) => panic!("cannot run virt-xml-validate: {error}"),
        };
        assert!(
            output.status.success(),
            "virt-xml-validate refused the domain:\n{}{}\n{text}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    #[test]
    fn virt_xml_validate_accepts_the_output() {
        validate(&write(&spec(), &disks()));
        validate(&write(&kernel_spec(), &disks()));
        let mut minimal = kernel_spec();
        minimal.nics.clear();
        validate(&write(&minimal, &[]));
    }
}
