//! The serial console log: QEMU appends everything the guest prints to it
//! (the chardev's `logfile=`), so it is complete even while no agent runs.
//! The agent only reads it: its tail, and what comes next.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::agent::Agent;

/// How much of the log's end is read to find the last lines.
const TAIL_WINDOW: u64 = 512 * 1024;
/// How often a follower looks for new output.
const FOLLOW_POLL: Duration = Duration::from_millis(100);
/// Largest chunk a follower sends at once.
const FOLLOW_CHUNK: usize = 64 * 1024;

/// The last `lines` lines of the log and the offset where the file ended.
/// A log that does not exist yet (the VM never started) is empty.
pub fn tail(path: &Path, lines: usize) -> std::io::Result<(String, u64)> {
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((String::new(), 0)),
        Err(e) => return Err(e),
    };
    let size = file.metadata()?.len();
    let start = size.saturating_sub(TAIL_WINDOW);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::with_capacity((size - start) as usize);
    file.take(size - start).read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    Ok((last_lines(&text, lines), size))
}

fn last_lines(text: &str, lines: usize) -> String {
    if lines == 0 {
        return String::new();
    }
    let trimmed = text.strip_suffix('\n').unwrap_or(text);
    let start = trimmed
        .rmatch_indices('\n')
        .nth(lines - 1)
        .map(|(i, _)| i + 1)
        .unwrap_or(0);
    text[start..].to_string()
}

/// The tail, then new output as it arrives, until the VM no longer has a
/// QEMU process (or is deleted) and the log is drained.
pub fn follow(
    agent: Arc<Agent>,
    name: String,
    path: PathBuf,
    tail: String,
    offset: u64,
) -> impl futures::Stream<Item = std::io::Result<Vec<u8>>> {
    struct Follow {
        agent: Arc<Agent>,
        name: String,
        path: PathBuf,
        offset: u64,
        first: Option<Vec<u8>>,
    }
    let state = Follow {
        agent,
        name,
        path,
        offset,
        first: Some(tail.into_bytes()),
    };
    futures::stream::unfold(state, |mut state| async move {
        if let Some(first) = state.first.take() {
            return Some((Ok(first), state));
        }
        loop {
            match read_from(&state.path, state.offset) {
                Ok(chunk) if !chunk.is_empty() => {
                    state.offset += chunk.len() as u64;
                    return Some((Ok(chunk), state));
                }
                Ok(_) => {}
                Err(error) => return Some((Err(error), state)),
            }
            let running = match state.agent.get(&state.name).await {
                Ok(info) => info.state.has_process(),
                Err(_) => false,
            };
            if !running {
                return None;
            }
            tokio::time::sleep(FOLLOW_POLL).await;
        }
    })
}

fn read_from(path: &Path, offset: u64) -> std::io::Result<Vec<u8>> {
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    file.seek(SeekFrom::Start(offset))?;
    let mut chunk = Vec::new();
    file.take(FOLLOW_CHUNK as u64).read_to_end(&mut chunk)?;
    Ok(chunk)
}

#[cfg(test)]
mod tests {
    use super::last_lines;

    #[test]
    fn last_lines_takes_the_end() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b\nc\n");
        assert_eq!(last_lines("a\nb\nc", 2), "b\nc");
        assert_eq!(last_lines("a\nb\n", 5), "a\nb\n");
        assert_eq!(last_lines("a\n", 0), "");
    }
}
