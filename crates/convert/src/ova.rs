//! Reading OVA (tar) archives without trusting them.
//!
//! [`Ova::open`] walks every header before anything is read or written and
//! refuses the whole archive when any member is not a regular file, has a
//! name that is not a plain file name, appears twice, or extends past the
//! end of the archive. Members are then only ever read in place
//! ([`Ova::open_member`], [`Ova::read_small`]; qemu-img reads disks through a
//! `raw` node limited to the member's bytes): nothing of an archive is
//! written anywhere.

use crate::{ConvertError, Result};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Most members an archive may have.
const MAX_MEMBERS: usize = 1000;
/// Longest member name.
const MAX_NAME: usize = 255;
/// Largest GNU long-name or PAX record.
const MAX_RECORD: u64 = 64 * 1024;

/// A regular file inside the archive.
#[derive(Debug, Clone)]
pub struct OvaMember {
    /// Plain file name (a leading "./" removed).
    pub name: String,
    /// Byte offset of the member's data in the archive.
    pub offset: u64,
    /// Bytes of data.
    pub size: u64,
}

/// An OVA archive whose headers have all been checked.
#[derive(Debug)]
pub struct Ova {
    pub path: PathBuf,
    pub members: Vec<OvaMember>,
}

impl Ova {
    /// Reads and checks every header of the archive at `path`.
    pub fn open(path: &Path) -> Result<Ova> {
        let shown = path.display();
        let file = File::open(path).map_err(|e| ConvertError::io("cannot open", path, e))?;
        let metadata = file
            .metadata()
            .map_err(|e| ConvertError::io("cannot read", path, e))?;
        if !metadata.file_type().is_file() {
            return Err(ConvertError::refused(format!(
                "{shown} is not a regular file"
            )));
        }
        let archive_len = metadata.len();
        let damaged = |e: std::io::Error| {
            ConvertError::invalid(format!(
                "{shown} is not a valid OVA (tar) archive or is damaged: {e}"
            ))
        };
        // First pass over the raw headers, reading no contents: the long
        // name and PAX records that the second pass reads into memory must
        // be small, and the number of headers is bounded.
        {
            let mut raw = tar::Archive::new(
                file.try_clone()
                    .map_err(|e| ConvertError::io("cannot read", path, e))?,
            );
            let mut headers = 0usize;
            for entry in raw.entries_with_seek().map_err(damaged)?.raw(true) {
                let entry = entry.map_err(damaged)?;
                headers += 1;
                if headers > 4 * MAX_MEMBERS {
                    return Err(ConvertError::refused(format!(
                        "{shown} has more than {MAX_MEMBERS} members; the archive is not imported"
                    )));
                }
                let kind = entry.header().entry_type();
                let record = kind.is_gnu_longname()
                    || kind.is_gnu_longlink()
                    || kind.is_pax_local_extensions()
                    || kind.is_pax_global_extensions();
                if record && entry.size() > MAX_RECORD {
                    return Err(ConvertError::refused(format!(
                        "{shown} has a long-name or PAX record of {} bytes, more than the \
                         {MAX_RECORD} allowed; the archive is not imported",
                        entry.size()
                    )));
                }
            }
        }
        let mut file = file;
        file.rewind()
            .map_err(|e| ConvertError::io("cannot read", path, e))?;
        let mut archive = tar::Archive::new(file);
        let mut members: Vec<OvaMember> = Vec::new();
        for entry in archive.entries_with_seek().map_err(damaged)? {
            let entry = entry.map_err(damaged)?;
            let raw_name = entry.path_bytes().into_owned();
            let name = check_name(&raw_name).map_err(|why| {
                ConvertError::refused(format!(
                    "{shown} contains a member named {:?}: {why}; the archive is not imported",
                    String::from_utf8_lossy(&raw_name)
                ))
            })?;
            let kind = entry.header().entry_type();
            if !kind.is_file() {
                return Err(ConvertError::refused(format!(
                    "{shown} contains {name:?}, which is {}, not a regular file; the archive \
                     is not imported",
                    describe(kind)
                )));
            }
            if members.len() >= MAX_MEMBERS {
                return Err(ConvertError::refused(format!(
                    "{shown} has more than {MAX_MEMBERS} members; the archive is not imported"
                )));
            }
            if members.iter().any(|m| m.name == name) {
                return Err(ConvertError::refused(format!(
                    "{shown} contains {name:?} twice; the archive is not imported"
                )));
            }
            let offset = entry.raw_file_position();
            let size = entry.size();
            if offset.checked_add(size).is_none_or(|end| end > archive_len) {
                return Err(ConvertError::refused(format!(
                    "{shown} is truncated: member {name:?} of {size} bytes at byte {offset} runs \
                     past the end of the archive ({archive_len} bytes)"
                )));
            }
            members.push(OvaMember { name, offset, size });
        }
        if members.is_empty() {
            return Err(ConvertError::invalid(format!(
                "{shown} is an empty archive or not an OVA (tar) archive"
            )));
        }
        let manifests = members
            .iter()
            .filter(|m| has_extension(&m.name, "mf"))
            .count();
        if manifests > 1 {
            return Err(ConvertError::refused(format!(
                "{shown} contains {manifests} manifests (.mf); an OVA has at most one"
            )));
        }
        Ok(Ova {
            path: path.to_path_buf(),
            members,
        })
    }

