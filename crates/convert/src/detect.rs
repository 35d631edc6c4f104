//! Image format detection from the bytes, in our own code, before qemu-img
//! ever sees a file (DESIGN.md: hostile input).
//!
//! Every known signature is checked; a file that matches two formats is
//! refused, and so is one that matches none of the formats Ferry imports but
//! one it recognises (QED, LUKS, DMG, ...). For the formats Ferry imports the
//! headers are read with bounded reads only, and anything that would make
//! qemu open another file (backing files, external data files, parent
//! disks, VMDK extents outside the import folder) is refused, as are virtual
//! sizes over the policy's cap.

use crate::paths::{self, Reach};
use crate::{ConvertError, Result};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The disk image formats Ferry imports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Raw,
    Qcow2,
    Vmdk,
    Vhd,
    Vhdx,
    Vdi,
}

impl ImageFormat {
    /// The qemu block driver name (`-f`).
    pub fn qemu_driver(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vmdk => "vmdk",
            ImageFormat::Vhd => "vpc",
            ImageFormat::Vhdx => "vhdx",
            ImageFormat::Vdi => "vdi",
        }
    }

    /// The name users know the format by.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vmdk => "vmdk",
            ImageFormat::Vhd => "vhd",
            ImageFormat::Vhdx => "vhdx",
            ImageFormat::Vdi => "vdi",
        }
    }

    /// A format named in a descriptor or on the command line.
    pub fn from_claim(word: &str) -> Option<ImageFormat> {
        match word.trim().to_ascii_lowercase().as_str() {
            "raw" => Some(ImageFormat::Raw),
            "qcow2" => Some(ImageFormat::Qcow2),
            "vmdk" => Some(ImageFormat::Vmdk),
            "vhd" | "vpc" => Some(ImageFormat::Vhd),
            "vhdx" => Some(ImageFormat::Vhdx),
            "vdi" => Some(ImageFormat::Vdi),
            _ => None,
        }
    }

    /// The format a file name's extension claims. `.img` and `.bin` claim
    /// nothing (cloud `.img` files are often qcow2).
    pub fn from_extension(path: &Path) -> Option<ImageFormat> {
        let extension = path.extension()?.to_str()?;
        match extension.to_ascii_lowercase().as_str() {
            "raw" => Some(ImageFormat::Raw),
            "qcow2" => Some(ImageFormat::Qcow2),
            "vmdk" => Some(ImageFormat::Vmdk),
            "vhd" => Some(ImageFormat::Vhd),
            "vhdx" => Some(ImageFormat::Vhdx),
            "vdi" => Some(ImageFormat::Vdi),
            _ => None,
        }
    }
}

/// Limits applied to every inspected image.
#[derive(Debug, Clone)]
pub struct ImagePolicy {
    /// Largest virtual size accepted, in bytes (`--max-disk-size`).
    pub max_virtual_size: u64,
}

impl Default for ImagePolicy {
    fn default() -> Self {
        ImagePolicy {
            max_virtual_size: 4 << 40,
        }
    }
}

/// What [`inspect`] found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImageInfo {
    pub format: ImageFormat,
    /// Sub-format: "streamOptimized", "monolithicSparse", "monolithicFlat",
    /// "twoGbMaxExtentSparse", "dynamic", "fixed", "v2", "v3", "" for raw.
    pub variant: String,
    /// Bytes the guest sees.
    pub virtual_size: u64,
    /// Bytes of the inspected file (or archive member).
    pub file_size: u64,
    /// Other files the image reads (VMDK descriptor extents), each checked.
    pub extents: Vec<PathBuf>,
}

/// Largest VMDK descriptor read (text descriptor file or embedded).
const MAX_DESCRIPTOR: u64 = 64 * 1024;
/// Longest backing or data file name read from a qcow2 header.
const MAX_NAME: u64 = 1023;

/// Inspects the image file at `path`. Extents named by a VMDK descriptor are
/// resolved inside `path`'s folder and inspected too.
pub fn inspect(path: &Path, policy: &ImagePolicy) -> Result<ImageInfo> {
    let file = open_regular(path)?;
    let len = file
        .metadata()
        .map_err(|e| ConvertError::io("cannot read", path, e))?
        .len();
    let name = path.display().to_string();
    let folder = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let source = Source {
        file: &file,
        base: 0,
        len,
        name: &name,
        own_path: Some(path),
    };
    inspect_source(&source, Some(&folder), policy)
}

/// Inspects `len` bytes at `offset` of `file` (an archive member called
/// `name`). A VMDK descriptor that needs other extent files is refused.
pub fn inspect_slice(
    file: &File,
    offset: u64,
    len: u64,
    name: &str,
    policy: &ImagePolicy,
) -> Result<ImageInfo> {
    let file_len = file
        .metadata()
        .map_err(|e| ConvertError::io("cannot read", Path::new(name), e))?
        .len();
    if offset.checked_add(len).is_none_or(|end| end > file_len) {
        return Err(ConvertError::refused(format!(
            "{name} is truncated: it should span {len} bytes from byte {offset} of its archive, \
             which has only {file_len} bytes"
        )));
    }
    let source = Source {
        file,
        base: offset,
        len,
        name,
        own_path: None,
    };
    inspect_source(&source, None, policy)
}

/// Refuses an image whose bytes are not the format it was said to be.
pub fn check_claim(info: &ImageInfo, claimed: ImageFormat, what: &str) -> Result<()> {
    if info.format == claimed {
        return Ok(());
    }
    let actual = match info.format {
        ImageFormat::Raw => "raw data (no image format Ferry knows)".to_string(),
        other => format!("a {} image", other.name()),
    };
    Err(ConvertError::refused(format!(
        "{what} claims {} but its bytes are {actual}; fix the claim or convert the file first",
        claimed.name()
    )))
}

/// Opens a regular file without blocking on a FIFO, then refuses anything
/// that is not a regular file.
fn open_regular(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| ConvertError::io("cannot open", path, e))?;
    let metadata = file
        .metadata()
        .map_err(|e| ConvertError::io("cannot read", path, e))?;
    if !metadata.file_type().is_file() {
        return Err(ConvertError::refused(format!(
            "{} is not a regular file (a device, folder, FIFO or socket)",
            path.display()
        )));
    }
    Ok(file)
}

/// A window of a file: the whole file, or a member of an archive.
struct Source<'a> {
    file: &'a File,
    base: u64,
    len: u64,
    name: &'a str,
    /// The file's own path when it is a whole file (not a slice).
    own_path: Option<&'a Path>,
}

impl Source<'_> {
    /// Reads exactly `n` bytes at `pos`; refuses as truncated when they are
    /// not all inside the window. `what` names the structure read.
    fn read(&self, pos: u64, n: u64, what: &str) -> Result<Vec<u8>> {
        if pos.checked_add(n).is_none_or(|end| end > self.len) {
            return Err(self.truncated(what, pos, n));
        }
        let mut buffer = vec![0u8; n as usize];
        match self.file.read_exact_at(&mut buffer, self.base + pos) {
            Ok(()) => Ok(buffer),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(self.truncated(what, pos, n))
            }
            Err(e) => Err(ConvertError::io("cannot read", Path::new(self.name), e)),
        }
    }

    /// Like [`Source::read`] but `None` when out of the window (probing).
    fn peek(&self, pos: u64, n: u64) -> Result<Option<Vec<u8>>> {
        if pos.checked_add(n).is_none_or(|end| end > self.len) {
            return Ok(None);
        }
        self.read(pos, n, "signature").map(Some)
    }

    fn truncated(&self, what: &str, pos: u64, n: u64) -> ConvertError {
        ConvertError::refused(format!(
            "{} is truncated or damaged: its {what} (bytes {pos}..{}) lies past the end of the \
             file, which has {} bytes",
            self.name,
            pos.saturating_add(n),
            self.len
        ))
    }

    fn refuse(&self, why: impl std::fmt::Display) -> ConvertError {
        ConvertError::refused(format!("{} {why}", self.name))
    }
}

