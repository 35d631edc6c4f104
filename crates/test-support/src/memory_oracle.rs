//! The memory oracle, host side: verify a dump of the probe's working set, and damage a
//! running guest's memory on purpose to prove the oracle can fail.
//!
//! The probe keeps a working set of pages at a known guest-physical address (see
//! `guest/README.md`; by default 32 MiB at 448 MiB in a 512 MiB guest) and bumps the
//! first byte of every page in index order, forever. On a paused guest, dumped with QMP
//! `pmemsave`, the counters therefore read `v+1, v+1, ..., v+1, v, v, ..., v`: every page
//! equals its predecessor except at most one place where it is exactly one behind
//! (mod 256). Each page also carries a magic, its own index, the page count and an
//! index-derived pattern (layout in `ferry_probe::format::mem`). A lost page (stale
//! counter), a misplaced page (wrong index) or a torn page (pattern) all fail.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use ferry_probe::format::{mem, BLOCK_SIZE, BLOCK_WORDS};

/// Page size of the working set.
pub const PAGE_SIZE: usize = BLOCK_SIZE;

/// What a dump that passed looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpSummary {
    /// Pages verified.
    pub pages: usize,
    /// Counter of page 0 (the value of the pages already bumped in the current pass).
    pub counter: u8,
    /// The page where the counter steps down by one (the probe's position), if the dump
    /// was not taken exactly at a pass boundary.
    pub step_at: Option<usize>,
}

/// Why a dump was rejected; always names the page and, where it applies, the byte offset
/// within it, what was expected and what was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemoryOracleError {
    #[error("dump is {len} bytes, expected {pages} pages of {PAGE_SIZE} bytes ({expected} bytes)")]
    WrongSize {
        len: usize,
        pages: usize,
        expected: usize,
    },
    #[error(
        "page {page}: {what} at byte offset {offset} is {got:#018x}, expected {expected:#018x}"
    )]
    Word {
        page: usize,
        offset: usize,
        what: &'static str,
        expected: u64,
        got: u64,
    },
    #[error(
        "page {page}: counter is {got:#04x} but page {} has {prev:#04x}; a page must equal its predecessor or be exactly one behind (lost or stale page)",
        .page - 1
    )]
    CounterJump { page: usize, prev: u8, got: u8 },
    #[error(
        "pages {first} and {second} both step down by one; only one place may (a page from an older pass survived)"
    )]
    TwoSteps { first: usize, second: usize },
}

fn what(word: usize) -> &'static str {
    match word {
        0 => "reserved bits of the counter word",
        mem::MAGIC_WORD => "magic",
        mem::INDEX_WORD => "page index (misplaced page?)",
        mem::COUNT_WORD => "page count",
        _ => "pattern",
    }
}

fn word_at(page: &[u8], w: usize) -> u64 {
    u64::from_le_bytes(page[w * 8..w * 8 + 8].try_into().expect("8 bytes"))
}

/// Verifies a dump of the whole working set (`expected_pages` pages, starting at the
/// working set's base). Checks every page's fixed words first, in page order, then the
/// counters, and reports the first violation.
pub fn verify_dump(dump: &[u8], expected_pages: usize) -> Result<DumpSummary, MemoryOracleError> {
    let expected_len = expected_pages * PAGE_SIZE;
    if dump.len() != expected_len || expected_pages == 0 {
        return Err(MemoryOracleError::WrongSize {
            len: dump.len(),
            pages: expected_pages,
            expected: expected_len,
        });
    }
    let pages: Vec<&[u8]> = dump.chunks_exact(PAGE_SIZE).collect();
    for (i, page) in pages.iter().enumerate() {
        for w in 0..BLOCK_WORDS {
            let mut got = word_at(page, w);
            if w == 0 {
                got &= mem::WORD0_FIXED_MASK;
            }
            let expected = mem::expected_word(i as u64, expected_pages as u64, w);
            if got != expected {
                return Err(MemoryOracleError::Word {
                    page: i,
                    offset: w * 8,
                    what: what(w),
                    expected,
                    got,
                });
            }
        }
    }
    let counter = |i: usize| pages[i][mem::COUNTER_OFFSET];
    let mut step_at = None;
    for i in 1..expected_pages {
        let (prev, got) = (counter(i - 1), counter(i));
        if got == prev {
            continue;
        }
        if got != prev.wrapping_sub(1) {
            return Err(MemoryOracleError::CounterJump { page: i, prev, got });
        }
        if let Some(first) = step_at {
            return Err(MemoryOracleError::TwoSteps { first, second: i });
        }
        step_at = Some(i);
    }
    // With every step 0 or -1 and at most one -1, page 0 is automatically equal to the
    // last page or one ahead of it: the wrap-around needs no separate check.
    Ok(DumpSummary {
        pages: expected_pages,
        counter: counter(0),
        step_at,
    })
}

