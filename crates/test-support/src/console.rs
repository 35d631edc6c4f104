//! Reading the test guest's serial console log.
//!
//! The log is raw bytes from QEMU's chardev `logfile=`: the probe's lines (CR LF
//! terminated by the tty), kernel messages that may land in the middle of a probe line,
//! and possibly a partial last line because the guest is still writing. Readers here only
//! trust complete lines and only lines that are exactly in the probe's format; anything
//! else is skipped, which can show up as a gap but never as a wrong number.

use std::collections::BTreeMap;

use ferry_probe::console as prefix;

/// The complete lines of a console log, without their line terminators. The last line is
/// dropped unless it ends with a newline: it may still be growing. Bytes that are not
/// UTF-8 (line noise) make a line unreadable, not the log.
pub fn complete_lines(log: &[u8]) -> impl Iterator<Item = &str> {
    let complete = match log.iter().rposition(|&b| b == b'\n') {
        Some(i) => &log[..=i],
        None => &log[..0],
    };
    complete
        .split(|&b| b == b'\n')
        .filter_map(|l| std::str::from_utf8(l).ok())
        .map(|l| l.trim_end_matches('\r'))
}

/// Parses `<prefix><decimal number>` exactly (nothing after the number).
fn numbered(line: &str, prefix: &str) -> Option<u64> {
    let digits = line.strip_prefix(prefix)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The numbers of all `heartbeat seq=N` lines, in log order.
pub fn heartbeats(log: &[u8]) -> Vec<u64> {
    complete_lines(log)
        .filter_map(|l| numbered(l, prefix::HEARTBEAT))
        .collect()
}

/// The numbers of all `disk-flushed seq=N` lines, in log order.
pub fn disk_flushed(log: &[u8]) -> Vec<u64> {
    complete_lines(log)
        .filter_map(|l| numbered(l, prefix::DISK_FLUSHED))
        .collect()
}

/// The highest record the probe reported as flushed, if any.
pub fn last_disk_flushed(log: &[u8]) -> Option<u64> {
    disk_flushed(log).into_iter().max()
}

/// The pass number of the last `mem-oracle pass=K fails=F` line, with F.
pub fn last_mem_pass(log: &[u8]) -> Option<(u64, u64)> {
    complete_lines(log)
        .filter_map(|l| {
            let rest = l.strip_prefix(prefix::MEM_PASS)?;
            let (pass, fails) = rest.split_once(" fails=")?;
            Some((pass.parse().ok()?, fails.parse().ok()?))
        })
        .last()
}

/// Every `oracle-fail ...` line (the probe's self-check found damage).
pub fn oracle_failures(log: &[u8]) -> Vec<String> {
    lines_with_prefix(log, prefix::ORACLE_FAIL)
}

/// Every `probe-error ...` line (the probe could not do its job).
pub fn probe_errors(log: &[u8]) -> Vec<String> {
    lines_with_prefix(log, prefix::ERROR)
}

fn lines_with_prefix(log: &[u8], p: &str) -> Vec<String> {
    complete_lines(log)
        .filter(|l| l.starts_with(p))
        .map(str::to_string)
        .collect()
}

/// The probe's `probe-ready key=value ...` line, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeReady {
    /// All fields as printed (`hb_ms`, `mem_mib`, `mem_base`, `disk`, `disk_slots`, ...).
    pub fields: BTreeMap<String, String>,
}

impl ProbeReady {
    /// A field's raw value.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }

    /// The guest-physical base of the memory oracle's working set, if it is in guest RAM
    /// where the host can see it (not `heap` or `none`).
    pub fn mem_base(&self) -> Option<u64> {
        let v = self.get("mem_base")?.strip_prefix("0x")?;
        u64::from_str_radix(v, 16).ok()
    }

    /// The working set size in MiB (0: memory oracle off).
    pub fn mem_mib(&self) -> Option<u64> {
        self.get("mem_mib")?.parse().ok()
    }

    /// The per-boot id stamped into every disk record.
    pub fn boot_id(&self) -> Option<u64> {
        u64::from_str_radix(self.get("boot_id")?.strip_prefix("0x")?, 16).ok()
    }
}

/// The first `probe-ready` line of the log (the last boot's if the guest rebooted: use
/// [`probe_ready_all`] to tell).
pub fn probe_ready(log: &[u8]) -> Option<ProbeReady> {
    probe_ready_all(log).into_iter().next()
}

/// Every `probe-ready` line, one per boot of the probe.
pub fn probe_ready_all(log: &[u8]) -> Vec<ProbeReady> {
    complete_lines(log)
        .filter_map(|l| l.strip_prefix(prefix::READY))
        .map(|rest| ProbeReady {
            fields: rest
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_last_line_is_ignored() {
        let log = b"heartbeat seq=1\r\nheartbeat seq=2\r\nheartbeat seq=3";
        assert_eq!(heartbeats(log), vec![1, 2]);
    }

    #[test]
    fn kernel_message_inside_a_line_makes_it_unreadable_not_wrong() {
        let log = b"heartbeat seq=1\r\nheartbeat seq=1[   5.1] random: crng init done\r\n2\r\nheartbeat seq=3\r\n";
        assert_eq!(heartbeats(log), vec![1, 3]);
    }

    #[test]
    fn non_utf8_noise_is_skipped() {
        let log = b"\xff\xfe garbage\nheartbeat seq=7\n";
        assert_eq!(heartbeats(log), vec![7]);
    }

    #[test]
    fn probe_ready_fields_parse() {
        let log = b"[ 1.0] boot\r\nprobe-ready version=1 hb_ms=10 mem_mib=32 mem_base=0x1c000000 disk=/dev/vda2 boot_id=0x00000000000000ff\r\n";
        let ready = probe_ready(log).unwrap();
        assert_eq!(ready.mem_base(), Some(0x1c00_0000));
        assert_eq!(ready.mem_mib(), Some(32));
        assert_eq!(ready.boot_id(), Some(0xff));
        assert_eq!(ready.get("disk"), Some("/dev/vda2"));
    }

    #[test]
    fn heap_working_set_has_no_base() {
        let ready = probe_ready(b"probe-ready mem_base=heap\n").unwrap();
        assert_eq!(ready.mem_base(), None);
    }

    #[test]
    fn disk_and_pass_lines_parse() {
        let log = b"disk-flushed seq=1\ndisk-flushed seq=2\nmem-oracle pass=3 fails=0\noracle-fail mem page=1 offset=0 expected=0x01 got=0x05\n";
        assert_eq!(last_disk_flushed(log), Some(2));
        assert_eq!(last_mem_pass(log), Some((3, 0)));
        assert_eq!(oracle_failures(log).len(), 1);
        assert!(probe_errors(log).is_empty());
    }
}
