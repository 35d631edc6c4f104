//! The on-memory and on-disk layouts the probe writes and the host checkers read.
//!
//! This module is the single definition of both oracles' formats: the probe (in the guest)
//! writes them and `ferry-test-support` (on the host) verifies them. The checksum is the
//! exception on purpose: the probe computes CRC-32 with the small implementation below,
//! while the host verifies with an independent implementation (`crc32fast`), so a bug in
//! either shows up as a rejected record instead of cancelling out.
//!
//! Both layouts are made of little-endian 64-bit words so that the probe can access guest
//! memory with aligned volatile word reads and writes.

/// Size of a memory-oracle page and of a disk-oracle record, in bytes.
pub const BLOCK_SIZE: usize = 4096;
/// 64-bit words in a page or record.
pub const BLOCK_WORDS: usize = BLOCK_SIZE / 8;

/// The memory oracle's page layout.
///
/// | word | bytes   | content                                                        |
/// |------|---------|----------------------------------------------------------------|
/// | 0    | 0       | the counter: bumped by one (mod 256) on every pass             |
/// | 0    | 1..8    | zero                                                           |
/// | 1    | 8..16   | [`MEM_MAGIC`]                                                  |
/// | 2    | 16..24  | the page's index in the working set                            |
/// | 3    | 24..32  | the number of pages in the working set                         |
/// | 4..  | 32..4096| [`mem::pattern_word`] of the index and word number             |
///
/// The counter is the QEMU migration-test model: the probe bumps pages in index order, so
/// at any instant every page equals its predecessor except at most one place where it is
/// exactly one behind. The index and pattern words catch a page that arrived at the wrong
/// address or was only partly copied.
pub mod mem {
    use super::splitmix64;

    /// `b"FERRYMEM"` read as a little-endian word.
    pub const MEM_MAGIC: u64 = u64::from_le_bytes(*b"FERRYMEM");
    /// Byte offset of the counter within a page.
    pub const COUNTER_OFFSET: usize = 0;
    /// Bits of word 0 that are not the counter and must be zero.
    pub const WORD0_FIXED_MASK: u64 = !0xff;
    /// Word number of the magic.
    pub const MAGIC_WORD: usize = 1;
    /// Word number of the page index.
    pub const INDEX_WORD: usize = 2;
    /// Word number of the working-set page count.
    pub const COUNT_WORD: usize = 3;
    /// First word of the index-derived pattern.
    pub const PATTERN_FIRST_WORD: usize = 4;

    /// The pattern word `word` (>= [`PATTERN_FIRST_WORD`]) of page `index`.
    pub fn pattern_word(index: u64, word: usize) -> u64 {
        splitmix64(index.wrapping_mul(super::BLOCK_WORDS as u64) ^ word as u64)
    }

    /// The expected value of word `word` of page `index` in a working set of `pages`
    /// pages, with the counter byte masked out (word 0 is expected to be zero outside
    /// the counter: compare it under [`WORD0_FIXED_MASK`]).
    pub fn expected_word(index: u64, pages: u64, word: usize) -> u64 {
        match word {
            0 => 0,
            MAGIC_WORD => MEM_MAGIC,
            INDEX_WORD => index,
            COUNT_WORD => pages,
            w => pattern_word(index, w),
        }
    }
}

/// The disk oracle's record layout (one record per [`super::BLOCK_SIZE`] slot).
///
/// | bytes     | content                                                              |
/// |-----------|----------------------------------------------------------------------|
/// | 0..8      | [`DISK_MAGIC`]                                                       |
/// | 8..12     | [`DISK_FORMAT_VERSION`] (u32)                                        |
/// | 12..16    | CRC-32 (IEEE) of the whole record with these four bytes zeroed (u32) |
/// | 16..24    | sequence number, starting at 1 on every boot                          |
/// | 24..32    | boot id: random per boot, so records of an earlier boot are told apart|
/// | 32..4096  | [`disk::payload_word`] of seq, boot id and word number                |
///
/// Record `seq` lives in slot `(seq - 1) % slots` of the device, where `slots` is the
/// device size divided by the record size: the device is a ring.
pub mod disk {
    use super::{splitmix64, BLOCK_SIZE, BLOCK_WORDS};

