//! The disk oracle, host side: verify the probe's records in a raw disk image.
//!
//! The probe writes 4 KiB records with sequence numbers 1, 2, 3, ... to its device (by
//! default partition 2 of the test disk) as a ring, flushes each one and then prints
//! `disk-flushed seq=N`. So for the last N the console reported, every record that the
//! ring still holds up to N must be on the disk, intact, from the same boot. The record
//! after N may be half-written (the guest was stopped mid-write) and is not checked; it
//! shares a slot with the oldest record of a full ring, so that one is not checked either.
//!
//! The checksum is verified with `crc32fast`, independently of the probe's own CRC code.
//! qcow2 images must be converted to raw first (`qemu-img convert -O raw`).

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::RangeInclusive;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ferry_probe::format::{disk, BLOCK_SIZE, BLOCK_WORDS};

/// Size of a record and of a ring slot.
pub const RECORD_SIZE: usize = BLOCK_SIZE;
/// The test disk's partition number (1-based) holding the oracle's ring.
pub const ORACLE_PARTITION: u8 = 2;
/// The MBR partition type `guest/build.sh` gives the oracle's partition ("non-FS data").
pub const ORACLE_PARTITION_TYPE: u8 = 0xda;
const SECTOR: u64 = 512;

/// A byte range of a disk image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskRegion {
    /// Offset of the region in the image, in bytes.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl DiskRegion {
    /// Ring slots in the region (the probe uses the whole device).
    pub fn slots(&self) -> u64 {
        self.len / RECORD_SIZE as u64
    }

    /// Image offset of the slot holding record `seq`.
    pub fn record_offset(&self, seq: u64) -> u64 {
        self.offset + disk::slot_of(seq, self.slots()) * RECORD_SIZE as u64
    }
}

/// A primary partition from an MBR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MbrPartition {
    /// 1..=4.
    pub number: u8,
    /// The active (boot) flag.
    pub bootable: bool,
    /// Partition type byte.
    pub kind: u8,
    /// First sector (512 bytes).
    pub start_lba: u64,
    /// Length in sectors.
    pub sectors: u64,
}

impl MbrPartition {
    /// The partition as a byte range of the image.
    pub fn region(&self) -> DiskRegion {
        DiskRegion {
            offset: self.start_lba * SECTOR,
            len: self.sectors * SECTOR,
        }
    }
}

/// What a verified ring looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSummary {
    /// Slots in the ring.
    pub slots: u64,
    /// Boot id of the verified records.
    pub boot_id: u64,
    /// The sequence numbers verified (`None` if nothing was flushed yet).
    pub verified: Option<RangeInclusive<u64>>,
    /// The highest record found intact by following the sequence past the last flushed
    /// one (records written but not yet reported, or reported after the log was read).
    pub last_on_disk: u64,
}