/// Every signature looked for. The first six are formats Ferry imports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signature {
    Qcow2,
    VmdkSparse,
    VmdkDescriptor,
    Vhd,
    Vhdx,
    Vdi,
    Qcow1,
    Qed,
    Luks,
    VmdkCowd,
    Dmg,
    Parallels,
    Bochs,
    Cloop,
}

impl Signature {
    fn label(self) -> &'static str {
        match self {
            Signature::Qcow2 => "qcow2",
            Signature::VmdkSparse => "VMDK (sparse)",
            Signature::VmdkDescriptor => "VMDK descriptor",
            Signature::Vhd => "VHD",
            Signature::Vhdx => "VHDX",
            Signature::Vdi => "VDI",
            Signature::Qcow1 => "qcow (version 1)",
            Signature::Qed => "QED",
            Signature::Luks => "LUKS (encrypted)",
            Signature::VmdkCowd => "VMDK ESX sparse (COWD)",
            Signature::Dmg => "Apple DMG",
            Signature::Parallels => "Parallels",
            Signature::Bochs => "Bochs",
            Signature::Cloop => "cloop",
        }
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}
fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn signatures(source: &Source) -> Result<Vec<Signature>> {
    let mut found = Vec::new();
    let head: Vec<u8> = source.peek(0, 512.min(source.len))?.unwrap_or_default();
    let starts = |magic: &[u8]| head.starts_with(magic);
    if starts(b"QFI\xfb") {
        // qcow version 1 shares the magic; the version says which.
        if head.len() >= 8 && be32(&head, 4) == 1 {
            found.push(Signature::Qcow1);
        } else {
            found.push(Signature::Qcow2);
        }
    }
    if starts(b"KDMV") {
        found.push(Signature::VmdkSparse);
    }
    if starts(b"COWD") {
        found.push(Signature::VmdkCowd);
    }
    if is_descriptor_text(&head) {
        found.push(Signature::VmdkDescriptor);
    }
    let tail = if source.len >= 512 {
        source.peek(source.len - 512, 512)?
    } else {
        None
    };
    if starts(b"conectix") || tail.as_deref().is_some_and(|t| t.starts_with(b"conectix")) {
        found.push(Signature::Vhd);
    }
    if starts(b"vhdxfile") {
        found.push(Signature::Vhdx);
    }
    if head.len() >= 0x44 && le32(&head, 0x40) == 0xBEDA_107F {
        found.push(Signature::Vdi);
    }
    if starts(b"QED\0") {
        found.push(Signature::Qed);
    }
    if starts(b"LUKS\xba\xbe") {
        found.push(Signature::Luks);
    }
    if tail.as_deref().is_some_and(|t| t.starts_with(b"koly")) {
        found.push(Signature::Dmg);
    }
    if starts(b"WithoutFreeSpace") || starts(b"WithouFreSpacExt") {
        found.push(Signature::Parallels);
    }
    if starts(b"Bochs Virtual HD Image") {
        found.push(Signature::Bochs);
    }
    if starts(b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop") {
        found.push(Signature::Cloop);
    }
    Ok(found)
}

/// Whether the first bytes are a VMDK text descriptor.
fn is_descriptor_text(head: &[u8]) -> bool {
    let mut text = head;
    if let Some(rest) = text.strip_prefix(b"\xef\xbb\xbf") {
        text = rest;
    }
    while let Some((first, rest)) = text.split_first() {
        if first.is_ascii_whitespace() {
            text = rest;
        } else {
            break;
        }
    }
    text.starts_with(b"# Disk DescriptorFile")
}

fn inspect_source(
    source: &Source,
    folder: Option<&Path>,
    policy: &ImagePolicy,
) -> Result<ImageInfo> {
    let found = signatures(source)?;
    if found.len() > 1 {
        let labels: Vec<&str> = found.iter().map(|s| s.label()).collect();
        return Err(source.refuse(format_args!(
            "looks like two formats at once ({}); a file that is read differently by different \
             tools is not imported",
            labels.join(" and ")
        )));
    }
    let mut info = match found.first() {
        None => {
            if source.len == 0 {
                return Err(source.refuse("is empty; a disk image needs at least one byte"));
            }
            ImageInfo {
                format: ImageFormat::Raw,
                variant: String::new(),
                virtual_size: source.len,
                file_size: source.len,
                extents: Vec::new(),
            }
        }
        Some(Signature::Qcow2) => qcow2(source)?,
        Some(Signature::VmdkSparse) => vmdk_sparse_file(source)?,
        Some(Signature::VmdkDescriptor) => vmdk_descriptor_file(source, folder)?,
        Some(Signature::Vhd) => vhd(source)?,
        Some(Signature::Vhdx) => vhdx(source)?,
        Some(Signature::Vdi) => vdi(source)?,
        Some(other) => {
            return Err(source.refuse(format_args!(
                "is a {} image, a format Ferry does not import; convert it to qcow2 or raw first",
                other.label()
            )))
        }
    };
    info.file_size = source.len;
    if info.virtual_size == 0 {
        return Err(source.refuse(format_args!(
            "is a {} image with a virtual size of 0 bytes",
            info.format.name()
        )));
    }
    if info.virtual_size > policy.max_virtual_size {
        return Err(source.refuse(format_args!(
            "claims a virtual size of {}, more than the {} allowed (--max-disk-size)",
            human_size(info.virtual_size),
            human_size(policy.max_virtual_size)
        )));
    }
    Ok(info)
}

/// "1 PiB", "64 MiB", "1.5 GiB", or bytes.
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} bytes");
    }
    let mut unit = 0;
    let mut scale: u64 = 1024;
    while unit + 1 < UNITS.len() && bytes / scale >= 1024 {
        scale *= 1024;
        unit += 1;
    }
    if bytes.is_multiple_of(scale) {
        format!("{} {}", bytes / scale, UNITS[unit])
    } else {
        format!(
            "{:.1} {} ({bytes} bytes)",
            bytes as f64 / scale as f64,
            UNITS[unit]
        )
    }
}

/// A name read from an image, shown safely.
fn shown_name(bytes: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(bytes))
}

// ---------------------------------------------------------------- qcow2

