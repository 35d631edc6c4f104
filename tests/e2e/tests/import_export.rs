//! End-to-end: cross-platform migration ("Cross-platform migration:
//! import VMs from VMware, Hyper-V, VirtualBox and libvirt, export them
//! back, and treat every image as hostile"), through the real `ferry` CLI.
//!
//! One cluster of one host. A stopped VM `src` (the test guest's bootable
//! disk, firmware boot, a virtio NIC with a fixed MAC) is the source:
//!
//! 1. Round trips — `src` exported as an OVA, as a VMX with its VMDK and as
//!    libvirt XML (which `virt-xml-validate` accepts), and the guest's disk
//!    converted by qemu-img to VHDX (with `--vcpus/--memory`), to VHD under
//!    a Hyper-V configuration XML, and to VDI under a `.vbox`: each imports
//!    back into a VM whose disk is byte-identical to the source
//!    (`qemu-img compare` against the guest's disk), with `src`'s vCPUs and
//!    memory, whose report names every device mapping (cpu, memory,
//!    firmware, disk, nic, boot), and which boots and shows its heartbeat.
//!    Keeping `src`'s MAC is refused while `src` exists (`--new-macs`
//!    named); the libvirt round trip keeps buses and NIC model exactly.
//!    `--dry-run` prints the same report and defines and writes nothing.
//! 2. Hostile inputs, a table: each is imported for real (not a dry run)
//!    with `TMPDIR` pointing into the test's folder, and must be refused
//!    with its reason, leaving no VM, no file in the datastore, nothing in
//!    `TMPDIR` and the fixtures' folder unchanged. An import interrupted by
//!    Ctrl-C leaves nothing either.
//!
//! Needs `qemu-img` (qemu-utils), `virt-xml-validate` (libvirt-clients)
//! and the built test guest.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_e2e::{heartbeats, Cluster};
use serde_json::Value;

const HOST: &str = "host1";
const SRC_MAC: &str = "52:54:00:fe:44:01";