/// Why an image was rejected. Record errors name the sequence number and the byte offset
/// of the record in the image.
#[derive(Debug, thiserror::Error)]
pub enum DiskOracleError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} has no MBR (bytes 510..512 are {sig:#06x}, not 0xaa55)")]
    NoMbr { path: PathBuf, sig: u16 },
    #[error("{path} has no partition {number} in its MBR")]
    NoPartition { path: PathBuf, number: u8 },
    #[error(
        "partition {number} of {path} has type {kind:#04x}, not the oracle's {ORACLE_PARTITION_TYPE:#04x}; is this the test guest's disk?"
    )]
    NotOracle { path: PathBuf, number: u8, kind: u8 },
    #[error("oracle region of {len} bytes holds fewer than 2 records")]
    RegionTooSmall { len: u64 },
    #[error("record {seq} at offset {offset} is missing (slot is all zeros)")]
    Missing { seq: u64, offset: u64 },
    #[error("record {seq} at offset {offset}: magic is {got:#018x}, not FERRYDSK")]
    BadMagic { seq: u64, offset: u64, got: u64 },
    #[error(
        "record {seq} at offset {offset}: format version {got}, this checker knows {}",
        disk::DISK_FORMAT_VERSION
    )]
    Version { seq: u64, offset: u64, got: u32 },
    #[error("record {seq} at offset {offset}: checksum {stored:#010x} stored, {computed:#010x} computed (corrupt record)")]
    Checksum {
        seq: u64,
        offset: u64,
        stored: u32,
        computed: u32,
    },
    #[error("record {seq} at offset {offset}: slot holds seq {got} instead (lost or stale write)")]
    WrongSeq { seq: u64, offset: u64, got: u64 },
    #[error("record {seq} at offset {offset}: boot id {got:#x}, expected {expected:#x} (record from another boot)")]
    WrongBoot {
        seq: u64,
        offset: u64,
        expected: u64,
        got: u64,
    },
    #[error("record {seq} at offset {offset}: payload word {word} is {got:#018x}, expected {expected:#018x}")]
    Payload {
        seq: u64,
        offset: u64,
        word: usize,
        expected: u64,
        got: u64,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> DiskOracleError + 'a {
    move |source| DiskOracleError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The primary partitions of an MBR disk image (empty entries left out).
pub fn mbr_partitions(path: &Path) -> Result<Vec<MbrPartition>, DiskOracleError> {
    let f = File::open(path).map_err(io_err("opening", path))?;
    let mut mbr = [0u8; 512];
    f.read_exact_at(&mut mbr, 0)
        .map_err(io_err("reading the MBR of", path))?;
    let sig = u16::from_le_bytes([mbr[510], mbr[511]]);
    if sig != 0xaa55 {
        return Err(DiskOracleError::NoMbr {
            path: path.to_path_buf(),
            sig,
        });
    }
    Ok((0..4)
        .filter_map(|i| {
            let e = &mbr[446 + 16 * i..446 + 16 * (i + 1)];
            let kind = e[4];
            let start_lba = u32::from_le_bytes(e[8..12].try_into().expect("4 bytes")) as u64;
            let sectors = u32::from_le_bytes(e[12..16].try_into().expect("4 bytes")) as u64;
            (kind != 0 && sectors != 0).then_some(MbrPartition {
                number: i as u8 + 1,
                bootable: e[0] == 0x80,
                kind,
                start_lba,
                sectors,
            })
        })
        .collect())
}

/// The oracle's region of a test disk: partition [`ORACLE_PARTITION`], which must have
/// type [`ORACLE_PARTITION_TYPE`].
pub fn oracle_region(path: &Path) -> Result<DiskRegion, DiskOracleError> {
    let part = mbr_partitions(path)?
        .into_iter()
        .find(|p| p.number == ORACLE_PARTITION)
        .ok_or_else(|| DiskOracleError::NoPartition {
            path: path.to_path_buf(),
            number: ORACLE_PARTITION,
        })?;
    if part.kind != ORACLE_PARTITION_TYPE {
        return Err(DiskOracleError::NotOracle {
            path: path.to_path_buf(),
            number: part.number,
            kind: part.kind,
        });
    }
    Ok(part.region())
}

/// A decoded, checksum-verified record.
struct Record {
    seq: u64,
    boot_id: u64,
}

fn read_record(
    f: &File,
    path: &Path,
    region: DiskRegion,
    seq: u64,
) -> Result<(Record, [u8; RECORD_SIZE]), DiskOracleError> {
    let offset = region.record_offset(seq);
    let mut buf = [0u8; RECORD_SIZE];
    f.read_exact_at(&mut buf, offset)
        .map_err(io_err("reading a record of", path))?;
    let u64_at = |r: std::ops::Range<usize>| u64::from_le_bytes(buf[r].try_into().expect("8"));
    let u32_at = |r: std::ops::Range<usize>| u32::from_le_bytes(buf[r].try_into().expect("4"));
    let magic = u64_at(disk::MAGIC_RANGE);
    if magic != disk::DISK_MAGIC {
        if buf.iter().all(|&b| b == 0) {
            return Err(DiskOracleError::Missing { seq, offset });
        }
        return Err(DiskOracleError::BadMagic {
            seq,
            offset,
            got: magic,
        });
    }
    let version = u32_at(disk::VERSION_RANGE);
    if version != disk::DISK_FORMAT_VERSION {
        return Err(DiskOracleError::Version {
            seq,
            offset,
            got: version,
        });
    }
    let stored = u32_at(disk::CRC_RANGE);
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&buf[..disk::CRC_RANGE.start]);
    hasher.update(&[0u8; 4]);
    hasher.update(&buf[disk::CRC_RANGE.end..]);
    let computed = hasher.finalize();
    if stored != computed {
        return Err(DiskOracleError::Checksum {
            seq,
            offset,
            stored,
            computed,
        });
    }
    Ok((
        Record {
            seq: u64_at(disk::SEQ_RANGE),
            boot_id: u64_at(disk::BOOT_ID_RANGE),
        },
        buf,
    ))
}