    /// The member called `name` (a leading "./" is ignored).
    pub fn member(&self, name: &str) -> Option<&OvaMember> {
        let name = name.strip_prefix("./").unwrap_or(name);
        self.members.iter().find(|m| m.name == name)
    }

    /// The one OVF descriptor.
    pub fn ovf(&self) -> Result<&OvaMember> {
        let ovfs: Vec<&OvaMember> = self
            .members
            .iter()
            .filter(|m| has_extension(&m.name, "ovf"))
            .collect();
        match ovfs.as_slice() {
            [one] => Ok(one),
            [] => Err(ConvertError::invalid(format!(
                "{} contains no OVF descriptor (.ovf member)",
                self.path.display()
            ))),
            more => Err(ConvertError::refused(format!(
                "{} contains {} OVF descriptors ({}); an OVA has exactly one",
                self.path.display(),
                more.len(),
                more.iter()
                    .map(|m| m.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// The manifest (.mf member), if any.
    pub fn manifest(&self) -> Option<&OvaMember> {
        self.members.iter().find(|m| has_extension(&m.name, "mf"))
    }

    /// The whole of a small member (OVF, manifest); refused above `max`.
    pub fn read_small(&self, member: &OvaMember, max: u64) -> Result<Vec<u8>> {
        if member.size > max {
            return Err(ConvertError::refused(format!(
                "{} in {} has {} bytes, more than the {max} allowed for it",
                member.name,
                self.path.display(),
                member.size
            )));
        }
        let mut data = Vec::with_capacity(member.size as usize);
        self.open_member(member)?
            .read_to_end(&mut data)
            .map_err(|e| ConvertError::io("cannot read", &self.path, e))?;
        if data.len() as u64 != member.size {
            return Err(self.truncated(member));
        }
        Ok(data)
    }

    /// A reader over exactly the member's bytes.
    pub fn open_member(&self, member: &OvaMember) -> Result<std::io::Take<File>> {
        let mut file =
            File::open(&self.path).map_err(|e| ConvertError::io("cannot open", &self.path, e))?;
        file.seek(SeekFrom::Start(member.offset))
            .map_err(|e| ConvertError::io("cannot read", &self.path, e))?;
        Ok(file.take(member.size))
    }

    fn truncated(&self, member: &OvaMember) -> ConvertError {
        ConvertError::refused(format!(
            "{} is truncated: member {} ends before its {} bytes",
            self.path.display(),
            member.name,
            member.size
        ))
    }
}

/// The member name if it is a plain file name, else why not.
fn check_name(raw: &[u8]) -> std::result::Result<String, &'static str> {
    if raw.contains(&0) {
        return Err("the name contains a NUL byte");
    }
    let text = std::str::from_utf8(raw).map_err(|_| "the name is not UTF-8 text")?;
    let name = text.strip_prefix("./").unwrap_or(text);
    if name.is_empty() {
        return Err("the name is empty");
    }
    if name.len() > MAX_NAME {
        return Err("the name is longer than 255 bytes");
    }
    if name.chars().any(char::is_control) {
        return Err("the name contains control characters");
    }
    if text.starts_with('/') {
        return Err("the name is an absolute path");
    }
    if name.contains("..") {
        return Err("the name contains '..'");
    }
    if name.contains('/') || name.contains('\\') {
        return Err("the name is a path into a folder; OVA members are plain files");
    }
    if name == "." {
        return Err("the name is '.'");
    }
    Ok(name.to_string())
}

fn describe(kind: tar::EntryType) -> &'static str {
    match kind {
        tar::EntryType::Symlink => "a symbolic link",
        tar::EntryType::Link => "a hard link",
        tar::EntryType::Char => "a character device",
        tar::EntryType::Block => "a block device",
        tar::EntryType::Directory => "a folder",
        tar::EntryType::Fifo => "a FIFO",
        tar::EntryType::GNUSparse => "a GNU sparse file",
        tar::EntryType::XGlobalHeader => "a global PAX header",
        _ => "a special entry",
    }
}

fn has_extension(name: &str, extension: &str) -> bool {
    Path::new(name)
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case(extension))
}

#[cfg(test)]
mod tests {
    use super::*;

    enum Item<'a> {
        File(&'a str, &'a [u8]),
        Raw(&'a [u8], tar::EntryType, &'a [u8]),
        Long(&'a str, &'a [u8]),
    }

    /// Builds an archive; `Raw` writes the name bytes as they are, so unsafe
    /// names get in.
    fn build(dir: &Path, items: &[Item]) -> PathBuf {
        let path = dir.join("test.ova");
        let mut builder = tar::Builder::new(File::create(&path).unwrap());
        for item in items {
            match item {
                Item::File(name, data) => {
                    let mut header = tar::Header::new_ustar();
                    header.set_path(name).unwrap();
                    header.set_size(data.len() as u64);
                    header.set_mode(0o644);
                    header.set_cksum();
                    builder.append(&header, *data).unwrap();
                }
                Item::Raw(name, kind, data) => {
                    let mut header = tar::Header::new_gnu();
                    header.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
                    header.set_entry_type(*kind);
                    header.set_size(data.len() as u64);
                    header.set_mode(0o644);
                    if matches!(kind, tar::EntryType::Symlink | tar::EntryType::Link) {
                        header.set_link_name("/etc/passwd").unwrap();
                    }
                    header.set_cksum();
                    builder.append(&header, *data).unwrap();
                }
                Item::Long(name, data) => {
                    let mut header = tar::Header::new_gnu();
                    header.set_size(data.len() as u64);
                    header.set_mode(0o644);
                    builder.append_data(&mut header, name, *data).unwrap();
                }
            }
        }
        builder.finish().unwrap();
        path
    }

    fn refusal(result: Result<Ova>) -> String {
        match result {
            Ok(ova) => panic!("accepted: {:?}", ova.members),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn opens_and_reads_members_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let mut disk = vec![0u8; 3 << 20];
        disk[..5].copy_from_slice(b"start");
        let end = disk.len();
        disk[end - 3..].copy_from_slice(b"end");
        let long = format!("{}.vmdk", "d".repeat(150));
        let ova = build(
            dir.path(),
            &[
                Item::File("./vm.ovf", b"<Envelope/>"),
                Item::File("vm.mf", b"SHA256(vm.ovf)= 00\n"),
                Item::File("disk1.vmdk", &disk),
                Item::Long(&long, b"long"),
            ],
        );
        let ova = Ova::open(&ova).unwrap();
        assert_eq!(ova.members.len(), 4);
        assert_eq!(ova.ovf().unwrap().name, "vm.ovf");
        assert_eq!(ova.manifest().unwrap().name, "vm.mf");
        assert!(ova.member("./disk1.vmdk").is_some());
        assert_eq!(
            ova.read_small(ova.ovf().unwrap(), 1024).unwrap(),
            b"<Envelope/>"
        );
        let m = ova
            .read_small(ova.member("disk1.vmdk").unwrap(), 1024)
            .unwrap_err();
        assert!(m.to_string().contains("more than the 1024 allowed"), "{m}");
        let mut read = Vec::new();
        ova.open_member(ova.member(&long).unwrap())
            .unwrap()
            .read_to_end(&mut read)
            .unwrap();
        assert_eq!(read, b"long");
    }

    #[test]
    fn refuses_unsafe_names() {
        let dir = tempfile::tempdir().unwrap();
        let long = "a".repeat(256);
        let cases: &[(&[u8], &str)] = &[
            (b"../evil", "'..'"),
            (b"..", "'..'"),
            (b"/abs", "absolute"),
            (b"sub/x.vmdk", "plain files"),
            (b"./", "empty"),
            (b"x\x01y", "control"),
            (b"x\xffy", "UTF-8"),
        ];
        for (name, expected) in cases {
            let ova = build(
                dir.path(),
                &[Item::Raw(name, tar::EntryType::Regular, b"x")],
            );
            let m = refusal(Ova::open(&ova));
            assert!(m.contains(expected), "{name:?}: {m}");
        }
        let ova = build(dir.path(), &[Item::Long(&long, b"x")]);
        assert!(refusal(Ova::open(&ova)).contains("longer than 255"));
    }

    #[test]
    fn refuses_members_that_are_not_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        for (kind, expected) in [
            (tar::EntryType::Symlink, "symbolic link"),
            (tar::EntryType::Link, "hard link"),
            (tar::EntryType::Directory, "folder"),
            (tar::EntryType::Fifo, "FIFO"),
            (tar::EntryType::Char, "character device"),
            (tar::EntryType::Block, "block device"),
        ] {
            let ova = build(
                dir.path(),
                &[
                    Item::File("vm.ovf", b"x"),
                    Item::Raw(b"disk.vmdk", kind, b""),
                ],
            );
            let m = refusal(Ova::open(&ova));
            assert!(m.contains(expected) && m.contains("disk.vmdk"), "{m}");
        }
    }

    #[test]
    fn refuses_duplicates_too_many_members_and_manifests() {
        let dir = tempfile::tempdir().unwrap();
        let ova = build(
            dir.path(),
            &[Item::File("a.vmdk", b"1"), Item::File("./a.vmdk", b"2")],
        );
        assert!(refusal(Ova::open(&ova)).contains("\"a.vmdk\" twice"));
        let ova = build(
            dir.path(),
            &[Item::File("a.mf", b"1"), Item::File("b.mf", b"2")],
        );
        assert!(refusal(Ova::open(&ova)).contains("2 manifests"));
        let names: Vec<String> = (0..1001).map(|i| format!("f{i}")).collect();
        let items: Vec<Item> = names.iter().map(|n| Item::File(n, b"")).collect();
        let ova = build(dir.path(), &items);
        assert!(refusal(Ova::open(&ova)).contains("more than 1000 members"));
    }

    #[test]
    fn refuses_huge_long_name_records() {
        let dir = tempfile::tempdir().unwrap();
        let record = vec![b'a'; 100 * 1024];
        let ova = build(
            dir.path(),
            &[Item::Raw(
                b"././@LongLink",
                tar::EntryType::GNULongName,
                &record,
            )],
        );
        let m = refusal(Ova::open(&ova));
        assert!(m.contains("long-name or PAX record"), "{m}");
    }

    #[test]
    fn ovf_must_be_unique() {
        let dir = tempfile::tempdir().unwrap();
        let ova = build(dir.path(), &[Item::File("a.vmdk", b"1")]);
        let m = Ova::open(&ova).unwrap().ovf().unwrap_err().to_string();
        assert!(m.contains("no OVF descriptor"), "{m}");
        let ova = build(
            dir.path(),
            &[Item::File("a.ovf", b"1"), Item::File("b.OVF", b"2")],
        );
        let m = Ova::open(&ova).unwrap().ovf().unwrap_err().to_string();
        assert!(m.contains("2 OVF descriptors"), "{m}");
        assert!(Ova::open(&ova).unwrap().manifest().is_none());
    }

    #[test]
    fn refuses_truncated_archives() {
        let dir = tempfile::tempdir().unwrap();
        let ova = build(
            dir.path(),
            &[
                Item::File("vm.ovf", b"x"),
                Item::File("disk.vmdk", &[7u8; 8192]),
            ],
        );
        let file = std::fs::OpenOptions::new().write(true).open(&ova).unwrap();
        file.set_len(512 * 4).unwrap();
        let m = refusal(Ova::open(&ova));
        assert!(m.contains("truncated") && m.contains("disk.vmdk"), "{m}");
        std::fs::write(&ova, b"not a tar archive at all").unwrap();
        assert!(Ova::open(&ova).is_err());
    }
}