fn require_tool(program: &str, args: &[&str], package: &str) {
    let found = Command::new(program).args(args).output().is_ok();
    assert!(
        found,
        "this test needs `{program}`: install {package} (e.g. `apt-get install {package}`)"
    );
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{program}`: {e}"));
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

fn src_spec(disk: &Path) -> String {
    format!(
        r#"name = "src"
vcpus = 1
memory = "512MiB"

[boot]
firmware = "bios"
disk = "vd0"

[[disks]]
id = "vd0"
datastore = "local"
file = "src.raw"
format = "raw"
image = "{disk}"

[[nics]]
id = "net0"
model = "virtio"
mac = "{SRC_MAC}"
backend = "user"
"#,
        disk = disk.display()
    )
}

/// Every file under `dir` with its size (names relative to `dir`).
fn snapshot(dir: &Path) -> BTreeMap<String, u64> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(folder) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).expect("metadata");
            if meta.is_dir() {
                stack.push(path.clone());
            }
            files.insert(
                path.strip_prefix(dir).unwrap().display().to_string(),
                meta.len(),
            );
        }
    }
    files
}

/// The device kinds an import report maps.
fn mapped_devices(report: &Value) -> Vec<String> {
    report["mappings"]
        .as_array()
        .expect("mappings")
        .iter()
        .map(|m| m["device"].as_str().expect("device").to_string())
        .collect()
}

/// Imports `path` as `name`, checks the report and the disk, boots it,
/// waits for its heartbeat and deletes it.
fn import_boot_and_check(
    cluster: &Cluster,
    path: &Path,
    name: &str,
    extra: &[&str],
    origin: &str,
    guest_disk: &Path,
) -> Value {
    let mut args = vec![
        "import",
        s(path),
        "--host",
        HOST,
        "--name",
        name,
        "-o",
        "json",
    ];
    args.extend_from_slice(extra);
    let report = cluster.ferry_ok(&args).json();
    assert_eq!(report["origin"], origin, "{report:#}");
    assert_eq!(report["dry_run"], false);
    assert_eq!(report["vm"], name);
    let devices = mapped_devices(&report);
    for device in ["cpu", "memory", "firmware", "disk", "boot"] {
        assert!(
            devices.iter().any(|d| d == device),
            "the report of {} names no {device} mapping: {devices:?}",
            path.display()
        );
    }
    for disk in report["disks"].as_array().expect("disks") {
        assert_eq!(
            disk["verified"], true,
            "disk not verified in the report: {disk:#}"
        );
    }
    let vm = cluster.vm(name);
    assert_eq!(vm["state"], "stopped", "{vm:#}");
    assert_eq!(vm["spec"]["vcpus"], 1);
    assert_eq!(vm["spec"]["memory_bytes"], 512u64 << 20);
    assert_eq!(vm["spec"]["boot"]["kind"], "firmware");
    // The imported disk holds exactly the guest's bytes.
    let disk_path = vm["disks"][0]["path"].as_str().expect("disk path");
    let format = vm["spec"]["disks"][0]["format"].as_str().expect("format");
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            format,
            s(guest_disk),
            disk_path,
        ],
    );
    cluster.ferry_ok(&["vm", "start", name]);
    let log = cluster.wait_heartbeat(HOST, name);
    assert!(
        !heartbeats(&log).is_empty(),
        "{name} printed no heartbeat:\n{log}"
    );
    cluster.ferry_ok(&["vm", "stop", name]);
    cluster.ferry_ok(&["vm", "delete", name]);
    eprintln!("{name}: imported from {} and booted", path.display());
    report
}

/// A .vbox as VirtualBox 7 writes it, for `disk.vdi`.
fn vbox_xml(vdi: &str) -> String {
    format!(
        r#"<?xml version="1.0"?>
<VirtualBox xmlns="http://www.virtualbox.org/" version="1.19-linux">
  <Machine uuid="{{6c7f4d3a-1b2c-4d5e-8f90-a1b2c3d4e5f6}}" name="vbox-guest" OSType="Debian_64" snapshotFolder="Snapshots">
    <MediaRegistry>
      <HardDisks>
        <HardDisk uuid="{{0e1d2c3b-4a59-6877-8695-a4b3c2d1e0f9}}" location="{vdi}" format="VDI" type="Normal"/>
      </HardDisks>
    </MediaRegistry>
    <Hardware>
      <CPU count="1"/>
      <Memory RAMSize="512"/>
      <Firmware type="BIOS"/>
      <Boot>
        <Order position="1" device="HardDisk"/>
        <Order position="2" device="DVD"/>
      </Boot>
      <Network>
        <Adapter slot="0" enabled="true" MACAddress="080027A1B2C3" type="82540EM">
          <NAT/>
        </Adapter>
      </Network>
      <AudioAdapter driver="Pulse" enabled="true"/>
      <StorageControllers>
        <StorageController name="SATA" type="AHCI" PortCount="2" useHostIOCache="false" Bootable="true">
          <AttachedDevice type="HardDisk" hotpluggable="false" port="0" device="0">
            <Image uuid="{{0e1d2c3b-4a59-6877-8695-a4b3c2d1e0f9}}"/>
          </AttachedDevice>
          <AttachedDevice passthrough="false" type="DVD" hotpluggable="false" port="1" device="0"/>
        </StorageController>
      </StorageControllers>
    </Hardware>
  </Machine>
</VirtualBox>
"#
    )
}

/// A Hyper-V 2012 configuration XML for `disk.vhd`.
fn hyperv_xml(vhd: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-16" standalone="yes"?>
<configuration>
  <properties>
    <name type="string">hyperv-guest</name>
    <subtype type="integer">0</subtype>
  </properties>
  <settings>
    <processors><count type="integer">1</count></processors>
    <memory><bank><size type="integer">512</size></bank></memory>
  </settings>
  <_83F8638B-8DCA-4152-9EDA-2CA8B33039B4_>
    <controller0>
      <drive0>
        <pathname type="string">C:\Hyper-V\Virtual Hard Disks\{vhd}</pathname>
        <type type="string">VHD</type>
      </drive0>
    </controller0>
  </_83F8638B-8DCA-4152-9EDA-2CA8B33039B4_>
</configuration>
"#
    )
}

fn roundtrips(cluster: &Cluster, scratch: &Path, guest_disk: &Path) {
    let datastore = cluster.datastore(HOST, "local");

    // OVA: a dry run first — the report, and nothing defined or written.
    let ova = scratch.join("src.ova");
    cluster.ferry_ok(&["export", "src", "--format", "ova", "-o", s(&ova)]);
    let members = run("tar", &["tf", s(&ova)]);
    let members: Vec<&str> = members.lines().collect();
    assert_eq!(
        members,
        ["src.ovf", "src.mf", "src-vd0.vmdk"],
        "the OVA holds the OVF first, then its manifest, then the disk"
    );
    let before = snapshot(&datastore);
    let dry = cluster
        .ferry_ok(&[
            "import",
            s(&ova),
            "--host",
            HOST,
            "--name",
            "from-ova",
            "--new-macs",
            "--dry-run",
            "-o",
            "json",
        ])
        .json();
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["disks"][0]["image"]["format"], "vmdk");
    assert_eq!(dry["disks"][0]["image"]["variant"], "streamOptimized");
    assert!(
        dry["checks"].to_string().contains("digests match"),
        "the OVA's manifest was not checked: {dry:#}"
    );
    assert_eq!(
        snapshot(&datastore),
        before,
        "a dry run wrote into the datastore"
    );
    let missing = cluster.ferry_err(&["vm", "show", "from-ova"]);
    assert!(missing.contains("no VM"), "{missing}");
    let text = cluster
        .ferry_ok(&[
            "import",
            s(&ova),
            "--name",
            "from-ova",
            "--new-macs",
            "--dry-run",
        ])
        .stdout;
    assert!(
        text.contains("mappings (") && text.contains("disk") && text.contains("nic"),
        "text report:\n{text}"
    );

    // The same OVF unpacked next to its disk (and manifest) imports too.
    let ovf_dir = scratch.join("ovf");
    std::fs::create_dir(&ovf_dir).unwrap();
    run("tar", &["xf", s(&ova), "-C", s(&ovf_dir)]);
    let unpacked = cluster
        .ferry_ok(&[
            "import",
            s(&ovf_dir.join("src.ovf")),
            "--name",
            "from-ovf",
            "--new-macs",
            "--dry-run",
            "-o",
            "json",
        ])
        .json();
    assert_eq!(unpacked["origin"], "ovf");
    assert!(
        unpacked["checks"].to_string().contains("digests match"),
        "the manifest beside the OVF was not checked: {unpacked:#}"
    );
    // A disk that no longer matches its manifest digest is refused.
    let vmdk = ovf_dir.join("src-vd0.vmdk");
    let mut bytes = std::fs::read(&vmdk).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&vmdk, &bytes).unwrap();
    let error = cluster.ferry_err(&["import", s(&ovf_dir.join("src.ovf")), "--dry-run"]);
    assert!(error.contains("does not match"), "{error}");

    // Keeping the MAC of a VM that exists is refused, with the way out.
    let error = cluster.ferry_err(&["import", s(&ova), "--name", "from-ova"]);
    assert!(
        error.contains(SRC_MAC) && error.contains("src") && error.contains("--new-macs"),
        "{error}"
    );
    let report = import_boot_and_check(
        cluster,
        &ova,
        "from-ova",
        &["--new-macs"],
        "ovf",
        guest_disk,
    );
    assert!(mapped_devices(&report).iter().any(|d| d == "nic"));

    // VMX + monolithicSparse VMDK beside it.
    let vmx_dir = scratch.join("vmx");
    std::fs::create_dir(&vmx_dir).unwrap();
    let vmx = vmx_dir.join("src.vmx");
    cluster.ferry_ok(&["export", "src", "--format", "vmx", "-o", s(&vmx)]);
    assert!(vmx_dir.join("src-vd0.vmdk").is_file());
    import_boot_and_check(
        cluster,
        &vmx,
        "from-vmx",
        &["--new-macs"],
        "vmx",
        guest_disk,
    );

    // libvirt XML, valid for libvirt itself; buses and NIC model kept.
    let xml_dir = scratch.join("libvirt");
    std::fs::create_dir(&xml_dir).unwrap();
    let xml = xml_dir.join("src.xml");
    cluster.ferry_ok(&["export", "src", "--format", "libvirt-xml", "-o", s(&xml)]);
    run("virt-xml-validate", &[s(&xml), "domain"]);
    import_boot_and_check(
        cluster,
        &xml,
        "from-libvirt",
        &["--new-macs", "--format", "raw"],
        "libvirt",
        guest_disk,
    );

    // VHDX: a bare disk, with --vcpus and --memory.
    let vhdx = scratch.join("guest.vhdx");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "vhdx",
            s(guest_disk),
            s(&vhdx),
        ],
    );
    let error = cluster.ferry_err(&["import", s(&vhdx), "--name", "from-vhdx"]);
    assert!(error.contains("--vcpus"), "{error}");
    import_boot_and_check(
        cluster,
        &vhdx,
        "from-vhdx",
        &["--vcpus", "1", "--memory", "512MiB"],
        "image",
        guest_disk,
    );

    // VHD under a Hyper-V configuration.
    let hyperv_dir = scratch.join("hyperv");
    std::fs::create_dir(&hyperv_dir).unwrap();
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            "subformat=dynamic,force_size=on",
            s(guest_disk),
            s(&hyperv_dir.join("guest.vhd")),
        ],
    );
    let hyperv = hyperv_dir.join("hyperv-guest.xml");
    // Hyper-V writes its configuration as UTF-16LE with a BOM.
    let mut utf16 = vec![0xff, 0xfe];
    utf16.extend(
        hyperv_xml("guest.vhd")
            .encode_utf16()
            .flat_map(u16::to_le_bytes),
    );
    std::fs::write(&hyperv, utf16).unwrap();
    import_boot_and_check(cluster, &hyperv, "from-hyperv", &[], "hyper-v", guest_disk);

    // VirtualBox: .vbox + VDI.
    let vbox_dir = scratch.join("vbox");
    std::fs::create_dir(&vbox_dir).unwrap();
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "vdi",
            s(guest_disk),
            s(&vbox_dir.join("guest.vdi")),
        ],
    );
    let vbox = vbox_dir.join("vbox-guest.vbox");
    std::fs::write(&vbox, vbox_xml("guest.vdi")).unwrap();
    let report = import_boot_and_check(cluster, &vbox, "from-vbox", &[], "vbox", guest_disk);
    let devices = mapped_devices(&report);
    assert!(
        devices.iter().any(|d| d == "cdrom") && devices.iter().any(|d| d == "sound"),
        "the DVD drive and the sound card should be reported left out: {report:#}"
    );
}

// ---- hostile inputs ------------------------------------------------------------------

/// A tar header for `name` of `kind`, written by hand so names the `tar`
/// crate's safe builder would refuse (`../x`) can be made.
fn tar_member(
    builder: &mut tar::Builder<std::fs::File>,
    name: &str,
    kind: tar::EntryType,
    link: Option<&str>,
    data: &[u8],
) {
    let mut header = tar::Header::new_ustar();
    {
        let raw = header.as_old_mut();
        raw.name[..name.len()].copy_from_slice(name.as_bytes());
    }
    header.set_entry_type(kind);
    header.set_mode(0o644);
    header.set_size(data.len() as u64);
    if let Some(link) = link {
        header.set_link_name(link).unwrap();
    }
    header.set_cksum();
    builder.append(&header, data).unwrap();
}

const OVF_ONE_DISK: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData">
  <References><File ovf:id="file1" ovf:href="HREF"/></References>
  <DiskSection><Info>disks</Info><Disk ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:capacity="1048576" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/></DiskSection>
  <VirtualSystem ovf:id="evil">
    <Info>a VM</Info>
    <Name>evil</Name>
    <VirtualHardwareSection>
      <Info>hw</Info>
      <Item><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>1</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits><rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>256</rasd:VirtualQuantity></Item>
      <Item><rasd:InstanceID>3</rasd:InstanceID><rasd:ResourceType>6</rasd:ResourceType><rasd:ResourceSubType>lsilogic</rasd:ResourceSubType></Item>
      <Item><rasd:AddressOnParent>0</rasd:AddressOnParent><rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource><rasd:InstanceID>4</rasd:InstanceID><rasd:Parent>3</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#;

fn ova_with(
    path: &Path,
    disk_name: &str,
    members: &[(&str, tar::EntryType, Option<&str>, Vec<u8>)],
) {
    let mut builder = tar::Builder::new(std::fs::File::create(path).unwrap());
    let ovf = OVF_ONE_DISK.replace("HREF", disk_name);
    tar_member(
        &mut builder,
        "evil.ovf",
        tar::EntryType::Regular,
        None,
        ovf.as_bytes(),
    );
    for (name, kind, link, data) in members {
        tar_member(&mut builder, name, *kind, *link, data);
    }
    builder.finish().unwrap();
}

/// The hostile fixtures: (file to import, what it is, what the refusal
/// must say). File names say nothing, so a reason cannot match a path.
fn hostile_fixtures(dir: &Path) -> Vec<(PathBuf, &'static str, Vec<&'static str>)> {
    let p = |name: &str| dir.join(name);
    let mut cases = Vec::new();

    // qcow2 with a backing file.
    run(
        "qemu-img",
        &["create", "-q", "-f", "raw", s(&p("base.img")), "1M"],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            s(&p("base.img")),
            "-F",
            "raw",
            s(&p("c1.qcow2")),
        ],
    );
    cases.push((p("c1.qcow2"), "qcow2 backing file", vec!["backing file"]));

    // qcow2 with an external data file.
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={}", s(&p("data.bin"))),
            s(&p("c2.qcow2")),
            "1M",
        ],
    );
    cases.push((p("c2.qcow2"), "qcow2 data-file", vec!["external data file"]));

    // A VMDK descriptor whose flat extent is /etc/passwd.
    std::fs::write(
        p("c3.vmdk"),
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\n# Extent description\nRW 8 FLAT \"/etc/passwd\" 0\n\n# The Disk Data Base\nddb.adapterType = \"lsilogic\"\n",
    )
    .unwrap();
    cases.push((
        p("c3.vmdk"),
        "VMDK extent at /etc/passwd",
        vec!["\"/etc/passwd\"", "outside the import folder"],
    ));

    // An OVA whose disk member climbs out with '..'.
    let stream = p("stream.vmdk");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            s(&stream),
            "1M",
        ],
    );
    let vmdk_bytes = std::fs::read(&stream).unwrap();
    std::fs::remove_file(&stream).unwrap();
    ova_with(
        &p("c4.ova"),
        "../evil.vmdk",
        &[(
            "../evil.vmdk",
            tar::EntryType::Regular,
            None,
            vmdk_bytes.clone(),
        )],
    );
    cases.push((
        p("c4.ova"),
        "OVA path traversal",
        vec!["\"../evil.vmdk\"", "'..'"],
    ));

    // An OVA with a symlink member pointing at /etc/passwd.
    ova_with(
        &p("c5.ova"),
        "disk.vmdk",
        &[(
            "disk.vmdk",
            tar::EntryType::Symlink,
            Some("/etc/passwd"),
            Vec::new(),
        )],
    );
    cases.push((p("c5.ova"), "OVA symlink member", vec!["symbolic link"]));

    // An XML entity bomb (as a libvirt domain).
    std::fs::write(
        p("c6.xml"),
        r#"<?xml version="1.0"?>
<!DOCTYPE domain [
 <!ENTITY a "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa">
 <!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">
 <!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">
 <!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">
 <!ENTITY e "&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;">
]>
<domain type="kvm"><name>&e;</name><memory>1024</memory><vcpu>1</vcpu></domain>
"#,
    )
    .unwrap();
    cases.push((p("c6.xml"), "XML entity bomb", vec!["DTD"]));

    // A tiny file claiming 1 PiB.
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&p("c7.qcow2")), "1P"],
    );
    cases.push((
        p("c7.qcow2"),
        "1 PiB claim",
        vec!["1 PiB", "--max-disk-size"],
    ));

    // Truncated headers.
    let mut qcow2_head = std::fs::read(p("c1.qcow2")).unwrap();
    qcow2_head.truncate(40);
    std::fs::write(p("c8.qcow2"), &qcow2_head).unwrap();
    cases.push((p("c8.qcow2"), "truncated qcow2 header", vec!["truncated"]));
    let mut vdi_head = vec![0u8; 0x48];
    vdi_head[..40].copy_from_slice(b"<<< Oracle VM VirtualBox Disk Image >>>\n");
    vdi_head[0x40..0x44].copy_from_slice(&0xbeda_107fu32.to_le_bytes());
    std::fs::write(p("c9.vdi"), &vdi_head).unwrap();
    cases.push((p("c9.vdi"), "truncated VDI header", vec!["truncated"]));

    // A "raw" file that carries a qcow2 header.
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&p("c10.raw")), "1M"],
    );
    cases.push((
        p("c10.raw"),
        "raw file with a qcow2 header",
        vec!["claims raw", "qcow2 image"],
    ));

    // A qcow2 image that also ends with a VHD footer: two formats at once.
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&p("c11.img")), "1M"],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vpc",
            "-o",
            "subformat=fixed",
            s(&p("fixed.vhd")),
            "1M",
        ],
    );
    let footer = {
        let vhd = std::fs::read(p("fixed.vhd")).unwrap();
        vhd[vhd.len() - 512..].to_vec()
    };
    let mut both = std::fs::read(p("c11.img")).unwrap();
    both.extend_from_slice(&footer);
    std::fs::write(p("c11.img"), &both).unwrap();
    cases.push((p("c11.img"), "qcow2 and VHD at once", vec!["two formats"]));

    cases
}

fn hostile_inputs(cluster: &Cluster, scratch: &Path) {
    let dir = scratch.join("hostile");
    std::fs::create_dir(&dir).unwrap();
    let tmp = scratch.join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let cases = hostile_fixtures(&dir);
    let datastore = cluster.datastore(HOST, "local");
    let vms_before = cluster.ferry_ok(&["vm", "list", "-o", "json"]).json();
    for (index, (path, what, reasons)) in cases.iter().enumerate() {
        let fixtures_before = snapshot(&dir);
        let datastore_before = snapshot(&datastore);
        let name = format!("hostile-{index}");
        let run = cluster.ferry_with_env(
            &[
                "import",
                s(path),
                "--host",
                HOST,
                "--name",
                &name,
                "--vcpus",
                "1",
                "--memory",
                "256MiB",
            ],
            &[("TMPDIR", tmp.as_os_str()), ("LC_ALL", OsStr::new("C"))],
        );
        assert!(
            !run.success,
            "{what}: `ferry import {}` should have been refused but printed:\n{}",
            path.display(),
            run.stdout
        );
        for reason in reasons {
            assert!(
                run.stderr.contains(reason),
                "{what}: the refusal should say {reason:?}:\n{}",
                run.stderr
            );
        }
        assert_eq!(
            snapshot(&dir),
            fixtures_before,
            "{what}: the input's folder changed"
        );
        assert_eq!(
            snapshot(&datastore),
            datastore_before,
            "{what}: the datastore changed"
        );
        assert!(
            snapshot(&tmp).is_empty(),
            "{what}: left {:?} in TMPDIR",
            snapshot(&tmp)
        );
        eprintln!("{what}: refused: {}", run.stderr.trim());
    }
    assert_eq!(
        cluster.ferry_ok(&["vm", "list", "-o", "json"]).json(),
        vms_before,
        "a refused import defined a VM"
    );
}

/// Ctrl-C in the middle of an import (SIGINT to the CLI's process group,
/// as a terminal sends it): the import fails saying so, and leaves nothing —
/// no VM, no file in the datastore (partial or whole), nothing in TMPDIR.
fn interrupted_import_leaves_nothing(cluster: &Cluster, scratch: &Path) {
    use std::os::unix::process::CommandExt;
    let tmp = scratch.join("tmp-interrupt");
    std::fs::create_dir(&tmp).unwrap();
    // 512 MiB of non-zero bytes: long enough to convert and send that the
    // signal lands while the work is under way.
    let image = scratch.join("big.raw");
    std::fs::write(&image, vec![0xa5u8; 512 << 20]).unwrap();
    let datastore = cluster.datastore(HOST, "local");
    let before = snapshot(&datastore);
    let mut child = Command::new(ferry_e2e::bin_dir().join("ferry"))
        .args(["import", s(&image), "--host", HOST, "--name", "interrupted"])
        .args(["--vcpus", "1", "--memory", "256MiB"])
        .env("FERRY_LOCAL_DIR", cluster.dir())
        .env("FERRY_CONFIG", cluster.client_config())
        .env("TMPDIR", &tmp)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("ferry runs");
    // Wait until the work folder holds the converted file, then interrupt.
    let started = std::time::Instant::now();
    loop {
        let busy = snapshot(&tmp).keys().any(|name| name.contains('/'));
        if busy {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the import never started converting"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the import ended before it was interrupted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT to the import's process group");
    let output = child.wait_with_output().expect("the import ends");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "the interrupted import succeeded: {stderr}"
    );
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(
        snapshot(&tmp).is_empty(),
        "left {:?} in TMPDIR",
        snapshot(&tmp)
    );
    assert_eq!(snapshot(&datastore), before, "the datastore changed");
    let missing = cluster.ferry_err(&["vm", "show", "interrupted"]);
    assert!(missing.contains("no VM"), "{missing}");
    std::fs::remove_file(&image).unwrap();
    eprintln!("interrupted import: {}", stderr.trim());
}

#[test]
fn imports_exports_and_hostile_inputs() {
    require_tool("qemu-img", &["--version"], "qemu-utils");
    require_tool("virt-xml-validate", &["--help"], "libvirt-clients");
    require_tool("xmllint", &["--version"], "libxml2-utils");
    require_tool("tar", &["--version"], "tar");
    let guest = ferry_test_support::guest::TestGuest::locate().unwrap_or_else(|e| panic!("{e}"));
    let scratch = tempfile::Builder::new()
        .prefix("ferry-import-e2e-")
        .tempdir()
        .expect("a scratch folder");
    let cluster = Cluster::up(1);
    let spec = cluster.write_spec("src.toml", &src_spec(&guest.disk));
    cluster.ferry_ok(&["vm", "create", "-f", s(&spec), "--host", HOST]);

    let started = std::time::Instant::now();
    hostile_inputs(&cluster, scratch.path());
    eprintln!("hostile inputs: {:.1} s", started.elapsed().as_secs_f64());

    interrupted_import_leaves_nothing(&cluster, scratch.path());

    let started = std::time::Instant::now();
    roundtrips(&cluster, scratch.path(), &guest.disk);
    eprintln!("round trips: {:.1} s", started.elapsed().as_secs_f64());

    // Exporting a running VM is refused: its disks are changing.
    cluster.ferry_ok(&["vm", "start", "src"]);
    let error = cluster.ferry_err(&[
        "export",
        "src",
        "--format",
        "ova",
        "-o",
        s(&scratch.path().join("running.ova")),
    ]);
    assert!(error.contains("stop it first"), "{error}");
    assert!(!scratch.path().join("running.ova").exists());
    cluster.ferry_ok(&["vm", "stop", "src"]);
    cluster.ferry_ok(&["vm", "delete", "src"]);
}