/// Why guest memory could not be read or written from the host.
#[derive(Debug, thiserror::Error)]
pub enum GuestMemoryError {
    #[error("reading {path}")]
    Maps {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "no shared memfd RAM mapping in /proc/{pid}/maps; was QEMU started with -object memory-backend-memfd?"
    )]
    NoRamMapping { pid: u32 },
    #[error(
        "{count} memfd RAM backends mapped in /proc/{pid}/maps (at {starts}); cannot tell which is guest RAM"
    )]
    AmbiguousRamMapping {
        pid: u32,
        count: usize,
        starts: String,
    },
    #[error(
        "guest-physical range {gpa:#x}+{len:#x} is outside the {size:#x}-byte RAM mapping (offset {file_offset:#x}); only guests of at most 2 GiB map GPA 1:1 to the backend"
    )]
    OutOfRange {
        gpa: u64,
        len: usize,
        file_offset: u64,
        size: u64,
    },
    #[error("accessing {len} bytes at host address {addr:#x} through /proc/{pid}/mem")]
    Access {
        pid: u32,
        addr: u64,
        len: usize,
        #[source]
        source: io::Error,
    },
}

/// The host address in QEMU's process that backs guest-physical address `gpa` for
/// `len` bytes, found through the memfd RAM backend's mapping.
///
/// Ferry starts QEMU with `-object memory-backend-memfd,id=ram0` and
/// `-machine ...,memory-backend=ram0`. QEMU 10.0 names the memfd after the backend's
/// *type*, not its id: the mapping shows in `/proc/<pid>/maps` as
/// `/memfd:memory-backend-memfd (deleted)` (shared, read-write). So the guest's RAM is
/// the only such mapping; with several memfd backends (NUMA nodes) this refuses to
/// guess. For a guest of at most 2 GiB all RAM sits below the PCI hole, so the offset
/// in the memfd equals the guest-physical address.
fn host_address(pid: u32, gpa: u64, len: usize) -> Result<u64, GuestMemoryError> {
    let path = PathBuf::from(format!("/proc/{pid}/maps"));
    let maps = std::fs::read_to_string(&path).map_err(|source| GuestMemoryError::Maps {
        path: path.clone(),
        source,
    })?;
    let mut found: Vec<(u64, u64, u64)> = Vec::new();
    for line in maps.lines() {
        // start-end perms offset dev inode path...
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms), Some(offset)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let name = fields.skip(2).collect::<Vec<_>>().join(" ");
        let name = name.strip_suffix(" (deleted)").unwrap_or(&name);
        // Older QEMUs named the memfd after the backend id; accept Ferry's id too.
        if !(name == RAM_MEMFD_NAME || name == "/memfd:ram0") || !perms.starts_with("rw") {
            continue;
        }
        let parsed = (|| {
            let (s, e) = range.split_once('-')?;
            Some((
                u64::from_str_radix(s, 16).ok()?,
                u64::from_str_radix(e, 16).ok()?,
                u64::from_str_radix(offset, 16).ok()?,
            ))
        })();
        found.extend(parsed);
    }
    let (start, end, file_offset) = match found.as_slice() {
        [] => return Err(GuestMemoryError::NoRamMapping { pid }),
        [one] => *one,
        many => {
            return Err(GuestMemoryError::AmbiguousRamMapping {
                pid,
                count: many.len(),
                starts: many
                    .iter()
                    .map(|(s, _, _)| format!("{s:#x}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            })
        }
    };
    let size = end - start;
    if gpa < file_offset || gpa + len as u64 > file_offset + size {
        return Err(GuestMemoryError::OutOfRange {
            gpa,
            len,
            file_offset,
            size,
        });
    }
    Ok(start + (gpa - file_offset))
}

/// How QEMU 10.0 names a `memory-backend-memfd`'s file in `/proc/<pid>/maps`.
pub const RAM_MEMFD_NAME: &str = "/memfd:memory-backend-memfd";

/// Writes `bytes` into a running QEMU's guest memory at guest-physical address `gpa`,
/// behind the guest's back (through `/proc/<pid>/mem`; needs root or ptrace rights).
/// For tests that prove an oracle can fail.
///
/// The write bypasses QEMU's dirty tracking: during a migration it may never reach the
/// destination. Inject before or after a migration, not during one.
pub fn inject_guest_memory(pid: u32, gpa: u64, bytes: &[u8]) -> Result<(), GuestMemoryError> {
    let addr = host_address(pid, gpa, bytes.len())?;
    let access = |source| GuestMemoryError::Access {
        pid,
        addr,
        len: bytes.len(),
        source,
    };
    let mem = OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .map_err(access)?;
    mem.write_all_at(bytes, addr).map_err(access)
}

/// Reads `len` bytes of a running QEMU's guest memory at guest-physical address `gpa`.
/// Unlike `pmemsave` it does not need the guest paused, so the result is not a
/// consistent snapshot of a running guest.
pub fn read_guest_memory(pid: u32, gpa: u64, len: usize) -> Result<Vec<u8>, GuestMemoryError> {
    let addr = host_address(pid, gpa, len)?;
    let access = |source| GuestMemoryError::Access {
        pid,
        addr,
        len,
        source,
    };
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).map_err(access)?;
    let mut buf = vec![0u8; len];
    mem.read_exact_at(&mut buf, addr).map_err(access)?;
    Ok(buf)
}

/// Builds a valid working-set image as the probe would leave it: pages before `step_at`
/// have counter `counter`, the others `counter - 1`. For tests of the checker and of
/// code that handles dumps.
pub fn synthesize_dump(pages: usize, counter: u8, step_at: Option<usize>) -> Vec<u8> {
    let mut dump = vec![0u8; pages * PAGE_SIZE];
    for (i, page) in dump.chunks_exact_mut(PAGE_SIZE).enumerate() {
        for w in 0..BLOCK_WORDS {
            let v = mem::expected_word(i as u64, pages as u64, w);
            page[w * 8..w * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        page[mem::COUNTER_OFFSET] = match step_at {
            Some(s) if i >= s => counter.wrapping_sub(1),
            _ => counter,
        };
    }
    dump
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consistent_dump_with_a_step_passes() {
        let dump = synthesize_dump(16, 5, Some(9));
        assert_eq!(
            verify_dump(&dump, 16),
            Ok(DumpSummary {
                pages: 16,
                counter: 5,
                step_at: Some(9)
            })
        );
    }

    #[test]
    fn dump_at_a_pass_boundary_passes() {
        let dump = synthesize_dump(16, 0, None);
        assert_eq!(verify_dump(&dump, 16).unwrap().step_at, None);
    }

    #[test]
    fn counter_wraps_mod_256() {
        let dump = synthesize_dump(8, 0, Some(3));
        assert_eq!(dump[3 * PAGE_SIZE], 0xff);
        assert!(verify_dump(&dump, 8).is_ok());
    }

    #[test]
    fn stale_page_is_a_counter_jump() {
        let mut dump = synthesize_dump(16, 5, None);
        dump[4 * PAGE_SIZE] = 2;
        assert_eq!(
            verify_dump(&dump, 16),
            Err(MemoryOracleError::CounterJump {
                page: 4,
                prev: 5,
                got: 2
            })
        );
    }

    #[test]
    fn page_one_behind_in_two_places_fails() {
        // A single page from the previous pass, in the middle of the current one.
        let mut dump = synthesize_dump(16, 5, Some(10));
        dump[4 * PAGE_SIZE] = 4;
        assert_eq!(
            verify_dump(&dump, 16),
            Err(MemoryOracleError::CounterJump {
                page: 5,
                prev: 4,
                got: 5
            })
        );
        // Three generations of counters (7, 6, 5): the probe is in one place only, so
        // two step-downs mean a whole range of pages is a pass behind.
        let mut dump = synthesize_dump(16, 7, Some(4));
        for i in 10..16 {
            dump[i * PAGE_SIZE] = 5;
        }
        assert_eq!(
            verify_dump(&dump, 16),
            Err(MemoryOracleError::TwoSteps {
                first: 4,
                second: 10
            })
        );
    }

    #[test]
    fn misplaced_page_is_caught_by_its_index() {
        let mut dump = synthesize_dump(16, 5, None);
        let page3 = dump[3 * PAGE_SIZE..4 * PAGE_SIZE].to_vec();
        dump[7 * PAGE_SIZE..8 * PAGE_SIZE].copy_from_slice(&page3);
        match verify_dump(&dump, 16) {
            Err(MemoryOracleError::Word {
                page: 7,
                offset: 16,
                got: 3,
                expected: 7,
                ..
            }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn torn_page_is_caught_by_the_pattern() {
        let mut dump = synthesize_dump(16, 5, None);
        dump[2 * PAGE_SIZE + 3000] ^= 0x40;
        match verify_dump(&dump, 16) {
            Err(MemoryOracleError::Word {
                page: 2,
                offset: 3000,
                what: "pattern",
                ..
            }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn wrong_size_and_wrong_count_fail() {
        let dump = synthesize_dump(16, 5, None);
        assert!(matches!(
            verify_dump(&dump[..PAGE_SIZE * 15], 16),
            Err(MemoryOracleError::WrongSize { .. })
        ));
        // The first half of a larger working set, checked as if it were the whole one:
        // the page-count word says otherwise.
        let large = synthesize_dump(8, 5, None);
        assert!(matches!(
            verify_dump(&large[..4 * PAGE_SIZE], 4),
            Err(MemoryOracleError::Word {
                page: 0,
                what: "page count",
                expected: 4,
                got: 8,
                ..
            })
        ));
    }

    #[test]
    fn zeroed_memory_fails_on_the_magic() {
        let dump = vec![0u8; 4 * PAGE_SIZE];
        assert!(matches!(
            verify_dump(&dump, 4),
            Err(MemoryOracleError::Word {
                page: 0,
                what: "magic",
                ..
            })
        ));
    }

    #[test]
    fn missing_process_is_a_clear_error() {
        let err = inject_guest_memory(u32::MAX, 0, &[1]).unwrap_err();
        assert!(matches!(err, GuestMemoryError::Maps { .. }), "{err}");
    }

    #[test]
    fn process_without_ram_backend_is_a_clear_error() {
        let err = read_guest_memory(std::process::id(), 0, 1).unwrap_err();
        assert!(
            matches!(err, GuestMemoryError::NoRamMapping { .. }),
            "{err}"
        );
    }
}
