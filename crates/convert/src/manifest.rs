//! OVF manifests (`.mf`): one line per file of the package,
//! `SHA256(disk1.vmdk)= 0a1b…` (DSP0243 §5.1). ovftool writes SHA-1 (old
//! versions), SHA-256 (the default) or SHA-512; VirtualBox writes SHA-1 or
//! SHA-256. Some writers leave out the space after `=`, some end lines with
//! CRLF; both are accepted. Digests are kept in lower-case hex.
//!
//! A manifest is outside input: every line must parse, every digest must have
//! its algorithm's length, and a file may be listed only once (two lines for
//! one file would leave "which digest counts" to chance).

use crate::{ConvertError, Result};
use sha1::Sha1;
use sha2::{Digest, Sha256, Sha512};
use std::io::Read;
use std::path::Path;

/// A digest algorithm a manifest may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigestAlgorithm {
    Sha1,
    Sha256,
    Sha512,
}

impl DigestAlgorithm {
    /// The spelling in manifests (`SHA256`).
    pub fn as_str(self) -> &'static str {
        match self {
            DigestAlgorithm::Sha1 => "SHA1",
            DigestAlgorithm::Sha256 => "SHA256",
            DigestAlgorithm::Sha512 => "SHA512",
        }
    }

    /// The algorithm a manifest names (`SHA256`, case-insensitive).
    pub fn from_name(name: &str) -> Option<DigestAlgorithm> {
        match name.to_ascii_uppercase().as_str() {
            "SHA1" => Some(DigestAlgorithm::Sha1),
            "SHA256" => Some(DigestAlgorithm::Sha256),
            "SHA512" => Some(DigestAlgorithm::Sha512),
            _ => None,
        }
    }

    /// Length of a digest in hex digits.
    pub fn hex_len(self) -> usize {
        match self {
            DigestAlgorithm::Sha1 => 40,
            DigestAlgorithm::Sha256 => 64,
            DigestAlgorithm::Sha512 => 128,
        }
    }
}

/// One line of a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEntry {
    pub algorithm: DigestAlgorithm,
    /// The file name as written between the parentheses.
    pub file: String,
    /// Lower-case hex.
    pub digest: String,
}

/// Longest manifest line quoted in an error message.
const QUOTE_MAX: usize = 80;

fn quote(line: &str) -> String {
    if line.chars().count() <= QUOTE_MAX {
        format!("{line:?}")
    } else {
        let head: String = line.chars().take(QUOTE_MAX).collect();
        format!("{head:?}…")
    }
}

/// Parses the text of a manifest (`what` names it in messages).
pub fn parse(text: &str, what: &str) -> Result<Vec<ManifestEntry>> {
    let mut entries: Vec<ManifestEntry> = Vec::new();
    for (index, raw) in text.split('\n').enumerate() {
        let number = index + 1;
        let line = raw.strip_suffix('\r').unwrap_or(raw).trim();
        if line.is_empty() {
            continue;
        }
        let malformed = |why: &str| {
            ConvertError::invalid(format!(
                "manifest {what} line {number}: {why}: {} (expected `SHA256(file)= digest`)",
                quote(line)
            ))
        };
        let (name, rest) = line.split_once('(').ok_or_else(|| malformed("no `(`"))?;
        // The last `)=` ends the file name, so names with parentheses work.
        let (file, digest) = rest.rsplit_once(")=").ok_or_else(|| malformed("no `)=`"))?;
        let algorithm = DigestAlgorithm::from_name(name.trim()).ok_or_else(|| {
            malformed("unknown digest algorithm (SHA1, SHA256 and SHA512 are accepted)")
        })?;
        if file.is_empty() {
            return Err(malformed("empty file name"));
        }
        let digest = digest.trim();
        if digest.len() != algorithm.hex_len() || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(malformed(&format!(
                "a {} digest is {} hex digits",
                algorithm.as_str(),
                algorithm.hex_len()
            )));
        }
        if let Some(previous) = entries.iter().find(|e| e.file == file) {
            return Err(ConvertError::invalid(format!(
                "manifest {what} line {number}: {file:?} is listed twice (also as {}({}))",
                previous.algorithm.as_str(),
                previous.file
            )));
        }
        entries.push(ManifestEntry {
            algorithm,
            file: file.to_string(),
            digest: digest.to_ascii_lowercase(),
        });
    }
    Ok(entries)
}