/// Reads record `seq` and checks everything about it, including that it belongs to
/// `boot_id` (if given) and that its payload is the one derived from seq and boot id.
fn check_record(
    f: &File,
    path: &Path,
    region: DiskRegion,
    seq: u64,
    boot_id: Option<u64>,
) -> Result<u64, DiskOracleError> {
    let offset = region.record_offset(seq);
    let (rec, buf) = read_record(f, path, region, seq)?;
    if rec.seq != seq {
        return Err(DiskOracleError::WrongSeq {
            seq,
            offset,
            got: rec.seq,
        });
    }
    if let Some(expected) = boot_id.filter(|&b| b != rec.boot_id) {
        return Err(DiskOracleError::WrongBoot {
            seq,
            offset,
            expected,
            got: rec.boot_id,
        });
    }
    for w in disk::PAYLOAD_FIRST_WORD..BLOCK_WORDS {
        let got = u64::from_le_bytes(buf[w * 8..w * 8 + 8].try_into().expect("8"));
        let expected = disk::payload_word(rec.boot_id, seq, w);
        if got != expected {
            return Err(DiskOracleError::Payload {
                seq,
                offset,
                word: w,
                expected,
                got,
            });
        }
    }
    Ok(rec.boot_id)
}

/// Verifies the ring in `region` of the raw image at `path` against the last sequence
/// number the console reported flushed (`last_flushed`, 0 if none).
pub fn verify_disk(
    path: &Path,
    region: DiskRegion,
    last_flushed: u64,
) -> Result<DiskSummary, DiskOracleError> {
    let slots = region.slots();
    if slots < 2 {
        return Err(DiskOracleError::RegionTooSmall { len: region.len });
    }
    let f = File::open(path).map_err(io_err("opening", path))?;
    if last_flushed == 0 {
        return Ok(DiskSummary {
            slots,
            boot_id: 0,
            verified: None,
            last_on_disk: 0,
        });
    }
    // The newest flushed record defines the boot; every older one must match it.
    let boot_id = check_record(&f, path, region, last_flushed, None)?;
    let first = last_flushed.saturating_sub(slots - 2).max(1);
    for seq in first..last_flushed {
        check_record(&f, path, region, seq, Some(boot_id))?;
    }
    // Follow the sequence past what was reported, for information only: stop at the
    // first slot that does not hold the next record of this boot.
    let mut last_on_disk = last_flushed;
    while last_on_disk - last_flushed < slots - 1
        && check_record(&f, path, region, last_on_disk + 1, Some(boot_id)).is_ok()
    {
        last_on_disk += 1;
    }
    Ok(DiskSummary {
        slots,
        boot_id,
        verified: Some(first..=last_flushed),
        last_on_disk,
    })
}

/// Verifies a test disk's oracle partition: [`oracle_region`] + [`verify_disk`].
pub fn verify_test_disk(path: &Path, last_flushed: u64) -> Result<DiskSummary, DiskOracleError> {
    verify_disk(path, oracle_region(path)?, last_flushed)
}

/// Flips one payload byte of record `seq`'s slot in the image (whatever it holds), so a
/// test can prove the checker rejects damage. Returns the image offset of the byte.
pub fn corrupt_record(path: &Path, region: DiskRegion, seq: u64) -> Result<u64, DiskOracleError> {
    let offset = region.record_offset(seq) + 1000;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err("opening for writing", path))?;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset)
        .map_err(io_err("reading", path))?;
    b[0] ^= 0x5a;
    f.write_all_at(&b, offset)
        .map_err(io_err("writing", path))?;
    Ok(offset)
}