fn qcow2(source: &Source) -> Result<ImageInfo> {
    let header = source.read(0, 72, "qcow2 header")?;
    let version = be32(&header, 4);
    if version != 2 && version != 3 {
        return Err(source.refuse(format_args!(
            "is a qcow2 image of version {version}; Ferry imports versions 2 and 3"
        )));
    }
    let backing_offset = be64(&header, 8);
    let backing_size = be32(&header, 16) as u64;
    let cluster_bits = be32(&header, 20);
    let size = be64(&header, 24);
    let crypt_method = be32(&header, 32);
    let l1_size = be32(&header, 36) as u64;
    let l1_offset = be64(&header, 40);
    let refcount_offset = be64(&header, 48);
    let refcount_clusters = be32(&header, 56) as u64;

    if backing_offset != 0 {
        let shown = if backing_size == 0 {
            "(an empty name)".to_string()
        } else {
            match source.read(
                backing_offset,
                backing_size.min(MAX_NAME),
                "backing file name",
            ) {
                Ok(name) => shown_name(&name),
                Err(_) => "(its name lies past the end of the file)".to_string(),
            }
        };
        return Err(source.refuse(format_args!(
            "is a qcow2 image with a backing file {shown}; Ferry imports only self-contained \
             images (flatten it with `qemu-img convert -O qcow2` first)"
        )));
    }
    if crypt_method != 0 {
        return Err(source.refuse(
            "is an encrypted qcow2 image; decrypt it with `qemu-img convert` before importing",
        ));
    }
    if !(9..=21).contains(&cluster_bits) {
        return Err(ConvertError::invalid(format!(
            "{} is a damaged qcow2 image: cluster size 2^{cluster_bits} is not between 512 bytes \
             and 2 MiB",
            source.name
        )));
    }
    let cluster_size = 1u64 << cluster_bits;

    let mut header_length = 72u64;
    if version == 3 {
        let v3 = source.read(0, 104, "qcow2 version 3 header")?;
        let incompatible = be64(&v3, 72);
        header_length = be32(&v3, 100) as u64;
        if header_length < 104 || header_length > cluster_size {
            return Err(ConvertError::invalid(format!(
                "{} is a damaged qcow2 image: header length {header_length} is impossible",
                source.name
            )));
        }
        source.read(0, header_length, "qcow2 header")?;
        if incompatible & (1 << 2) != 0 {
            let name = qcow2_data_file_name(source, header_length, cluster_size)?;
            return Err(source.refuse(format_args!(
                "is a qcow2 image whose data lives in an external data file{}; Ferry imports \
                 only self-contained images",
                name.map(|n| format!(" {n}")).unwrap_or_default()
            )));
        }
        if incompatible & (1 << 1) != 0 {
            return Err(source.refuse(
                "is a qcow2 image marked corrupt; repair it with `qemu-img check -r all` first",
            ));
        }
        let known = (1 << 0) | (1 << 3) | (1 << 4);
        let unknown = incompatible & !known & !(1 << 1) & !(1 << 2);
        if unknown != 0 {
            return Err(source.refuse(format_args!(
                "is a qcow2 image using features Ferry does not know (incompatible feature bits \
                 {unknown:#x})"
            )));
        }
    }
    // Header extensions: refuse an external data file even when the feature
    // bit is clear.
    if let Some(name) = qcow2_data_file_name(source, header_length, cluster_size)? {
        return Err(source.refuse(format_args!(
            "is a qcow2 image naming an external data file {name}; Ferry imports only \
             self-contained images"
        )));
    }
    // Tables qemu reads on open must be inside the file.
    source.read_range_check(l1_offset, l1_size.saturating_mul(8), "qcow2 L1 table")?;
    source.read_range_check(
        refcount_offset,
        refcount_clusters.saturating_mul(cluster_size),
        "qcow2 refcount table",
    )?;
    Ok(ImageInfo {
        format: ImageFormat::Qcow2,
        variant: format!("v{version}"),
        virtual_size: size,
        file_size: source.len,
        extents: Vec::new(),
    })
}

impl Source<'_> {
    /// Refuses as truncated when `pos..pos+n` is not inside the window,
    /// without reading it.
    fn read_range_check(&self, pos: u64, n: u64, what: &str) -> Result<()> {
        if pos.checked_add(n).is_none_or(|end| end > self.len) {
            return Err(self.truncated(what, pos, n));
        }
        Ok(())
    }
}

/// The external data file header extension's name, if present (shown).
fn qcow2_data_file_name(
    source: &Source,
    header_length: u64,
    cluster_size: u64,
) -> Result<Option<String>> {
    let end = cluster_size.min(source.len);
    if header_length >= end {
        return Ok(None);
    }
    let area = source.read(
        header_length,
        end - header_length,
        "qcow2 header extensions",
    )?;
    let mut at = 0usize;
    while at + 8 <= area.len() {
        let kind = be32(&area, at);
        let length = be32(&area, at + 4) as usize;
        if kind == 0 {
            break;
        }
        let data = at + 8;
        if data + length > area.len() {
            return Err(ConvertError::invalid(format!(
                "{} is a damaged qcow2 image: a header extension runs past its first cluster",
                source.name
            )));
        }
        if kind == 0x4441_5441 {
            let name = &area[data..data + length.min(MAX_NAME as usize)];
            return Ok(Some(shown_name(name)));
        }
        at = data + length.div_ceil(8) * 8;
    }
    Ok(None)
}

// ---------------------------------------------------------------- VMDK

/// What a KDMV header says.
struct SparseHeader {
    capacity_sectors: u64,
    compressed: bool,
    descriptor: Option<String>,
}

fn sparse_header(source: &Source) -> Result<SparseHeader> {
    let mut header = source.read(0, 512, "VMDK sparse header")?;
    let version = le32(&header, 4);
    if !(1..=3).contains(&version) {
        return Err(source.refuse(format_args!(
            "is a VMDK sparse extent of version {version}; Ferry imports versions 1 to 3"
        )));
    }
    let descriptor_offset = le64(&header, 28);
    let descriptor_size = le64(&header, 36);
    let gd_offset = le64(&header, 56);
    if gd_offset == u64::MAX {
        // streamOptimized with the grain directory at the end: qemu takes the
        // whole header from the footer, so we read the footer too.
        if source.len < 1536 {
            return Err(source.truncated("VMDK footer", 0, 1536));
        }
        let footer = source.read(source.len - 1536, 1536, "VMDK footer")?;
        let valid = le32(&footer, 8) == 0
            && le32(&footer, 12) == 3
            && &footer[512..516] == b"KDMV"
            && le64(&footer, 1024) == 0
            && le32(&footer, 1032) == 0
            && le32(&footer, 1036) == 0;
        if !valid {
            return Err(source.refuse(
                "is a streamOptimized VMDK whose footer is missing or damaged (truncated?)",
            ));
        }
        header = footer[512..1024].to_vec();
    }
    let flags = le32(&header, 8);
    let capacity_sectors = le64(&header, 12);
    let compressed = flags & (1 << 16) != 0;
    if compressed && le16(&header, 77) != 1 {
        return Err(source.refuse(format_args!(
            "is a VMDK with compression algorithm {}; only deflate is supported",
            le16(&header, 77)
        )));
    }
    let descriptor = if descriptor_offset != 0 && descriptor_size != 0 {
        let bytes = descriptor_size
            .checked_mul(512)
            .filter(|b| *b <= MAX_DESCRIPTOR)
            .ok_or_else(|| {
                source.refuse(format_args!(
                    "has an embedded VMDK descriptor of {descriptor_size} sectors, more than the \
                     {MAX_DESCRIPTOR} bytes allowed"
                ))
            })?;
        let position = descriptor_offset
            .checked_mul(512)
            .ok_or_else(|| source.truncated("embedded VMDK descriptor", u64::MAX, bytes))?;
        let raw = source.read(position, bytes, "embedded VMDK descriptor")?;
        Some(descriptor_text(source, &raw)?)
    } else {
        None
    };
    if capacity_sectors == 0 && descriptor.is_some() {
        // qemu would then open the embedded descriptor's extents as files.
        return Err(source.refuse(
            "is a VMDK sparse extent with capacity 0 and an embedded descriptor, which would make \
             qemu open the files that descriptor names",
        ));
    }
    Ok(SparseHeader {
        capacity_sectors,
        compressed,
        descriptor,
    })
}

fn descriptor_text(source: &Source, raw: &[u8]) -> Result<String> {
    let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
    let text = std::str::from_utf8(&raw[..end]).map_err(|_| {
        ConvertError::invalid(format!(
            "{}: the VMDK descriptor is not UTF-8 text",
            source.name
        ))
    })?;
    Ok(text.strip_prefix('\u{feff}').unwrap_or(text).to_string())
}