fn hash_all<D: Digest>(mut reader: impl Read) -> std::io::Result<String> {
    let mut hasher = D::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The lower-case hex digest of everything `reader` yields.
pub fn digest_reader(algorithm: DigestAlgorithm, reader: impl Read) -> std::io::Result<String> {
    match algorithm {
        DigestAlgorithm::Sha1 => hash_all::<Sha1>(reader),
        DigestAlgorithm::Sha256 => hash_all::<Sha256>(reader),
        DigestAlgorithm::Sha512 => hash_all::<Sha512>(reader),
    }
}

/// Checks every entry: opens its file through `open` (whose errors are
/// returned as they are), hashes it and compares. A mismatch is refused
/// (`what` names the manifest).
pub fn verify(
    entries: &[ManifestEntry],
    what: &str,
    mut open: impl FnMut(&str) -> Result<Box<dyn Read>>,
) -> Result<()> {
    for entry in entries {
        let reader = open(&entry.file)?;
        let actual = digest_reader(entry.algorithm, reader)
            .map_err(|e| ConvertError::io("cannot hash", Path::new(&entry.file), e))?;
        if actual != entry.digest {
            return Err(ConvertError::refused(format!(
                "manifest {what}: digest of {} does not match (manifest {} {}, file {})",
                entry.file,
                entry.algorithm.as_str().to_ascii_lowercase(),
                entry.digest,
                actual
            )));
        }
    }
    Ok(())
}

/// A SHA-256 manifest of `(file name, lower-case hex digest)` pairs, in the
/// order given, one `SHA256(name)= digest` line each (ovftool's spelling).
/// Names are the caller's own plain file names (no newline, no `)=`).
pub fn write_sha256(entries: &[(String, String)]) -> String {
    let mut out = String::new();
    for (file, digest) in entries {
        debug_assert!(!file.contains('\n') && !file.contains(")="), "{file:?}");
        out.push_str("SHA256(");
        out.push_str(file);
        out.push_str(")= ");
        out.push_str(&digest.to_ascii_lowercase());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ABC_SHA1: &str = "a9993e364706816aba3e25717850c26c9cd0d89d";
    const ABC_SHA256: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    const ABC_SHA512: &str = "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a\
                              2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f";

    #[test]
    fn digests_of_known_inputs() {
        let d = |a| digest_reader(a, &b"abc"[..]).unwrap();
        assert_eq!(d(DigestAlgorithm::Sha1), ABC_SHA1);
        assert_eq!(d(DigestAlgorithm::Sha256), ABC_SHA256);
        assert_eq!(d(DigestAlgorithm::Sha512), ABC_SHA512);
        assert_eq!(
            digest_reader(DigestAlgorithm::Sha256, std::io::empty()).unwrap(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn parses_ovftool_and_virtualbox_spellings() {
        let text = format!(
            "SHA256(vm.ovf)= {ABC_SHA256}\r\n\r\nSHA1(vm-disk1.vmdk)={}\n  \nSHA512(a (copy).iso)= {ABC_SHA512}\n",
            ABC_SHA1.to_ascii_uppercase()
        );
        let entries = parse(&text, "vm.mf").unwrap();
        assert_eq!(
            entries,
            vec![
                ManifestEntry {
                    algorithm: DigestAlgorithm::Sha256,
                    file: "vm.ovf".into(),
                    digest: ABC_SHA256.into()
                },
                ManifestEntry {
                    algorithm: DigestAlgorithm::Sha1,
                    file: "vm-disk1.vmdk".into(),
                    digest: ABC_SHA1.into()
                },
                ManifestEntry {
                    algorithm: DigestAlgorithm::Sha512,
                    file: "a (copy).iso".into(),
                    digest: ABC_SHA512.into()
                },
            ]
        );
        assert_eq!(parse("", "empty.mf").unwrap(), vec![]);
    }

    #[test]
    fn malformed_lines_are_named() {
        let cases = [
            (format!("SHA256(a.ovf)= {ABC_SHA256}\ngarbage"), "line 2"),
            (
                format!("MD5(a.ovf)= {ABC_SHA256}"),
                "unknown digest algorithm",
            ),
            (format!("SHA256(a.ovf) {ABC_SHA256}"), "no `)=`"),
            (format!("SHA256()= {ABC_SHA256}"), "empty file name"),
            (format!("SHA256(a.ovf)= {ABC_SHA1}"), "64 hex digits"),
            (format!("SHA1(a.ovf)= {}", "z".repeat(40)), "40 hex digits"),
        ];
        for (text, expected) in cases {
            let error = parse(&text, "x.mf").unwrap_err();
            assert!(matches!(error, ConvertError::Invalid(_)), "{error}");
            let message = error.to_string();
            assert!(message.contains("manifest x.mf line"), "{message}");
            assert!(message.contains(expected), "{message}");
        }
    }

    #[test]
    fn duplicate_file_is_an_error() {
        let text = format!("SHA256(d.vmdk)= {ABC_SHA256}\nSHA1(d.vmdk)= {ABC_SHA1}\n");
        let message = parse(&text, "x.mf").unwrap_err().to_string();
        assert!(message.contains("listed twice"), "{message}");
        assert!(message.contains("line 2"), "{message}");
    }

    fn opener(
        files: &'static [(&'static str, &'static [u8])],
    ) -> impl FnMut(&str) -> Result<Box<dyn Read>> {
        move |name: &str| match files.iter().find(|(n, _)| *n == name) {
            Some((_, data)) => Ok(Box::new(*data) as Box<dyn Read>),
            None => Err(ConvertError::invalid(format!("no member {name}"))),
        }
    }

    #[test]
    fn verify_accepts_matching_and_refuses_mismatching_files() {
        let entries = parse(
            &format!("SHA256(a.ovf)= {ABC_SHA256}\nSHA1(disk1.vmdk)= {ABC_SHA1}\n"),
            "vm.mf",
        )
        .unwrap();
        verify(
            &entries,
            "vm.mf",
            opener(&[("a.ovf", b"abc"), ("disk1.vmdk", b"abc")]),
        )
        .unwrap();

        let error = verify(
            &entries,
            "vm.mf",
            opener(&[("a.ovf", b"abc"), ("disk1.vmdk", b"abd")]),
        )
        .unwrap_err();
        assert!(matches!(error, ConvertError::Refused(_)), "{error}");
        let message = error.to_string();
        assert!(
            message.contains("manifest vm.mf: digest of disk1.vmdk does not match"),
            "{message}"
        );
        assert!(
            message.contains(&format!("manifest sha1 {ABC_SHA1}")),
            "{message}"
        );

        let error = verify(&entries, "vm.mf", opener(&[("a.ovf", b"abc")])).unwrap_err();
        assert_eq!(error.to_string(), "no member disk1.vmdk");
    }

    #[test]
    fn written_manifest_parses_back() {
        let text = write_sha256(&[
            ("vm.ovf".into(), ABC_SHA256.into()),
            ("vm-disk1.vmdk".into(), ABC_SHA256.to_ascii_uppercase()),
        ]);
        assert_eq!(
            text,
            format!("SHA256(vm.ovf)= {ABC_SHA256}\nSHA256(vm-disk1.vmdk)= {ABC_SHA256}\n")
        );
        let entries = parse(&text, "vm.mf").unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1].file, "vm-disk1.vmdk");
        assert_eq!(entries[1].digest, ABC_SHA256);
    }
}
