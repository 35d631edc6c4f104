//! The arithmetic of the benchmark: the guest-observed pause from
//! heartbeat arrivals, the guest's non-zero RAM, and the physical floor.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::serial::{Arrival, ProbeLine};

/// Page size the count of non-zero RAM uses (QEMU sends a zero page as a
/// few header bytes, any other page in full).
pub const PAGE: usize = 4096;

/// The heartbeats of several consoles (source and destination) as one
/// sequence: each number once, at its earliest arrival, in number order.
pub fn merge_heartbeats(streams: &[&[Arrival]]) -> Vec<(u64, f64)> {
    let mut first: BTreeMap<u64, f64> = BTreeMap::new();
    for arrival in streams.iter().flat_map(|s| s.iter()) {
        if let ProbeLine::Heartbeat(seq) = arrival.line {
            first
                .entry(seq)
                .and_modify(|at| *at = at.min(arrival.at_ms))
                .or_insert(arrival.at_ms);
        }
    }
    first.into_iter().collect()
}

/// The longest silence between two consecutive heartbeats.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gap {
    pub ms: f64,
    /// The last heartbeat before the silence.
    pub after_seq: u64,
    /// When the silence ended (ms on the benchmark's clock).
    pub ended_at_ms: f64,
}

/// The longest gap between consecutive heartbeats (by number) whose
/// silence overlaps `[from_ms, to_ms]`. Missing numbers (garbled lines) just
/// make a longer step; a number arriving before its predecessor counts 0.
pub fn longest_gap(beats: &[(u64, f64)], from_ms: f64, to_ms: f64) -> Option<Gap> {
    beats
        .windows(2)
        .filter(|w| w[1].1 >= from_ms && w[0].1 <= to_ms)
        .map(|w| Gap {
            ms: (w[1].1 - w[0].1).max(0.0),
            after_seq: w[0].0,
            ended_at_ms: w[1].1,
        })
        .max_by(|a, b| a.ms.total_cmp(&b.ms))
}

/// Number of 4 KiB pages of `data` that are not all zero.
pub fn nonzero_pages(data: &[u8]) -> u64 {
    data.chunks(PAGE)
        .filter(|page| page.iter().any(|&b| b != 0))
        .count() as u64
}

/// Bytes of non-zero pages in `reader`, read to its end in large chunks.
pub fn nonzero_bytes(mut reader: impl Read) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 4 << 20];
    let mut pages = 0;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            match reader.read(&mut buf[filled..])? {
                0 => break,
                n => filled += n,
            }
        }
        if filled == 0 {
            return Ok(pages * PAGE as u64);
        }
        pages += nonzero_pages(&buf[..filled]);
        if filled < buf.len() {
            return Ok(pages * PAGE as u64);
        }
    }
}

/// The RAM of a running QEMU: its memfd backend of exactly `size` bytes,
/// found among `/proc/PID/fd` (Ferry and this benchmark both back RAM with
/// `memory-backend-memfd`). Reading it does not disturb the guest.
pub fn guest_ram_file(pid: u32, size: u64) -> std::io::Result<PathBuf> {
    let fds = Path::new("/proc").join(pid.to_string()).join("fd");
    for entry in std::fs::read_dir(&fds)? {
        let path = entry?.path();
        let Ok(target) = std::fs::read_link(&path) else {
            continue;
        };
        if target.to_string_lossy().starts_with("/memfd:")
            && std::fs::metadata(&path).is_ok_and(|m| m.len() == size)
        {
            return Ok(path);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("no memfd of {size} bytes among {}", fds.display()),
    ))
}

/// Non-zero bytes of a running QEMU's guest RAM.
pub fn guest_nonzero_ram(pid: u32, size: u64) -> std::io::Result<u64> {
    nonzero_bytes(std::fs::File::open(guest_ram_file(pid, size)?)?)
}

/// The least time any migration needs: every non-zero byte once over the
/// link at the measured goodput.
pub fn floor_secs(nonzero_bytes: u64, goodput_bytes_per_sec: f64) -> f64 {
    if goodput_bytes_per_sec <= 0.0 {
        return f64::INFINITY;
    }
    nonzero_bytes as f64 / goodput_bytes_per_sec
}

/// Pages dirtied per second as MiB/s.
pub fn mib(bytes: f64) -> f64 {
    bytes / (1u64 << 20) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(seq: u64, at_ms: f64) -> Arrival {
        Arrival {
            at_ms,
            line: ProbeLine::Heartbeat(seq),
        }
    }

    #[test]
    fn the_pause_is_the_longest_silence_across_both_consoles() {
        // Source: 10 ms beats up to seq 4 at 40 ms, then paused; the
        // destination resumes with seq 5 at 352 ms. Seq 4 also appears late
        // on the destination (a line cut by the switchover is re-sent
        // nowhere, but duplicates must not shorten or lengthen the gap).
        let source = [beat(1, 10.0), beat(2, 20.0), beat(3, 30.0), beat(4, 40.0)];
        let dest = [beat(4, 351.0), beat(5, 352.0), beat(6, 362.0)];
        let merged = merge_heartbeats(&[&source, &dest]);
        assert_eq!(merged.len(), 6);
        let gap = longest_gap(&merged, 0.0, 1000.0).unwrap();
        assert_eq!(gap.after_seq, 4);
        assert!((gap.ms - 312.0).abs() < 1e-9, "{gap:?}");
    }

    #[test]
    fn gaps_outside_the_window_do_not_count() {
        let beats = [(1, 0.0), (2, 500.0), (3, 510.0), (4, 520.0), (5, 600.0)];
        let gap = longest_gap(&beats, 505.0, 515.0).unwrap();
        assert!((gap.ms - 10.0).abs() < 1e-9, "{gap:?}");
        // A silence that straddles either end of the window counts.
        let gap = longest_gap(&beats, 505.0, 530.0).unwrap();
        assert!((gap.ms - 80.0).abs() < 1e-9, "{gap:?}");
        let gap = longest_gap(&beats, 400.0, 505.0).unwrap();
        assert!((gap.ms - 500.0).abs() < 1e-9, "{gap:?}");
        assert_eq!(longest_gap(&beats[..1], 0.0, 1e9), None);
    }

    #[test]
    fn nonzero_ram_counts_whole_pages() {
        let mut ram = vec![0u8; 10 * PAGE + 100];
        ram[3 * PAGE + 17] = 1;
        ram[7 * PAGE] = 9;
        ram[10 * PAGE + 99] = 1; // a partial last page counts as one
        assert_eq!(nonzero_pages(&ram), 3);
        assert_eq!(nonzero_bytes(&ram[..]).unwrap(), 3 * PAGE as u64);
    }

    #[test]
    fn floor_is_bytes_over_goodput() {
        assert!((floor_secs(100 << 20, (25u64 << 20) as f64) - 4.0).abs() < 1e-9);
        assert!(floor_secs(1, 0.0).is_infinite());
    }
}