/// A parsed VMDK descriptor.
struct Descriptor {
    create_type: Option<String>,
    extents: Vec<Extent>,
}

struct Extent {
    sectors: u64,
    kind: String,
    file: Option<String>,
    offset: u64,
}

/// Splits a line into words; `"..."` is one word (quotes removed).
fn words(line: &str) -> std::result::Result<Vec<String>, &'static str> {
    let mut out = Vec::new();
    let mut chars = line.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '"' {
            chars.next();
            let mut word = String::new();
            loop {
                match chars.next() {
                    Some('"') => break,
                    Some(ch) => word.push(ch),
                    None => return Err("an unterminated quote"),
                }
            }
            out.push(word);
        } else {
            let mut word = String::new();
            while let Some(&ch) = chars.peek() {
                if ch.is_whitespace() {
                    break;
                }
                word.push(ch);
                chars.next();
            }
            out.push(word);
        }
    }
    Ok(out)
}

fn parse_descriptor(source: &Source, text: &str) -> Result<Descriptor> {
    let bad = |line: &str, why: &str| {
        ConvertError::invalid(format!(
            "{}: VMDK descriptor line {line:?} is {why}",
            source.name
        ))
    };
    let mut descriptor = Descriptor {
        create_type: None,
        extents: Vec::new(),
    };
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let first = line.split_whitespace().next().unwrap_or("");
        if matches!(first, "RW" | "RDONLY" | "NOACCESS") {
            let parts = words(line).map_err(|why| bad(line, why))?;
            if parts.len() < 3 || parts.len() > 5 {
                return Err(bad(
                    line,
                    "not an extent line (access, sectors, type, file, offset)",
                ));
            }
            let sectors: u64 = parts[1]
                .parse()
                .map_err(|_| bad(line, "an extent with an invalid sector count"))?;
            let offset = match parts.get(4) {
                Some(word) => word
                    .parse()
                    .map_err(|_| bad(line, "an extent with an invalid offset"))?,
                None => 0,
            };
            descriptor.extents.push(Extent {
                sectors,
                kind: parts[2].to_ascii_uppercase(),
                file: parts.get(3).cloned(),
                offset,
            });
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(bad(line, "neither a setting nor an extent"));
        };
        let key = key.trim();
        let value = value.trim().trim_matches('"');
        match key.to_ascii_lowercase().as_str() {
            "createtype" => descriptor.create_type = Some(value.to_string()),
            "parentcid" if !value.eq_ignore_ascii_case("ffffffff") => {
                return Err(source.refuse(format_args!(
                    "is a VMDK with a parent disk (parentCID={value}); Ferry imports only \
                     self-contained disks (consolidate its snapshots first)"
                )));
            }
            "parentfilenamehint" => {
                return Err(source.refuse(format_args!(
                    "is a VMDK with a parent disk {value:?}; Ferry imports only self-contained \
                     disks (consolidate its snapshots first)"
                )));
            }
            _ => {}
        }
    }
    if let Some(create_type) = &descriptor.create_type {
        const ACCEPTED: [&str; 9] = [
            "monolithicSparse",
            "monolithicFlat",
            "twoGbMaxExtentSparse",
            "twoGbMaxExtentFlat",
            "streamOptimized",
            "vmfs",
            "vmfsThin",
            "vmfsPreallocated",
            "vmfsEagerZeroedThick",
        ];
        if !ACCEPTED.iter().any(|a| a.eq_ignore_ascii_case(create_type)) {
            return Err(source.refuse(format_args!(
                "is a VMDK of type {create_type:?} (raw device mappings, ESX sparse and \
                 snapshot types are not imported)"
            )));
        }
    }
    Ok(descriptor)
}

fn vmdk_sparse_file(source: &Source) -> Result<ImageInfo> {
    let header = sparse_header(source)?;
    let mut variant = if header.compressed {
        "streamOptimized".to_string()
    } else {
        "monolithicSparse".to_string()
    };
    if let Some(text) = &header.descriptor {
        let descriptor = parse_descriptor(source, text)?;
        check_embedded_extents(source, &descriptor)?;
        if let Some(create_type) = descriptor.create_type {
            variant = create_type;
        }
    }
    Ok(ImageInfo {
        format: ImageFormat::Vmdk,
        variant,
        virtual_size: header.capacity_sectors.saturating_mul(512),
        file_size: source.len,
        extents: Vec::new(),
    })
}

/// A sparse file's embedded descriptor may only describe the file itself:
/// one SPARSE extent with a plain file name (qemu reads the grains of the
/// file itself and never opens that name; the name is often stale after a
/// rename, so it is not compared).
fn check_embedded_extents(source: &Source, descriptor: &Descriptor) -> Result<()> {
    let extent = match descriptor.extents.as_slice() {
        [] => return Ok(()),
        [extent] => extent,
        _ => {
            return Err(source.refuse(format_args!(
                "is a VMDK sparse extent whose embedded descriptor lists {} extents; it may only \
                 describe the file itself",
                descriptor.extents.len()
            )))
        }
    };
    let plain = extent.file.as_deref().is_some_and(|f| {
        !f.is_empty() && !f.contains(['/', '\\', '\0']) && f != ".." && f != "." && !f.contains(':')
    });
    if extent.kind != "SPARSE" || !plain {
        return Err(source.refuse(format_args!(
            "is a VMDK sparse extent whose embedded descriptor names a {} extent {:?}; it may \
             only describe the file itself",
            extent.kind,
            extent.file.as_deref().unwrap_or("")
        )));
    }
    Ok(())
}

fn vmdk_descriptor_file(source: &Source, folder: Option<&Path>) -> Result<ImageInfo> {
    if source.len > MAX_DESCRIPTOR {
        return Err(source.refuse(format_args!(
            "starts like a VMDK descriptor but has {} bytes, more than the {MAX_DESCRIPTOR} a \
             descriptor may have",
            source.len
        )));
    }
    let raw = source.read(0, source.len, "VMDK descriptor")?;
    let text = descriptor_text(source, &raw)?;
    let descriptor = parse_descriptor(source, &text)?;
    let Some(create_type) = descriptor.create_type.clone() else {
        return Err(ConvertError::invalid(format!(
            "{}: the VMDK descriptor has no createType",
            source.name
        )));
    };
    if descriptor.extents.is_empty() {
        return Err(ConvertError::invalid(format!(
            "{}: the VMDK descriptor lists no extents",
            source.name
        )));
    }
    let what = format!("the VMDK descriptor {}", source.name);
    let mut total: u64 = 0;
    let mut files: Vec<PathBuf> = Vec::new();
    for extent in &descriptor.extents {
        total = total.checked_add(extent.sectors).ok_or_else(|| {
            source.refuse("lists extents whose sizes add up to more than any disk can have")
        })?;
        if extent.kind == "ZERO" {
            continue;
        }
        if !matches!(extent.kind.as_str(), "FLAT" | "VMFS" | "SPARSE") {
            return Err(source.refuse(format_args!(
                "lists a {} extent; Ferry imports only FLAT, VMFS, SPARSE and ZERO extents",
                extent.kind
            )));
        }
        let Some(reference) = extent.file.as_deref() else {
            return Err(ConvertError::invalid(format!(
                "{}: a {} extent names no file",
                source.name, extent.kind
            )));
        };
        let Some(folder) = folder else {
            return Err(source.refuse(format_args!(
                "is a VMDK descriptor that needs the extent file {reference:?}; inside an \
                 archive only self-contained images (streamOptimized or monolithicSparse) are \
                 imported"
            )));
        };
        let resolved = paths::resolve(folder, reference, Reach::InsideFolder, &what)?;
        if let Some(own) = source.own_path {
            if std::fs::canonicalize(own).is_ok_and(|own| own == resolved) {
                return Err(source.refuse(format_args!(
                    "lists itself ({reference:?}) as one of its extents"
                )));
            }
        }
        let file = open_regular(&resolved)?;
        let len = file
            .metadata()
            .map_err(|e| ConvertError::io("cannot read", &resolved, e))?
            .len();
        let shown = resolved.display().to_string();
        let extent_source = Source {
            file: &file,
            base: 0,
            len,
            name: &shown,
            own_path: Some(&resolved),
        };
        if extent.kind == "SPARSE" {
            let found = signatures(&extent_source)?;
            if found != [Signature::VmdkSparse] {
                return Err(source.refuse(format_args!(
                    "lists {reference:?} as a SPARSE extent, but that file is not a VMDK sparse \
                     extent"
                )));
            }
            let header = sparse_header(&extent_source)?;
            if let Some(text) = &header.descriptor {
                let embedded = parse_descriptor(&extent_source, text)?;
                check_embedded_extents(&extent_source, &embedded)?;
            }
            if header.capacity_sectors < extent.sectors {
                return Err(source.refuse(format_args!(
                    "lists {reference:?} with {} sectors, but that extent holds only {}",
                    extent.sectors, header.capacity_sectors
                )));
            }
        } else {
            let needed = extent
                .offset
                .checked_add(extent.sectors)
                .and_then(|s| s.checked_mul(512));
            if needed.is_none_or(|needed| needed > len) {
                return Err(source.refuse(format_args!(
                    "lists {reference:?} as a flat extent of {} sectors from sector {}, but that \
                     file has only {len} bytes (truncated?)",
                    extent.sectors, extent.offset
                )));
            }
        }
        if !files.contains(&resolved) {
            files.push(resolved);
        }
    }
    Ok(ImageInfo {
        format: ImageFormat::Vmdk,
        variant: create_type,
        virtual_size: total.saturating_mul(512),
        file_size: source.len,
        extents: files,
    })
}

