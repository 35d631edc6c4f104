//! Facts about the machine and the disk every storage benchmark needs:
//! a data disk of random bytes, the page cache dropped, the load, the
//! memory. Shared by `storage_move.rs` and `import_ova.rs`.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Writes `size` bytes: the first `filled` random (SplitMix64: no two
/// blocks alike, nothing to compress), the rest a hole.
pub(crate) fn write_data_disk(path: &Path, size: u64, filled: u64) -> std::io::Result<()> {
    let mut file = std::fs::File::create(path)?;
    let mut state = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0x5eed, |d| d.as_nanos() as u64);
    let mut buf = vec![0u8; 4 << 20];
    let mut written = 0u64;
    while written < filled {
        let n = (buf.len() as u64).min(filled - written) as usize;
        for word in buf[..n].chunks_exact_mut(8) {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            word.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
        file.write_all(&buf[..n])?;
        written += n as u64;
    }
    file.set_len(size)?;
    file.sync_all()
}

pub(crate) fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// `sync; echo 3 > /proc/sys/vm/drop_caches`; false when not allowed.
pub(crate) fn drop_caches() -> bool {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_string())
}

pub(crate) fn load1() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
}

pub(crate) fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}
