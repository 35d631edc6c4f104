//! The import pipeline, up to files ready to upload: recognise what the
//! path is, read its description, resolve and inspect every disk file under
//! the hostile-input rules, check the manifest, map to a Ferry spec
//! ([`plan`]); then convert and verify each disk into a private
//! work folder ([`Plan::convert`]). Sending the files to a host and defining
//! the VM is the CLI's part.

use crate::descriptors;
use crate::detect::{self, ImageFormat, ImageInfo, ImagePolicy};
use crate::foreign::{BusKind, ForeignDisk, ForeignVm, Origin};
use crate::mapping::{self, ImportOptions, InspectedDisk};
use crate::ova::Ova;
use crate::paths::{self, Reach};
use crate::qemu_img::{Comparison, ImageFile, QemuImg};
use crate::report::{DiskReport, ImportReport};
use crate::{manifest, xml, ConvertError, Result};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Largest OVF inside an OVA, and largest manifest.
const MAX_OVF_BYTES: u64 = xml::MAX_XML_BYTES as u64;
const MAX_MANIFEST_BYTES: u64 = 1024 * 1024;

/// What the path given to `ferry import` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Ova,
    Ovf,
    Vmx,
    Libvirt,
    Vbox,
    HyperV,
    Image,
}

impl SourceKind {
    pub fn origin(self) -> Origin {
        match self {
            SourceKind::Ova | SourceKind::Ovf => Origin::Ovf,
            SourceKind::Vmx => Origin::Vmx,
            SourceKind::Libvirt => Origin::Libvirt,
            SourceKind::Vbox => Origin::Vbox,
            SourceKind::HyperV => Origin::HyperV,
            SourceKind::Image => Origin::BareImage,
        }
    }
}

/// Recognises `path` by its bytes (a tar header, an XML root element, VMX
/// keys), never by its name alone.
pub fn recognise(path: &Path) -> Result<SourceKind> {
    let metadata = std::fs::metadata(path).map_err(|e| ConvertError::io("cannot read", path, e))?;
    if !metadata.is_file() {
        return Err(ConvertError::invalid(format!(
            "{} is not a regular file: give the .ova, .ovf, .vmx, .vbox, domain .xml or disk image itself",
            path.display()
        )));
    }
    let mut head = vec![0u8; 4096];
    let mut file =
        std::fs::File::open(path).map_err(|e| ConvertError::io("cannot open", path, e))?;
    let n =
        read_full(&mut file, &mut head).map_err(|e| ConvertError::io("cannot read", path, e))?;
    head.truncate(n);
    if head.len() >= 262 && &head[257..262] == b"ustar" {
        return Ok(SourceKind::Ova);
    }
    // Disk images first: a VDI starts with "<<< Oracle VM VirtualBox Disk
    // Image >>>", which is not XML.
    if looks_like_image(&head) {
        return Ok(SourceKind::Image);
    }
    if head.starts_with(&[0xff, 0xfe]) || head.starts_with(&[0xfe, 0xff]) {
        // UTF-16 text (Hyper-V's configuration files): only XML is.
        return xml_kind(path);
    }
    let text = String::from_utf8_lossy(&head);
    let trimmed = text.trim_start_matches('\u{feff}').trim_start();
    if trimmed.starts_with('<') {
        return xml_kind(path);
    }
    if trimmed.starts_with("# Disk DescriptorFile") {
        return Ok(SourceKind::Image);
    }
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if extension == "vmx" || looks_like_vmx(trimmed) {
        return Ok(SourceKind::Vmx);
    }
    if extension == "ova" {
        return Err(ConvertError::invalid(format!(
            "{} is named .ova but is not a tar archive",
            path.display()
        )));
    }
    Ok(SourceKind::Image)
}

/// Whether `head` starts like one of the disk image formats (or a format
/// `detect` refuses by name): such a file goes to `detect`, never to a
/// descriptor reader.
fn looks_like_image(head: &[u8]) -> bool {
    const MAGICS: [&[u8]; 7] = [
        b"QFI\xfb",
        b"KDMV",
        b"vhdxfile",
        b"conectix",
        b"QED\0",
        b"LUKS\xba\xbe",
        b"# Disk DescriptorFile",
    ];
    MAGICS.iter().any(|magic| head.starts_with(magic))
        || head.get(0x40..0x44) == Some(&0xbeda_107fu32.to_le_bytes()[..])
        || head.starts_with(b"<<< ")
}

fn looks_like_vmx(text: &str) -> bool {
    text.lines().take(40).any(|l| {
        let l = l.trim().to_ascii_lowercase();
        l.starts_with("config.version")
            || l.starts_with("virtualhw.version")
            || l.starts_with(".encoding")
    })
}