// ---------------------------------------------------------------- VHD

fn vhd(source: &Source) -> Result<ImageInfo> {
    // qemu takes the copy at offset 0 when there is one, else the footer.
    let head = source.peek(0, 512)?.filter(|h| h.starts_with(b"conectix"));
    let tail = if source.len >= 512 {
        source
            .peek(source.len - 512, 512)?
            .filter(|t| t.starts_with(b"conectix"))
    } else {
        None
    };
    let footer = match (&head, &tail) {
        (Some(head), Some(tail)) => {
            if head[48..56] != tail[48..56] || head[60..64] != tail[60..64] {
                return Err(source
                    .refuse("is a VHD whose header copy and footer disagree on its size or type"));
            }
            head
        }
        (Some(_), None) => {
            return Err(source.refuse("is a VHD whose footer is missing (truncated?)"));
        }
        (None, Some(tail)) => tail,
        (None, None) => return Err(source.truncated("VHD footer", 0, 512)),
    };
    let current_size = be64(footer, 48);
    let disk_type = be32(footer, 60);
    let variant = match disk_type {
        2 => "fixed",
        3 => "dynamic",
        4 => {
            return Err(source.refuse(
                "is a differencing VHD: it has a parent disk; Ferry imports only \
                 self-contained disks (merge it first)",
            ))
        }
        other => {
            return Err(ConvertError::invalid(format!(
                "{} is a VHD of unknown disk type {other}",
                source.name
            )))
        }
    };
    // Size as qemu computes it: from the CHS geometry for images made by
    // Virtual PC and old qemu, unless the geometry is the maximum.
    let creator = &footer[28..32];
    let cylinders = u16::from_be_bytes([footer[56], footer[57]]) as u64;
    let heads = footer[58] as u64;
    let sectors = footer[59] as u64;
    let max_geometry = cylinders == 65535 && heads == 16 && sectors >= 255;
    let virtual_size = if (creator == b"vpc " || creator == b"qemu") && !max_geometry {
        cylinders * heads * sectors * 512
    } else {
        current_size
    };
    if disk_type == 2 {
        // The data precedes the footer.
        source.read_range_check(0, current_size.saturating_add(512), "fixed VHD data")?;
    } else {
        let data_offset = be64(footer, 16);
        let dynamic = source.read(data_offset, 1024, "VHD dynamic header")?;
        if !dynamic.starts_with(b"cxsparse") {
            return Err(source
                .refuse("is a dynamic VHD whose dynamic header (cxsparse) is missing or damaged"));
        }
        let table_offset = be64(&dynamic, 16);
        let entries = be32(&dynamic, 28) as u64;
        let block_size = be32(&dynamic, 32) as u64;
        if block_size == 0 || !block_size.is_power_of_two() || block_size < 512 {
            return Err(ConvertError::invalid(format!(
                "{} is a damaged VHD: block size {block_size} is impossible",
                source.name
            )));
        }
        if entries.saturating_mul(block_size) < virtual_size {
            return Err(ConvertError::invalid(format!(
                "{} is a damaged VHD: its block table is too small for its size",
                source.name
            )));
        }
        source.read_range_check(table_offset, entries * 4, "VHD block allocation table")?;
    }
    Ok(ImageInfo {
        format: ImageFormat::Vhd,
        variant: variant.to_string(),
        virtual_size,
        file_size: source.len,
        extents: Vec::new(),
    })
}

// ---------------------------------------------------------------- VHDX

/// A GUID written "XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX", as stored on disk
/// (first three fields little-endian).
fn guid(text: &str) -> [u8; 16] {
    let hex: Vec<u8> = text
        .chars()
        .filter(|c| *c != '-')
        .collect::<String>()
        .as_bytes()
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
        .collect();
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&[hex[3], hex[2], hex[1], hex[0]]);
    out[4..6].copy_from_slice(&[hex[5], hex[4]]);
    out[6..8].copy_from_slice(&[hex[7], hex[6]]);
    out[8..16].copy_from_slice(&hex[8..16]);
    out
}

const VHDX_BAT: &str = "2DC27766-F623-4200-9D64-115E9BFD4A08";
const VHDX_METADATA: &str = "8B7CA206-4790-4B9A-B8FE-575F050F886E";
const VHDX_FILE_PARAMETERS: &str = "CAA16737-FA36-4D43-B3B6-33F0AA44E76B";
const VHDX_VIRTUAL_DISK_SIZE: &str = "2FA54224-CD1B-4876-B211-5DBED83BF4B8";
const VHDX_PAGE83: &str = "BECA12AB-B2E6-4523-93EF-C309E000C746";
const VHDX_LOGICAL_SECTOR: &str = "8141BF1D-A96F-4709-BA47-F233A8FAAB5F";
const VHDX_PHYSICAL_SECTOR: &str = "CDA348C7-445D-4471-9CC9-E9885251C556";
const VHDX_PARENT_LOCATOR: &str = "A8D35F2D-B30B-454D-ABF7-D3D84834AB0C";