    /// `b"FERRYDSK"` read as a little-endian word.
    pub const DISK_MAGIC: u64 = u64::from_le_bytes(*b"FERRYDSK");
    /// Bumped whenever the layout changes, so an old checker refuses new records.
    pub const DISK_FORMAT_VERSION: u32 = 1;
    /// Byte range of the magic.
    pub const MAGIC_RANGE: std::ops::Range<usize> = 0..8;
    /// Byte range of the version.
    pub const VERSION_RANGE: std::ops::Range<usize> = 8..12;
    /// Byte range of the CRC.
    pub const CRC_RANGE: std::ops::Range<usize> = 12..16;
    /// Byte range of the sequence number.
    pub const SEQ_RANGE: std::ops::Range<usize> = 16..24;
    /// Byte range of the boot id.
    pub const BOOT_ID_RANGE: std::ops::Range<usize> = 24..32;
    /// First payload word.
    pub const PAYLOAD_FIRST_WORD: usize = 4;

    /// Payload word `word` (>= [`PAYLOAD_FIRST_WORD`]) of record `seq` of boot `boot_id`.
    pub fn payload_word(boot_id: u64, seq: u64, word: usize) -> u64 {
        splitmix64(
            seq.wrapping_mul(BLOCK_WORDS as u64)
                .wrapping_add(word as u64)
                ^ boot_id,
        )
    }

    /// The slot (0-based) that record `seq` (>= 1) occupies in a ring of `slots` slots.
    pub fn slot_of(seq: u64, slots: u64) -> u64 {
        (seq - 1) % slots
    }

    /// Fills `buf` with record `seq` of boot `boot_id`, checksum included.
    pub fn encode_record(buf: &mut [u8; BLOCK_SIZE], boot_id: u64, seq: u64) {
        buf[MAGIC_RANGE].copy_from_slice(&DISK_MAGIC.to_le_bytes());
        buf[VERSION_RANGE].copy_from_slice(&DISK_FORMAT_VERSION.to_le_bytes());
        buf[CRC_RANGE].fill(0);
        buf[SEQ_RANGE].copy_from_slice(&seq.to_le_bytes());
        buf[BOOT_ID_RANGE].copy_from_slice(&boot_id.to_le_bytes());
        for w in PAYLOAD_FIRST_WORD..BLOCK_WORDS {
            buf[w * 8..w * 8 + 8].copy_from_slice(&payload_word(boot_id, seq, w).to_le_bytes());
        }
        let crc = super::crc32(&buf[..]);
        buf[CRC_RANGE].copy_from_slice(&crc.to_le_bytes());
    }
}

/// SplitMix64's output function: a cheap bijective mixer, so that neighbouring indices
/// give unrelated words and a shifted or swapped block cannot pass for another.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// CRC-32 (IEEE 802.3, reflected, the zlib/`crc32fast` one). Bitwise with a table built at
/// compile time: the probe has no dependencies and writes at most a few hundred records a
/// second, so speed does not matter.
pub fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn record_round_trips_and_checksum_covers_payload() {
        let mut buf = [0u8; BLOCK_SIZE];
        disk::encode_record(&mut buf, 0xDEAD_BEEF, 42);
        assert_eq!(&buf[0..8], b"FERRYDSK");
        assert_eq!(u64::from_le_bytes(buf[16..24].try_into().unwrap()), 42);
        let stored = u32::from_le_bytes(buf[12..16].try_into().unwrap());
        let mut zeroed = buf;
        zeroed[12..16].fill(0);
        assert_eq!(crc32(&zeroed), stored);
        zeroed[4000] ^= 1;
        assert_ne!(crc32(&zeroed), stored);
    }

    #[test]
    fn pattern_differs_between_neighbouring_pages() {
        assert_ne!(mem::pattern_word(1, 4), mem::pattern_word(2, 4));
        assert_ne!(mem::pattern_word(1, 4), mem::pattern_word(1, 5));
        assert_eq!(mem::expected_word(7, 10, mem::INDEX_WORD), 7);
        assert_eq!(mem::expected_word(7, 10, mem::COUNT_WORD), 10);
    }

    #[test]
    fn ring_slots_wrap() {
        assert_eq!(disk::slot_of(1, 4), 0);
        assert_eq!(disk::slot_of(4, 4), 3);
        assert_eq!(disk::slot_of(5, 4), 0);
    }
}