fn xml_kind(path: &Path) -> Result<SourceKind> {
    let text = xml::read_text(path)?;
    let what = path.display().to_string();
    let document = xml::parse(&text, &what)?;
    match document.root_element().tag_name().name() {
        "Envelope" => Ok(SourceKind::Ovf),
        "domain" => Ok(SourceKind::Libvirt),
        "VirtualBox" => Ok(SourceKind::Vbox),
        "configuration" => Ok(SourceKind::HyperV),
        other => Err(ConvertError::invalid(format!(
            "{what} is XML with root element <{other}>; Ferry imports OVF (<Envelope>), libvirt (<domain>), VirtualBox (<VirtualBox>) and Hyper-V (<configuration>)"
        ))),
    }
}

fn read_full(reader: &mut impl Read, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Where a disk's bytes are.
#[derive(Debug, Clone)]
pub enum DiskInput {
    /// A file on disk (with the other files it reads, VMDK extents).
    File(PathBuf),
    /// A member of the OVA.
    Member(String),
}

/// An import, planned and checked, not yet converted.
#[derive(Debug)]
pub struct Plan {
    pub kind: SourceKind,
    pub report: ImportReport,
    /// Per disk of `report.spec`, in order.
    pub inputs: Vec<DiskInput>,
    ova: Option<Ova>,
}

/// Reads, resolves, inspects and maps `path`. Writes nothing.
pub fn plan(path: &Path, options: &ImportOptions, policy: &ImagePolicy) -> Result<Plan> {
    let kind = recognise(path)?;
    let folder = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let what = path.display().to_string();
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("imported")
        .to_string();
    let mut checks = Vec::new();
    let mut ova = None;
    let (foreign, inspected, inputs) = match kind {
        SourceKind::Ova => {
            let archive = Ova::open(path)?;
            let ovf_member = archive.ovf()?.clone();
            let text = String::from_utf8(archive.read_small(&ovf_member, MAX_OVF_BYTES)?).map_err(
                |_| ConvertError::invalid(format!("{what}:{} is not UTF-8 text", ovf_member.name)),
            )?;
            if let Some(mf) = archive.manifest() {
                let mf_name = mf.name.clone();
                let mf_text = String::from_utf8(archive.read_small(mf, MAX_MANIFEST_BYTES)?)
                    .map_err(|_| {
                        ConvertError::invalid(format!("{what}:{mf_name} is not UTF-8 text"))
                    })?;
                let entries = manifest::parse(&mf_text, &mf_name)?;
                manifest::verify(&entries, &mf_name, |name| {
                    let member = archive.member(name).ok_or_else(|| {
                        ConvertError::refused(format!(
                            "manifest {mf_name} lists {name:?}, which the archive does not hold"
                        ))
                    })?;
                    Ok(Box::new(archive.open_member(member)?) as Box<dyn Read>)
                })?;
                checks.push(format!(
                    "manifest {mf_name}: {} digests match",
                    entries.len()
                ));
            } else {
                checks.push("no manifest in the archive: digests not checked".into());
            }
            let foreign = descriptors::ovf::parse(&text, &format!("{what}:{}", ovf_member.name))?;
            let mut inspected = Vec::new();
            let mut inputs = Vec::new();
            for disk in &foreign.disks {
                let name = disk.file.strip_prefix("./").unwrap_or(&disk.file);
                let member = archive.member(name).ok_or_else(|| {
                    ConvertError::refused(format!(
                        "the OVF refers to {:?}, which is not a plain member of the archive",
                        disk.file
                    ))
                })?;
                let file = std::fs::File::open(path)
                    .map_err(|e| ConvertError::io("cannot open", path, e))?;
                let shown = format!("{what}:{}", member.name);
                let image =
                    detect::inspect_slice(&file, member.offset, member.size, &shown, policy)?;
                check_claim(&image, disk, &shown)?;
                inspected.push(InspectedDisk {
                    disk: disk.clone(),
                    shown_as: shown,
                    image,
                });
                inputs.push(DiskInput::Member(member.name.clone()));
            }
            ova = Some(archive);
            (foreign, inspected, inputs)
        }
        SourceKind::Image => {
            let image = detect::inspect(path, policy)?;
            if let Some(claim) = ImageFormat::from_extension(path) {
                detect::check_claim(&image, claim, &what)?;
            }
            let disk = ForeignDisk {
                label: path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                file: what.clone(),
                controller: String::new(),
                bus: BusKind::Virtio,
                boot_order: Some(1),
                read_only: false,
                format_claim: None,
                capacity_claim: None,
            };
            let foreign = ForeignVm {
                disks: vec![disk.clone()],
                ..ForeignVm::default()
            };
            let canonical = std::fs::canonicalize(path)
                .map_err(|e| ConvertError::io("cannot resolve", path, e))?;
            (
                foreign,
                vec![InspectedDisk {
                    disk,
                    shown_as: what.clone(),
                    image,
                }],
                vec![DiskInput::File(canonical)],
            )
        }
        _ => {
            let text = if kind == SourceKind::Vmx {
                read_vmx_text(path)?
            } else {
                xml::read_text(path)?
            };
            let foreign = match kind {
                SourceKind::Ovf => descriptors::ovf::parse(&text, &what)?,
                SourceKind::Vmx => descriptors::vmx::parse(&text, &what)?,
                SourceKind::Libvirt => descriptors::libvirt::parse(&text, &what)?,
                SourceKind::Vbox => descriptors::vbox::parse(&text, &what)?,
                SourceKind::HyperV => descriptors::hyperv::parse(&text, &what)?,
                SourceKind::Ova | SourceKind::Image => unreachable!("handled above"),
            };
            if kind == SourceKind::Ovf {
                checks.extend(check_folder_manifest(path, &folder)?);
            }
            let reach = if kind == SourceKind::Libvirt {
                Reach::AnyRegularFile
            } else {
                Reach::InsideFolder
            };
            let mut inspected = Vec::new();
            let mut inputs = Vec::new();
            for disk in &foreign.disks {
                let reference = if kind == SourceKind::HyperV {
                    descriptors::hyperv::file_name_of(&disk.file).to_string()
                } else {
                    disk.file.clone()
                };
                let file = paths::resolve(&folder, &reference, reach, &what)?;
                let shown = file.display().to_string();
                let image = detect::inspect(&file, policy)?;
                check_claim(&image, disk, &shown)?;
                inspected.push(InspectedDisk {
                    disk: disk.clone(),
                    shown_as: shown,
                    image,
                });
                inputs.push(DiskInput::File(file));
            }
            (foreign, inspected, inputs)
        }
    };
    checks.push(format!(
        "{} disk image(s) inspected by Ferry: format from the bytes, no backing files or external data, extents inside the import folder, virtual size within {}",
        inspected.len(),
        ferry_core::units::format_size_human(policy.max_virtual_size)
    ));
    let mapped = mapping::map(&foreign, kind.origin(), &inspected, options, &stem)?;
    let disks = mapped
        .spec
        .disks
        .iter()
        .zip(&inspected)
        .map(|(spec_disk, source)| DiskReport {
            id: spec_disk.id.clone(),
            source: source.shown_as.clone(),
            image: source.image.clone(),
            target_file: match &spec_disk.source {
                ferry_core::spec::DiskSource::Datastore { file, .. } => file.clone(),
                ferry_core::spec::DiskSource::Path { path } => path.display().to_string(),
            },
            target_format: spec_disk.format.as_str().to_string(),
            verified: None,
            convert_ms: None,
            verify_ms: None,
        })
        .collect();
    let report = ImportReport {
        source: what,
        origin: kind.origin(),
        dry_run: true,
        vm: mapped.spec.name.clone(),
        host: None,
        datastore: options.datastore.clone(),
        mappings: mapped.mappings,
        disks,
        checks,
        warnings: mapped.warnings,
        spec: mapped.spec,
    };
    Ok(Plan {
        kind,
        report,
        inputs,
        ova,
    })
}

fn read_vmx_text(path: &Path) -> Result<String> {
    const MAX_VMX_BYTES: u64 = 1024 * 1024;
    let length = std::fs::metadata(path)
        .map_err(|e| ConvertError::io("cannot read", path, e))?
        .len();
    if length > MAX_VMX_BYTES {
        return Err(ConvertError::refused(format!(
            "{} is {length} bytes, more than the {MAX_VMX_BYTES} accepted for a .vmx",
            path.display()
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| ConvertError::io("cannot read", path, e))?;
    String::from_utf8(bytes)
        .map_err(|_| ConvertError::invalid(format!("{} is not UTF-8 text", path.display())))
}

/// The descriptor's claims about a disk, checked against its bytes.
fn check_claim(image: &ImageInfo, disk: &ForeignDisk, shown: &str) -> Result<()> {
    if let Some(claim) = disk.format_claim.as_deref() {
        match ImageFormat::from_claim(claim) {
            Some(format) => detect::check_claim(image, format, shown)?,
            None => {
                return Err(ConvertError::invalid(format!(
                "{shown}: the descriptor says its format is {claim:?}, which Ferry does not import"
            )))
            }
        }
    }
    Ok(())
}

/// An OVF next to its files: the `.mf` of the same stem, when present.
fn check_folder_manifest(ovf: &Path, folder: &Path) -> Result<Vec<String>> {
    let mf = ovf.with_extension("mf");
    if !mf.exists() {
        return Ok(vec![
            "no manifest next to the OVF: digests not checked".into()
        ]);
    }
    let mf_name = mf.display().to_string();
    let text = {
        let length = std::fs::metadata(&mf)
            .map_err(|e| ConvertError::io("cannot read", &mf, e))?
            .len();
        if length > MAX_MANIFEST_BYTES {
            return Err(ConvertError::refused(format!(
                "{mf_name} is too large for a manifest"
            )));
        }
        std::fs::read_to_string(&mf).map_err(|e| ConvertError::io("cannot read", &mf, e))?
    };
    let entries = manifest::parse(&text, &mf_name)?;
    manifest::verify(&entries, &mf_name, |name| {
        let file = paths::resolve(folder, name, Reach::InsideFolder, &mf_name)?;
        let opened =
            std::fs::File::open(&file).map_err(|e| ConvertError::io("cannot open", &file, e))?;
        Ok(Box::new(opened) as Box<dyn Read>)
    })?;
    Ok(vec![format!(
        "manifest {mf_name}: {} digests match",
        entries.len()
    )])
}

/// A converted disk, ready to send.
#[derive(Debug, Clone)]
pub struct ConvertedDisk {
    pub id: String,
    pub path: PathBuf,
}

/// Progress of the conversion, for the CLI's bar.
pub trait ConvertProgress {
    /// A disk starts: its id and virtual size.
    fn disk(&mut self, id: &str, virtual_size: u64);
    /// Fraction of the current disk converted.
    fn converted(&mut self, fraction: f64);
    /// The current disk is being verified.
    fn verifying(&mut self);
}

impl Plan {
    /// Converts and verifies every disk into `work`, a private folder the
    /// caller made and removes (OVA members are read in place). Fills the report's
    /// per-disk results.
    pub fn convert(
        &mut self,
        work: &Path,
        policy: &ImagePolicy,
        qemu_img: &QemuImg,
        progress: &mut dyn ConvertProgress,
    ) -> Result<Vec<ConvertedDisk>> {
        let mut converted = Vec::new();
        for (index, input) in self.inputs.clone().iter().enumerate() {
            let (id, target_file, target_format) = {
                let d = &self.report.disks[index];
                (d.id.clone(), d.target_file.clone(), d.target_format.clone())
            };
            // Inspect again what qemu-img will open: the bytes on disk now,
            // not the ones seen while planning. An OVA member is read in
            // place (qemu's raw driver limited to the member's bytes), never
            // extracted: nothing of the archive is written anywhere.
            let (path, slice, image) = match input {
                DiskInput::File(path) => (path.clone(), None, detect::inspect(path, policy)?),
                DiskInput::Member(name) => {
                    let ova = self.ova.as_ref().expect("members come from an OVA");
                    let member = ova.member(name).expect("planned members exist");
                    let file = std::fs::File::open(&ova.path)
                        .map_err(|e| ConvertError::io("cannot open", &ova.path, e))?;
                    let shown = format!("{}:{name}", ova.path.display());
                    let image =
                        detect::inspect_slice(&file, member.offset, member.size, &shown, policy)?;
                    (ova.path.clone(), Some((member.offset, member.size)), image)
                }
            };
            let shown = self.report.disks[index].source.clone();
            if image.format != self.report.disks[index].image.format
                || image.virtual_size != self.report.disks[index].image.virtual_size
            {
                return Err(ConvertError::refused(format!(
                    "{shown} changed while it was being imported"
                )));
            }
            let driver = image.format.qemu_driver();
            let source = match slice {
                Some((offset, length)) => ImageFile::slice(&path, driver, offset, length),
                None => ImageFile::new(&path, driver),
            };
            let output = work.join(&target_file);
            progress.disk(&id, image.virtual_size);
            let started = std::time::Instant::now();
            qemu_img.convert(
                source,
                ImageFile::new(&output, &target_format),
                None,
                image.virtual_size,
                |fraction| progress.converted(fraction),
            )?;
            let convert_ms = started.elapsed().as_millis() as u64;
            progress.verifying();
            let started = std::time::Instant::now();
            let comparison = qemu_img.compare(
                source,
                ImageFile::new(&output, &target_format),
                image.virtual_size,
            )?;
            let verify_ms = started.elapsed().as_millis() as u64;
            let report = &mut self.report.disks[index];
            report.convert_ms = Some(convert_ms);
            report.verify_ms = Some(verify_ms);
            report.verified = Some(comparison == Comparison::Identical);
            if let Comparison::Differ(detail) = comparison {
                return Err(ConvertError::QemuImg {
                    action: format!("verification of disk {id}"),
                    detail: format!("the converted image differs from {shown}: {detail}"),
                });
            }
            converted.push(ConvertedDisk { id, path: output });
        }
        Ok(converted)
    }
}