fn vhdx(source: &Source) -> Result<ImageInfo> {
    let table = source.read(192 * 1024, 64 * 1024, "VHDX region table")?;
    if &table[0..4] != b"regi" {
        return Err(source.refuse("is a VHDX whose region table is missing or damaged"));
    }
    let count = le32(&table, 8) as usize;
    if count > 2047 {
        return Err(ConvertError::invalid(format!(
            "{} is a damaged VHDX: {count} regions",
            source.name
        )));
    }
    let mut metadata = None;
    for i in 0..count {
        let entry = &table[16 + i * 32..16 + (i + 1) * 32];
        let id: [u8; 16] = entry[0..16].try_into().unwrap();
        let offset = le64(entry, 16);
        let length = le32(entry, 24) as u64;
        let required = le32(entry, 28) & 1 != 0;
        if id == guid(VHDX_METADATA) {
            metadata = Some((offset, length));
        } else if id != guid(VHDX_BAT) && required {
            return Err(source.refuse(
                "is a VHDX with a required region Ferry does not know; it cannot be read safely",
            ));
        }
        source.read_range_check(offset, length, "VHDX region")?;
    }
    let Some((region, region_length)) = metadata else {
        return Err(source.refuse("is a VHDX without a metadata region (damaged)"));
    };
    if !(64 * 1024..=1 << 20).contains(&region_length) {
        return Err(ConvertError::invalid(format!(
            "{} is a damaged VHDX: metadata region of {region_length} bytes",
            source.name
        )));
    }
    let meta = source.read(region, 64 * 1024, "VHDX metadata table")?;
    if &meta[0..8] != b"metadata" {
        return Err(source.refuse("is a VHDX whose metadata table is missing or damaged"));
    }
    let entries = le16(&meta, 10) as usize;
    if entries > 2047 {
        return Err(ConvertError::invalid(format!(
            "{} is a damaged VHDX: {entries} metadata items",
            source.name
        )));
    }
    let mut virtual_size = None;
    let mut fixed = false;
    for i in 0..entries {
        let entry = &meta[32 + i * 32..32 + (i + 1) * 32];
        let id: [u8; 16] = entry[0..16].try_into().unwrap();
        let offset = le32(entry, 16) as u64;
        let length = le32(entry, 20) as u64;
        let required = le32(entry, 24) & (1 << 2) != 0;
        if offset.saturating_add(length) > region_length {
            return Err(source.truncated("VHDX metadata item", region + offset, length));
        }
        if id == guid(VHDX_PARENT_LOCATOR) {
            return Err(source.refuse(
                "is a differencing VHDX: it has a parent disk; Ferry imports only \
                 self-contained disks (merge it first)",
            ));
        } else if id == guid(VHDX_VIRTUAL_DISK_SIZE) {
            if length < 8 {
                return Err(source.truncated("VHDX virtual disk size", region + offset, 8));
            }
            let item = source.read(region + offset, 8, "VHDX virtual disk size")?;
            virtual_size = Some(le64(&item, 0));
        } else if id == guid(VHDX_FILE_PARAMETERS) {
            if length < 8 {
                return Err(source.truncated("VHDX file parameters", region + offset, 8));
            }
            let item = source.read(region + offset, 8, "VHDX file parameters")?;
            let flags = le32(&item, 4);
            if flags & 2 != 0 {
                return Err(source.refuse(
                    "is a differencing VHDX: it has a parent disk; Ferry imports only \
                     self-contained disks (merge it first)",
                ));
            }
            fixed = flags & 1 != 0;
        } else if required
            && ![VHDX_PAGE83, VHDX_LOGICAL_SECTOR, VHDX_PHYSICAL_SECTOR]
                .iter()
                .any(|known| id == guid(known))
        {
            return Err(source.refuse(
                "is a VHDX with a required metadata item Ferry does not know; it cannot be read \
                 safely",
            ));
        }
    }
    let Some(virtual_size) = virtual_size else {
        return Err(source.refuse("is a VHDX without a virtual disk size (damaged)"));
    };
    Ok(ImageInfo {
        format: ImageFormat::Vhdx,
        variant: if fixed { "fixed" } else { "dynamic" }.to_string(),
        virtual_size,
        file_size: source.len,
        extents: Vec::new(),
    })
}

// ---------------------------------------------------------------- VDI

