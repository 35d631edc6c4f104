//! Heartbeat continuity: the guest kept running, and ran exactly once.
//!
//! The probe prints `heartbeat seq=N` with N = 1, 2, 3, ... from boot. Across a live
//! migration the counter lives in guest memory, so the destination continues where the
//! source stopped. A *reset* (N going down or repeating) means the guest rebooted, or two
//! copies ran (a G1 violation), or memory went back in time. A *gap* (N jumping ahead)
//! means console lines were lost or garbled (a kernel message broke a line): worth
//! reporting, but it says nothing about the guest itself.
//!
//! For a migration, concatenate the source's and the destination's raw logs before
//! parsing: a line cut by the switchover is then rejoined.

use std::fmt;

use crate::console;

/// A place where the sequence did not go up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reset {
    /// Index in the sequence of the offending heartbeat.
    pub position: usize,
    /// The number before it.
    pub before: u64,
    /// The offending number (often 1: a reboot).
    pub after: u64,
}

/// A place where numbers are missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    /// The last number seen before the gap.
    pub after: u64,
    /// The first number seen after it.
    pub next: u64,
}

impl Gap {
    /// How many heartbeats are missing.
    pub fn missing(&self) -> u64 {
        self.next - self.after - 1
    }
}

/// What a sequence of heartbeats shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeartbeatReport {
    /// Number of heartbeats seen.
    pub count: usize,
    /// The first number, if any.
    pub first: Option<u64>,
    /// The last number, if any.
    pub last: Option<u64>,
    /// Every place the sequence went down or repeated.
    pub resets: Vec<Reset>,
    /// Every place numbers were skipped.
    pub gaps: Vec<Gap>,
}

/// Why a heartbeat sequence was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeartbeatError {
    #[error("no heartbeat in the console log")]
    Empty,
    #[error(
        "heartbeat went from {} to {} at position {} (guest rebooted, ran twice, or memory went back)",
        .0.before, .0.after, .0.position
    )]
    Reset(Reset),
    #[error("{} heartbeat(s) missing after {} (next seen: {}); {total} gap(s) in all", .first.missing(), .first.after, .first.next)]
    Gaps { first: Gap, total: usize },
}

impl HeartbeatReport {
    /// Analyses a sequence of heartbeat numbers in log order.
    pub fn analyze(seqs: &[u64]) -> HeartbeatReport {
        let mut report = HeartbeatReport {
            count: seqs.len(),
            first: seqs.first().copied(),
            last: seqs.last().copied(),
            ..HeartbeatReport::default()
        };
        for (i, w) in seqs.windows(2).enumerate() {
            let (a, b) = (w[0], w[1]);
            if b <= a {
                report.resets.push(Reset {
                    position: i + 1,
                    before: a,
                    after: b,
                });
            } else if b > a + 1 {
                report.gaps.push(Gap { after: a, next: b });
            }
        }
        report
    }

    /// Parses a raw console log and analyses its heartbeats.
    pub fn from_log(log: &[u8]) -> HeartbeatReport {
        Self::analyze(&console::heartbeats(log))
    }

    /// Total number of heartbeats missing in gaps.
    pub fn missing(&self) -> u64 {
        self.gaps.iter().map(Gap::missing).sum()
    }

    /// Ok if there is at least one heartbeat and no reset; gaps are tolerated.
    pub fn check_no_reset(&self) -> Result<(), HeartbeatError> {
        if self.count == 0 {
            return Err(HeartbeatError::Empty);
        }
        match self.resets.first() {
            Some(r) => Err(HeartbeatError::Reset(*r)),
            None => Ok(()),
        }
    }

    /// Ok only for an unbroken 1-step run: no reset and no gap.
    pub fn check_continuous(&self) -> Result<(), HeartbeatError> {
        self.check_no_reset()?;
        match self.gaps.first() {
            Some(g) => Err(HeartbeatError::Gaps {
                first: *g,
                total: self.gaps.len(),
            }),
            None => Ok(()),
        }
    }
}

impl fmt::Display for HeartbeatReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.first, self.last) {
            (Some(a), Some(b)) => write!(
                f,
                "{} heartbeats {a}..={b}, {} reset(s), {} gap(s) ({} missing)",
                self.count,
                self.resets.len(),
                self.gaps.len(),
                self.missing()
            ),
            _ => write!(f, "no heartbeats"),
        }
    }
}

/// The heartbeat numbers of a console log, in log order (text or raw bytes).
pub fn parse(log: impl AsRef<[u8]>) -> Vec<u64> {
    console::heartbeats(log.as_ref())
}

/// The highest heartbeat number in a raw log, if any.
pub fn last_seq(log: &[u8]) -> Option<u64> {
    console::heartbeats(log).into_iter().max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unbroken_run_passes() {
        let r = HeartbeatReport::analyze(&[1, 2, 3, 4]);
        assert_eq!(r.check_continuous(), Ok(()));
        assert_eq!((r.first, r.last, r.count), (Some(1), Some(4), 4));
    }

    #[test]
    fn reboot_is_a_reset() {
        let r = HeartbeatReport::analyze(&[5, 6, 1, 2]);
        assert_eq!(
            r.check_no_reset(),
            Err(HeartbeatError::Reset(Reset {
                position: 2,
                before: 6,
                after: 1
            }))
        );
    }

    #[test]
    fn repeat_is_a_reset() {
        // Two copies of the guest printing the same numbers would look like this.
        let r = HeartbeatReport::analyze(&[5, 6, 6, 7]);
        assert_eq!(r.resets.len(), 1);
    }

    #[test]
    fn gap_is_reported_but_tolerated_by_no_reset() {
        let r = HeartbeatReport::analyze(&[1, 2, 5, 6]);
        assert_eq!(r.check_no_reset(), Ok(()));
        assert_eq!(r.gaps, vec![Gap { after: 2, next: 5 }]);
        assert_eq!(r.missing(), 2);
        assert!(matches!(
            r.check_continuous(),
            Err(HeartbeatError::Gaps { total: 1, .. })
        ));
    }

    #[test]
    fn parse_takes_text_or_bytes() {
        assert_eq!(parse("heartbeat seq=1\nheartbeat seq=2\n"), vec![1, 2]);
        let bytes: Vec<u8> = b"heartbeat seq=3\r\n".into();
        assert_eq!(parse(bytes), vec![3]);
    }

    #[test]
    fn empty_log_fails() {
        assert_eq!(
            HeartbeatReport::from_log(b"[ 0.0] Linux\n").check_no_reset(),
            Err(HeartbeatError::Empty)
        );
    }

    #[test]
    fn line_cut_by_a_switchover_is_rejoined_by_concatenation() {
        let source = b"heartbeat seq=41\r\nheartbeat seq=4".to_vec();
        let dest = b"2\r\nheartbeat seq=43\r\n";
        let mut both = source.clone();
        both.extend_from_slice(dest);
        assert_eq!(
            HeartbeatReport::from_log(&both).check_continuous(),
            Ok(()),
            "{}",
            HeartbeatReport::from_log(&both)
        );
        assert_eq!(last_seq(&source), Some(41));
    }
}