/// Writes records `first..=last` of boot `boot_id` into `region` the way the probe does
/// (with the probe's own encoder), for tests of the checker.
pub fn write_records(
    path: &Path,
    region: DiskRegion,
    boot_id: u64,
    seqs: RangeInclusive<u64>,
) -> Result<(), DiskOracleError> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err("opening for writing", path))?;
    let mut buf = [0u8; RECORD_SIZE];
    for seq in seqs {
        disk::encode_record(&mut buf, boot_id, seq);
        f.write_all_at(&buf, region.record_offset(seq))
            .map_err(io_err("writing", path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const REGION: DiskRegion = DiskRegion {
        offset: 8192,
        len: 8 * RECORD_SIZE as u64,
    };

    fn image() -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file()
            .set_len(REGION.offset + REGION.len + 4096)
            .unwrap();
        f
    }

    #[test]
    fn intact_records_pass() {
        let img = image();
        write_records(img.path(), REGION, 77, 1..=5).unwrap();
        let s = verify_disk(img.path(), REGION, 5).unwrap();
        assert_eq!(
            (s.boot_id, s.verified, s.last_on_disk),
            (77, Some(1..=5), 5)
        );
    }

    #[test]
    fn unreported_records_are_counted_not_required() {
        let img = image();
        write_records(img.path(), REGION, 77, 1..=6).unwrap();
        let s = verify_disk(img.path(), REGION, 4).unwrap();
        assert_eq!((s.verified, s.last_on_disk), (Some(1..=4), 6));
    }

    #[test]
    fn wrapped_ring_checks_only_what_it_still_holds() {
        let img = image();
        // 8 slots; 1..=20 written: slots hold 17..=20 and 13..=16.
        write_records(img.path(), REGION, 9, 1..=20).unwrap();
        let s = verify_disk(img.path(), REGION, 20).unwrap();
        assert_eq!(
            s.verified,
            Some(14..=20),
            "oldest slot may be overwritten by seq 21"
        );
    }

    #[test]
    fn missing_flushed_record_fails() {
        let img = image();
        write_records(img.path(), REGION, 77, 1..=3).unwrap();
        let err = verify_disk(img.path(), REGION, 5).unwrap_err();
        assert!(
            matches!(err, DiskOracleError::Missing { seq: 5, offset } if offset == 8192 + 4 * 4096),
            "{err}"
        );
    }

    #[test]
    fn corrupt_record_is_named_precisely() {
        let img = image();
        write_records(img.path(), REGION, 77, 1..=5).unwrap();
        let at = corrupt_record(img.path(), REGION, 3).unwrap();
        assert_eq!(at, 8192 + 2 * 4096 + 1000);
        let err = verify_disk(img.path(), REGION, 5).unwrap_err();
        assert!(
            matches!(err, DiskOracleError::Checksum { seq: 3, .. }),
            "{err}"
        );
    }

    #[test]
    fn stale_record_is_a_wrong_seq() {
        let img = image();
        // 8 slots: after 1..=10 the ring has wrapped. Record 11 (slot 2, still holding
        // 3) is lost, 12 arrives: the checker must see the stale 3 where 11 belongs.
        write_records(img.path(), REGION, 77, 1..=10).unwrap();
        write_records(img.path(), REGION, 77, 12..=12).unwrap();
        let err = verify_disk(img.path(), REGION, 12).unwrap_err();
        assert!(
            matches!(
                err,
                DiskOracleError::WrongSeq {
                    seq: 11,
                    got: 3,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn record_from_another_boot_fails() {
        let img = image();
        write_records(img.path(), REGION, 1, 1..=5).unwrap();
        write_records(img.path(), REGION, 2, 1..=3).unwrap();
        // The console of boot 1 said 5; boot 2 overwrote 1..=3 since.
        let err = verify_disk(img.path(), REGION, 5).unwrap_err();
        assert!(
            matches!(
                err,
                DiskOracleError::WrongBoot {
                    seq: 1,
                    expected: 1,
                    got: 2,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn nothing_flushed_is_trivially_fine() {
        let img = image();
        let s = verify_disk(img.path(), REGION, 0).unwrap();
        assert_eq!(s.verified, None);
    }

    #[test]
    fn mbr_is_parsed() {
        let img = image();
        let mut mbr = [0u8; 512];
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        // Partition 2: type 0xda, LBA 16, 64 sectors.
        let e = &mut mbr[446 + 16..446 + 32];
        e[4] = 0xda;
        e[8..12].copy_from_slice(&16u32.to_le_bytes());
        e[12..16].copy_from_slice(&64u32.to_le_bytes());
        img.as_file().write_all_at(&mbr, 0).unwrap();
        let parts = mbr_partitions(img.path()).unwrap();
        assert_eq!(parts.len(), 1);
        assert_eq!(
            oracle_region(img.path()).unwrap(),
            DiskRegion {
                offset: 8192,
                len: 32768
            }
        );
    }

    #[test]
    fn image_without_mbr_is_refused() {
        let img = image();
        let err = oracle_region(img.path()).unwrap_err();
        assert!(
            matches!(err, DiskOracleError::NoMbr { sig: 0, .. }),
            "{err}"
        );
    }
}