fn vdi(source: &Source) -> Result<ImageInfo> {
    let header = source.read(0, 0x1C8, "VDI header")?;
    let version = le32(&header, 0x44);
    if version != 0x0001_0001 {
        return Err(source.refuse(format_args!(
            "is a VDI image of header version {}.{}; Ferry imports version 1.1",
            version >> 16,
            version & 0xffff
        )));
    }
    let image_type = le32(&header, 0x4C);
    let variant =
        match image_type {
            1 => "dynamic",
            2 => "fixed",
            3 => {
                return Err(source.refuse(
                    "is a VDI undo image: it has a parent disk; Ferry imports only self-contained \
                 disks",
                ))
            }
            4 => return Err(source.refuse(
                "is a differencing VDI: it has a parent disk; Ferry imports only self-contained \
                 disks (merge it first)",
            )),
            other => {
                return Err(ConvertError::invalid(format!(
                    "{} is a VDI of unknown image type {other}",
                    source.name
                )))
            }
        };
    if header[0x1A8..0x1B8].iter().any(|b| *b != 0) {
        return Err(source.refuse(
            "is a VDI with a parent disk (parent UUID set); Ferry imports only self-contained \
             disks",
        ));
    }
    let offset_blocks = le32(&header, 0x154) as u64;
    let offset_data = le32(&header, 0x158) as u64;
    let disk_size = le64(&header, 0x170);
    let block_size = le32(&header, 0x178) as u64;
    let blocks = le32(&header, 0x180) as u64;
    if block_size == 0 || blocks.saturating_mul(block_size) < disk_size {
        return Err(ConvertError::invalid(format!(
            "{} is a damaged VDI: its block map is too small for its size",
            source.name
        )));
    }
    source.read_range_check(offset_blocks, blocks * 4, "VDI block map")?;
    source.read_range_check(offset_data, 0, "VDI data area")?;
    if image_type == 2 {
        source.read_range_check(offset_data, blocks * block_size, "fixed VDI data")?;
    }
    Ok(ImageInfo {
        format: ImageFormat::Vdi,
        variant: variant.to_string(),
        virtual_size: disk_size,
        file_size: source.len,
        extents: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn qemu_img(args: &[&str]) {
        let output = Command::new("qemu-img")
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("qemu-img not runnable ({e}): install qemu-utils"));
        assert!(
            output.status.success(),
            "qemu-img {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn qemu_virtual_size(path: &Path, driver: &str) -> u64 {
        let output = Command::new("qemu-img")
            .args(["info", "--output=json", "-f", driver])
            .arg(path)
            .output()
            .unwrap_or_else(|e| panic!("qemu-img not runnable ({e}): install qemu-utils"));
        assert!(output.status.success());
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        json["virtual-size"].as_u64().unwrap()
    }

    fn create(dir: &Path, name: &str, format: &str, options: &[&str], size: &str) -> PathBuf {
        let path = dir.join(name);
        let mut args = vec!["create", "-q", "-f", format];
        for option in options {
            args.push("-o");
            args.push(option);
        }
        let text = path.to_str().unwrap().to_string();
        args.push(&text);
        args.push(size);
        qemu_img(&args);
        path
    }

    fn refusal(result: Result<ImageInfo>) -> String {
        match result {
            Ok(info) => panic!("accepted: {info:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn policy() -> ImagePolicy {
        ImagePolicy::default()
    }

    #[test]
    fn detects_every_qemu_made_format() {
        let dir = tempfile::tempdir().unwrap();
        type Case<'a> = (
            &'a str,
            &'a str,
            &'a [&'a str],
            &'a str,
            ImageFormat,
            &'a str,
        );
        let cases: &[Case] = &[
            ("a.raw", "raw", &[], "65M", ImageFormat::Raw, ""),
            ("a.qcow2", "qcow2", &[], "65M", ImageFormat::Qcow2, "v3"),
            (
                "b.qcow2",
                "qcow2",
                &["compat=0.10"],
                "65M",
                ImageFormat::Qcow2,
                "v2",
            ),
            (
                "m.vmdk",
                "vmdk",
                &[],
                "65M",
                ImageFormat::Vmdk,
                "monolithicSparse",
            ),
            (
                "s.vmdk",
                "vmdk",
                &["subformat=streamOptimized"],
                "65M",
                ImageFormat::Vmdk,
                "streamOptimized",
            ),
            (
                "f.vmdk",
                "vmdk",
                &["subformat=monolithicFlat"],
                "65M",
                ImageFormat::Vmdk,
                "monolithicFlat",
            ),
            (
                "t.vmdk",
                "vmdk",
                &["subformat=twoGbMaxExtentSparse"],
                "5G",
                ImageFormat::Vmdk,
                "twoGbMaxExtentSparse",
            ),
            ("d.vhd", "vpc", &[], "65M", ImageFormat::Vhd, "dynamic"),
            (
                "e.vhd",
                "vpc",
                &["subformat=fixed"],
                "65M",
                ImageFormat::Vhd,
                "fixed",
            ),
            (
                "g.vhd",
                "vpc",
                &["force_size=on"],
                "65M",
                ImageFormat::Vhd,
                "dynamic",
            ),
            ("a.vhdx", "vhdx", &[], "65M", ImageFormat::Vhdx, "dynamic"),
            (
                "b.vhdx",
                "vhdx",
                &["subformat=fixed"],
                "9M",
                ImageFormat::Vhdx,
                "fixed",
            ),
            ("a.vdi", "vdi", &[], "65M", ImageFormat::Vdi, "dynamic"),
            (
                "b.vdi",
                "vdi",
                &["static=on"],
                "9M",
                ImageFormat::Vdi,
                "fixed",
            ),
        ];
        for (name, driver, options, size, format, variant) in cases {
            let path = create(dir.path(), name, driver, options, size);
            let info = inspect(&path, &policy()).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(info.format, *format, "{name}");
            assert_eq!(info.format.qemu_driver(), *driver, "{name}");
            assert_eq!(info.variant, *variant, "{name}");
            assert_eq!(
                info.virtual_size,
                qemu_virtual_size(&path, driver),
                "{name}"
            );
            assert_eq!(
                info.file_size,
                std::fs::metadata(&path).unwrap().len(),
                "{name}"
            );
            assert_eq!(ImageFormat::from_extension(&path), Some(*format), "{name}");
        }
        let flat = inspect(&dir.path().join("f.vmdk"), &policy()).unwrap();
        assert_eq!(flat.extents.len(), 1);
        assert!(flat.extents[0].ends_with("f-flat.vmdk"));
        let split = inspect(&dir.path().join("t.vmdk"), &policy()).unwrap();
        assert_eq!(split.extents.len(), 3);
    }

    #[test]
    fn names_claims_and_extensions() {
        assert_eq!(ImageFormat::from_claim("VPC"), Some(ImageFormat::Vhd));
        assert_eq!(ImageFormat::from_claim("Qcow2"), Some(ImageFormat::Qcow2));
        assert_eq!(ImageFormat::from_claim("iso"), None);
        assert_eq!(ImageFormat::from_extension(Path::new("x.IMG")), None);
        assert_eq!(ImageFormat::from_extension(Path::new("x.bin")), None);
        assert_eq!(
            ImageFormat::from_extension(Path::new("x.VHDX")),
            Some(ImageFormat::Vhdx)
        );
        assert_eq!(ImageFormat::Vhd.name(), "vhd");
        assert_eq!(ImageFormat::Vhd.qemu_driver(), "vpc");
        assert_eq!(
            serde_json::to_string(&ImageFormat::Qcow2).unwrap(),
            "\"qcow2\""
        );
    }

    #[test]
    fn refuses_qcow2_backing_file() {
        let dir = tempfile::tempdir().unwrap();
        create(dir.path(), "base.raw", "raw", &[], "1M");
        let top = dir.path().join("top.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            top.to_str().unwrap(),
        ]);
        let message = refusal(inspect(&top, &policy()));
        assert!(message.contains("backing file \"base.raw\""), "{message}");
    }

    #[test]
    fn refuses_qcow2_data_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = create(dir.path(), "d.qcow2", "qcow2", &["data_file=d.data"], "1M");
        let message = refusal(inspect(&path, &policy()));
        assert!(message.contains("external data file"), "{message}");
        assert!(message.contains("d.data"), "{message}");
    }

    #[test]
    fn refuses_encrypted_qcow2() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "--object",
            "secret,id=s0,data=secret",
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0",
            path.to_str().unwrap(),
            "1M",
        ]);
        let message = refusal(inspect(&path, &policy()));
        assert!(message.contains("encrypted"), "{message}");
    }

    #[test]
    fn refuses_vmdk_extents_outside_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("import");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(dir.path().join("x"), vec![0u8; 4096]).unwrap();
        for (reference, expected) in [
            ("/etc/passwd", "absolute path"),
            ("../x", "'..'"),
            ("http://example.com/x", "URL"),
        ] {
            let path = sub.join("d.vmdk");
            std::fs::write(
                &path,
                format!(
                    "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n\
                     createType=\"monolithicFlat\"\nRW 1 FLAT \"{reference}\" 0\n"
                ),
            )
            .unwrap();
            let message = refusal(inspect(&path, &policy()));
            assert!(message.contains(expected), "{reference}: {message}");
        }
    }

    #[test]
    fn refuses_vmdk_parents_short_flat_extents_and_bad_sparse_extents() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("flat.bin"), vec![0u8; 1024]).unwrap();
        let write = |body: &str| {
            let path = dir.path().join("d.vmdk");
            std::fs::write(&path, format!("# Disk DescriptorFile\nversion=1\n{body}")).unwrap();
            refusal(inspect(&path, &policy()))
        };
        let m =
            write("parentCID=12345678\ncreateType=\"monolithicFlat\"\nRW 2 FLAT \"flat.bin\" 0\n");
        assert!(m.contains("parent"), "{m}");
        let m = write("parentFileNameHint=\"base.vmdk\"\ncreateType=\"monolithicFlat\"\n");
        assert!(m.contains("base.vmdk"), "{m}");
        let m = write("createType=\"monolithicFlat\"\nRW 4 FLAT \"flat.bin\" 0\n");
        assert!(m.contains("truncated"), "{m}");
        let m = write("createType=\"monolithicSparse\"\nRW 2 SPARSE \"flat.bin\"\n");
        assert!(m.contains("not a VMDK sparse extent"), "{m}");
        let m = write("createType=\"vmfsRawDeviceMap\"\nRW 2 VMFSRDM \"flat.bin\"\n");
        assert!(m.contains("vmfsRawDeviceMap"), "{m}");
        let m = write("createType=\"monolithicFlat\"\nRW 2 FLAT \"d.vmdk\" 0\n");
        assert!(m.contains("itself"), "{m}");
        // Flat extent of exactly the right size is fine.
        let path = dir.path().join("ok.vmdk");
        std::fs::write(
            &path,
            "# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\nRW 2 FLAT \"flat.bin\" 0\nRW 8 ZERO\n",
        )
        .unwrap();
        let info = inspect(&path, &policy()).unwrap();
        assert_eq!(info.virtual_size, 10 * 512);
    }

    /// Rewrites the embedded descriptor of a qemu-made monolithicSparse file.
    fn patch_embedded(path: &Path, text: &str) {
        let mut bytes = std::fs::read(path).unwrap();
        let start = 512;
        let size = 20 * 512;
        bytes[start..start + size].fill(0);
        bytes[start..start + text.len()].copy_from_slice(text.as_bytes());
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn refuses_hostile_embedded_vmdk_descriptors() {
        let dir = tempfile::tempdir().unwrap();
        let path = create(dir.path(), "m.vmdk", "vmdk", &[], "1M");
        patch_embedded(
            &path,
            "# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicSparse\"\nRW 2048 FLAT \"/etc/passwd\" 0\n",
        );
        let m = refusal(inspect(&path, &policy()));
        assert!(m.contains("only describe the file itself"), "{m}");

        let path = create(dir.path(), "n.vmdk", "vmdk", &[], "1M");
        patch_embedded(
            &path,
            "# Disk DescriptorFile\nversion=1\nparentCID=00000001\ncreateType=\"monolithicSparse\"\nRW 2048 SPARSE \"n.vmdk\"\n",
        );
        let m = refusal(inspect(&path, &policy()));
        assert!(m.contains("parent"), "{m}");

        // Capacity 0 would make qemu follow the embedded descriptor.
        let path = create(dir.path(), "z.vmdk", "vmdk", &[], "1M");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[12..20].fill(0);
        std::fs::write(&path, bytes).unwrap();
        let m = refusal(inspect(&path, &policy()));
        assert!(m.contains("capacity 0"), "{m}");
    }

    #[test]
    fn refuses_huge_virtual_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let path = create(dir.path(), "big.qcow2", "qcow2", &[], "1P");
        let m = refusal(inspect(&path, &policy()));
        assert!(
            m.contains("1 PiB, more than the 4 TiB allowed (--max-disk-size)"),
            "{m}"
        );
        let path = create(dir.path(), "big.vdi", "vdi", &[], "5T");
        let m = refusal(inspect(&path, &policy()));
        assert!(m.contains("5 TiB"), "{m}");
        let small = ImagePolicy {
            max_virtual_size: 1 << 20,
        };
        let path = create(dir.path(), "s.vhdx", "vhdx", &[], "2M");
        let m = refusal(inspect(&path, &small));
        assert!(m.contains("2 MiB, more than the 1 MiB"), "{m}");
        let empty = dir.path().join("empty.raw");
        std::fs::write(&empty, b"").unwrap();
        assert!(refusal(inspect(&empty, &policy())).contains("empty"));
    }

    #[test]
    fn refuses_truncated_headers() {
        let dir = tempfile::tempdir().unwrap();
        let cases: &[(&str, &str, &[&str])] = &[
            ("a.qcow2", "qcow2", &[]),
            ("b.qcow2", "qcow2", &["compat=0.10"]),
            ("a.vmdk", "vmdk", &[]),
            ("s.vmdk", "vmdk", &["subformat=streamOptimized"]),
            ("a.vhdx", "vhdx", &[]),
            ("a.vdi", "vdi", &[]),
            ("a.vhd", "vpc", &[]),
        ];
        for (name, driver, options) in cases {
            let path = create(dir.path(), name, driver, options, "8M");
            let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            file.set_len(100).unwrap();
            let m = refusal(inspect(&path, &policy()));
            assert!(m.contains("truncated"), "{name}: {m}");
        }
        // A qcow2 cut after its header: the L1/refcount tables are gone.
        let path = create(dir.path(), "c.qcow2", "qcow2", &[], "8M");
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(4096).unwrap();
        let m = refusal(inspect(&path, &policy()));
        assert!(m.contains("truncated"), "{m}");
        // A fixed VHD missing part of its data.
        let path = create(dir.path(), "f.vhd", "vpc", &["subformat=fixed"], "8M");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(
            &path,
            [&bytes[..4096], &bytes[bytes.len() - 512..]].concat(),
        )
        .unwrap();
        let m = refusal(inspect(&path, &policy()));
        assert!(m.contains("truncated"), "{m}");
    }

    #[test]
    fn check_claim_refuses_a_raw_claim_over_qcow2() {
        let dir = tempfile::tempdir().unwrap();
        let path = create(dir.path(), "disk.raw", "qcow2", &[], "1M");
        let info = inspect(&path, &policy()).unwrap();
        let m = check_claim(&info, ImageFormat::Raw, "disk.raw")
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("disk.raw claims raw but its bytes are a qcow2 image"),
            "{m}"
        );
        check_claim(&info, ImageFormat::Qcow2, "disk.raw").unwrap();
    }

    #[test]
    fn refuses_two_formats_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let vhd = create(dir.path(), "a.vhd", "vpc", &[], "1M");
        let qcow = create(dir.path(), "a.qcow2", "qcow2", &[], "1M");
        let footer = std::fs::read(&vhd).unwrap();
        let mut bytes = std::fs::read(&qcow).unwrap();
        bytes.extend_from_slice(&footer[footer.len() - 512..]);
        std::fs::write(&qcow, bytes).unwrap();
        let m = refusal(inspect(&qcow, &policy()));
        assert!(m.contains("two formats at once (qcow2 and VHD)"), "{m}");

        let vmdk = create(dir.path(), "a.vmdk", "vmdk", &[], "1M");
        let mut bytes = std::fs::read(&vmdk).unwrap();
        bytes[0x40..0x44].copy_from_slice(&0xBEDA_107Fu32.to_le_bytes());
        std::fs::write(&vmdk, bytes).unwrap();
        let m = refusal(inspect(&vmdk, &policy()));
        assert!(m.contains("VMDK (sparse) and VDI"), "{m}");
    }

    #[test]
    fn refuses_unsupported_formats() {
        let dir = tempfile::tempdir().unwrap();
        let qed = create(dir.path(), "a.qed", "qed", &[], "1M");
        assert!(refusal(inspect(&qed, &policy())).contains("QED"));
        let luks = dir.path().join("a.luks");
        let mut bytes = b"LUKS\xba\xbe\x00\x01".to_vec();
        bytes.resize(4096, 0);
        std::fs::write(&luks, bytes).unwrap();
        let m = refusal(inspect(&luks, &policy()));
        assert!(m.contains("LUKS") && m.contains("does not import"), "{m}");
    }

    #[test]
    fn refuses_non_regular_files() {
        let m = refusal(inspect(Path::new("/dev/null"), &policy()));
        assert!(m.contains("not a regular file"), "{m}");
    }

    #[test]
    fn inspects_archive_slices() {
        let dir = tempfile::tempdir().unwrap();
        let stream = create(
            dir.path(),
            "s.vmdk",
            "vmdk",
            &["subformat=streamOptimized"],
            "3M",
        );
        let image = std::fs::read(&stream).unwrap();
        let archive = dir.path().join("archive");
        let mut bytes = vec![0xAAu8; 1536];
        bytes.extend_from_slice(&image);
        bytes.extend_from_slice(&[0x55u8; 1024]);
        std::fs::write(&archive, &bytes).unwrap();
        let file = File::open(&archive).unwrap();
        let len = image.len() as u64;
        let info = inspect_slice(&file, 1536, len, "disk1.vmdk", &policy()).unwrap();
        assert_eq!(info.variant, "streamOptimized");
        assert_eq!(info.virtual_size, 3 << 20);
        assert_eq!(info.file_size, len);
        let m = refusal(inspect_slice(
            &file,
            1536,
            len + 4096,
            "disk1.vmdk",
            &policy(),
        ));
        assert!(m.contains("truncated"), "{m}");

        let flat = create(
            dir.path(),
            "f.vmdk",
            "vmdk",
            &["subformat=monolithicFlat"],
            "1M",
        );
        let text = std::fs::read(&flat).unwrap();
        std::fs::write(&archive, &text).unwrap();
        let file = File::open(&archive).unwrap();
        let m = refusal(inspect_slice(
            &file,
            0,
            text.len() as u64,
            "f.vmdk",
            &policy(),
        ));
        assert!(m.contains("inside an archive"), "{m}");
    }
}
