//! Moving a stopped VM's disk file (or a backup file) between hosts
//! byte-for-byte, and proving that it arrived intact.
//!
//! The sending agent serves [`file_stream`] as an HTTP response body and
//! tells the receiver the [`digest_file`] of the source. The receiving agent
//! writes the body with [`receive_file`] into a hidden partial file next to
//! the destination ([`partial_path`]), compares the digest it computed on the
//! way in with the source's, and only then calls [`commit_partial`], which
//! reads the partial back from disk, checks it once more and renames it into
//! place without ever replacing an existing file.
//!
//! Why the destination never holds a half-written disk: every byte lands in
//! the partial first, and the partial becomes the destination by one rename,
//! after both the arriving bytes and the bytes on disk were shown to match.
//! A failed transfer removes its partial, so it leaves nothing behind.
//!
//! Disk images are often mostly holes (a 100 GiB raw disk with 3 GiB of data).
//! The sender reads holes as zeros (the kernel does that for us), and the
//! receiver skips all-zero 64 KiB blocks instead of writing them, so a sparse
//! source stays sparse at the destination while its logical content (and so
//! its digest) is identical.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use axum::body::Bytes;
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

/// Read buffer size for hashing and sending: large enough that per-call
/// overhead vanishes next to the disk, small enough to be nothing in memory.
const READ_BUF: usize = 1024 * 1024;

/// The unit of sparseness on the receiving side: an all-zero block of this
/// size is skipped rather than written. 64 KiB is a multiple of every common
/// filesystem block size, so a skipped block really becomes a hole.
const SPARSE_BLOCK: usize = 64 * 1024;

/// The receiver's writer thread flushes once this much has accumulated, so
/// that a run of data blocks becomes one large `pwrite`.
const WRITE_BATCH: usize = 1024 * 1024;

/// How many received chunks may wait for the writer thread: bounds memory
/// when the network is faster than the disk (back-pressure reaches the
/// sender through the stream not being polled).
const WRITE_QUEUE: usize = 16;

/// Suffix of the partial file's name; with the leading dot it is hidden and
/// clearly ours, so an operator (or a sweep) can tell what it is.
const PARTIAL_SUFFIX: &str = ".ferry-partial";

/// SHA-256 and length of a file's bytes (the wire type: agents report
/// it, the controller compares).
pub use ferry_api::FileDigest;

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("{action} {path} failed")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{path} already exists")]
    Exists { path: PathBuf },
    #[error("{path}: refusing more than {limit} bytes")]
    TooLarge { path: PathBuf, limit: u64 },
    /// The bytes (on disk) for `path` are not the source's. `got` is the
    /// digest of what was read back; the partial has been removed.
    #[error("bytes received for {path} do not match the source: expected {expected}, got {got}")]
    Mismatch {
        path: PathBuf,
        expected: FileDigest,
        got: FileDigest,
    },
    /// The arriving stream was longer or shorter than announced. When it was
    /// too long, `got` is how many bytes had arrived when that was noticed.
    #[error("{path}: expected {expected} bytes, the stream delivered {got}")]
    Length {
        path: PathBuf,
        expected: u64,
        got: u64,
    },
    /// The arriving stream itself failed (for instance the connection to the
    /// sending host broke).
    #[error("receiving {path}: the incoming stream failed")]
    Stream {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{path} is not a regular file")]
    NotAFile { path: PathBuf },
    /// The destination path does not name a file (e.g. `/` or `..`).
    #[error("{path} does not name a file")]
    BadPath { path: PathBuf },
}

fn io_err<'a>(
    path: &'a Path,
    action: &'static str,
) -> impl FnOnce(io::Error) -> TransferError + 'a {
    move |source| TransferError::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

/// A blocking task that panicked or was cancelled (only at runtime shutdown)
/// is reported as an I/O error on the file it was working on.
fn join_err(path: &Path, action: &'static str, e: tokio::task::JoinError) -> TransferError {
    TransferError::Io {
        path: path.to_path_buf(),
        action,
        source: io::Error::other(e),
    }
}

fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Reads the whole file (on a blocking thread, 1 MiB buffers) and hashes it.
/// Holes read as zeros, so the digest is of the logical content.
pub async fn digest_file(path: &Path) -> Result<FileDigest, TransferError> {
    let owned = path.to_path_buf();
    tokio::task::spawn_blocking(move || digest_file_blocking(&owned))
        .await
        .map_err(|e| join_err(path, "hashing", e))?
}

fn digest_file_blocking(path: &Path) -> Result<FileDigest, TransferError> {
    let mut file = File::open(path).map_err(io_err(path, "opening"))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; READ_BUF];
    let mut total = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(path, "reading")(e)),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok(FileDigest {
        sha256: to_hex(&hasher.finalize()),
        bytes: total,
    })
}

/// A stream of the file's bytes for an HTTP response body
/// (`axum::body::Body::from_stream`), plus its length.
///
/// The stream never yields more than the returned length, even if the file
/// grows meanwhile, so a `Content-Length` taken from it stays true; if the
/// file shrinks, the stream ends short and the receiver (given the length)
/// notices. The file is meant to be quiescent (a stopped VM's disk) anyway.
pub async fn file_stream(
    path: &Path,
) -> Result<(u64, impl Stream<Item = io::Result<Bytes>> + Send + 'static), TransferError> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(io_err(path, "opening"))?;
    let meta = file
        .metadata()
        .await
        .map_err(io_err(path, "reading the metadata of"))?;
    // A directory or device has no meaningful `len()`: refuse rather than
    // announce a length the stream will not honour.
    if !meta.is_file() {
        return Err(TransferError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let len = meta.len();
    Ok((
        len,
        tokio_util::io::ReaderStream::with_capacity(file.take(len), READ_BUF),
    ))
}

/// The partial file an arriving file is written to: same folder (so the
/// final rename stays within one filesystem and is atomic), name
/// `.{file name}.ferry-partial` (hidden, clearly ours).
///
/// For a path that names no file (`/`, `..`) the name part is empty; the
/// functions that write or rename refuse such paths with `BadPath`.
pub fn partial_path(final_path: &Path) -> PathBuf {
    let mut name = OsString::from(".");
    name.push(final_path.file_name().unwrap_or_default());
    name.push(PARTIAL_SUFFIX);
    final_path.with_file_name(name)
}

/// The folder holding `final_path` (`.` for a bare file name) and its
/// partial file; `BadPath` when `final_path` names no file.
fn locate(final_path: &Path) -> Result<(PathBuf, PathBuf), TransferError> {
    if final_path.file_name().is_none() {
        return Err(TransferError::BadPath {
            path: final_path.to_path_buf(),
        });
    }
    let dir = match final_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((dir, partial_path(final_path)))
}

/// Makes entries created, renamed or removed in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), TransferError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, "syncing folder"))
}

/// `Exists` if anything (even a dangling symlink) is at `path`.
fn refuse_existing(path: &Path) -> Result<(), TransferError> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => Err(TransferError::Exists {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path, "checking")(e)),
    }
}

/// Removes the partial file when dropped, unless disarmed: this is how every
/// error path, and also cancellation (the future being dropped, e.g. when
/// the HTTP request is aborted), leaves nothing behind.
struct PartialGuard {
    path: PathBuf,
    armed: bool,
}

impl Drop for PartialGuard {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = std::fs::remove_file(&self.path) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot remove partial file");
                }
            }
        }
    }
}

enum Chunk {
    Data(Bytes),
    /// The stream ended with every check passed: finish the file. Without
    /// it (the sender dropped) the writer just stops.
    End,
}

/// Writes an arriving byte stream to `partial_path(final_path)` (refusing if
/// `final_path` or the partial already exist — `Exists`; the partial is
/// created with create_new, mode 0600), keeping it sparse: an all-zero
/// 64 KiB block is skipped instead of written, and the file is `set_len` to
/// the total at the end (so a sparse source stays sparse and the logical
/// content is identical). Refuses more than `max_bytes` (`TooLarge`). fsyncs
/// the file and its folder. Hashes the bytes as they arrive and returns that
/// digest. On any error (including the stream yielding an error or ending
/// short of `expected_len` when given) the partial file is removed: a failed
/// transfer leaves nothing. So does dropping the future.
///
/// A partial left by a crash of an earlier run makes this fail with
/// `Exists`; [`discard_partial`] clears it.
pub async fn receive_file<S, E>(
    mut stream: S,
    final_path: &Path,
    expected_len: Option<u64>,
    max_bytes: u64,
) -> Result<FileDigest, TransferError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin + Send,
    E: std::error::Error + Send + Sync + 'static,
{
    let (dir, partial) = locate(final_path)?;
    // An announced length over the limit is refused before touching the
    // disk; the running total is checked as well, since the announcement
    // may be absent or false.
    if expected_len.is_some_and(|n| n > max_bytes) {
        return Err(TransferError::TooLarge {
            path: final_path.to_path_buf(),
            limit: max_bytes,
        });
    }
    refuse_existing(final_path)?;

    // Created right here rather than on a blocking thread: it is one
    // `open(O_CREAT|O_EXCL)`, and doing it in the same poll as arming the
    // guard below means a cancelled future cannot leave a partial that a
    // detached blocking task created after the guard had already run.
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial);
    let file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(TransferError::Exists { path: partial });
        }
        Err(e) => return Err(io_err(&partial, "creating")(e)),
    };
    // From here on the partial is ours and must not survive a failure.
    let mut guard = PartialGuard {
        path: partial.clone(),
        armed: true,
    };

    // Writing and hashing run on a blocking thread: SHA-256 of a 1 MiB chunk
    // is milliseconds of CPU, and file writes block; neither belongs on the
    // async runtime's workers.
    let (tx, rx) = mpsc::channel::<Chunk>(WRITE_QUEUE);
    let writer = {
        let partial = partial.clone();
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || write_sparse(file, rx, &partial, &dir))
    };

    let fed = feed(&mut stream, &tx, final_path, expected_len, max_bytes).await;
    if fed.is_ok() {
        // The writer only finishes the file on `End`; if it has already
        // failed the send fails, and its own error is reported below.
        let _ = tx.send(Chunk::End).await;
    }
    drop(tx);
    let written = writer.await.map_err(|e| join_err(&partial, "writing", e))?;
    // The stream's error comes first: when it failed, the writer merely
    // stopped (or its failure caused the feed to stop and is reported here).
    fed?;
    let digest = written?;
    guard.armed = false;
    Ok(digest)
}

/// Pulls the stream and hands its chunks to the writer, enforcing the
/// limits. Returns the total on a clean end.
async fn feed<S, E>(
    stream: &mut S,
    tx: &mpsc::Sender<Chunk>,
    final_path: &Path,
    expected_len: Option<u64>,
    max_bytes: u64,
) -> Result<u64, TransferError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin + Send,
    E: std::error::Error + Send + Sync + 'static,
{
    let mut total = 0u64;
    while let Some(item) = stream.next().await {
        let chunk = item.map_err(|e| TransferError::Stream {
            path: final_path.to_path_buf(),
            source: Box::new(e),
        })?;
        if chunk.is_empty() {
            continue;
        }
        total += chunk.len() as u64;
        if total > max_bytes {
            return Err(TransferError::TooLarge {
                path: final_path.to_path_buf(),
                limit: max_bytes,
            });
        }
        if let Some(expected) = expected_len {
            if total > expected {
                return Err(TransferError::Length {
                    path: final_path.to_path_buf(),
                    expected,
                    got: total,
                });
            }
        }
        if tx.send(Chunk::Data(chunk)).await.is_err() {
            // The writer stopped on an error, which it returns; stop pulling.
            return Ok(total);
        }
    }
    match expected_len {
        Some(expected) if total != expected => Err(TransferError::Length {
            path: final_path.to_path_buf(),
            expected,
            got: total,
        }),
        _ => Ok(total),
    }
}

/// The writer thread: hashes every arriving byte, writes data blocks with
/// positioned writes and skips all-zero blocks, then sets the length, fsyncs
/// the file and the folder. Returns the digest of what arrived.
fn write_sparse(
    file: File,
    mut rx: mpsc::Receiver<Chunk>,
    partial: &Path,
    dir: &Path,
) -> Result<FileDigest, TransferError> {
    let mut hasher = Sha256::new();
    // Bytes not yet written; always starts at file offset `base`, which is a
    // multiple of SPARSE_BLOCK, so the blocks tested for zeros are aligned in
    // the file and a skipped one is a whole filesystem-block range.
    let mut pending: Vec<u8> = Vec::with_capacity(WRITE_BATCH + READ_BUF);
    let mut base = 0u64;
    loop {
        match rx.blocking_recv() {
            Some(Chunk::Data(bytes)) => {
                hasher.update(&bytes);
                pending.extend_from_slice(&bytes);
                if pending.len() >= WRITE_BATCH {
                    let whole = pending.len() / SPARSE_BLOCK * SPARSE_BLOCK;
                    write_blocks(&file, &pending[..whole], base, partial)?;
                    base += whole as u64;
                    pending.drain(..whole);
                }
            }
            Some(Chunk::End) => break,
            // Cancelled (the stream failed or the caller gave up): the file
            // is about to be removed, nothing more to do.
            None => {
                return Err(io_err(partial, "writing")(io::Error::other(
                    "transfer abandoned",
                )))
            }
        }
    }
    // The tail (less than a block, or more if the batch was not reached).
    write_blocks(&file, &pending, base, partial)?;
    let total = base + pending.len() as u64;
    // Skipped blocks at the end left the file short: extending it makes them
    // a hole of the right size, so the logical length is the source's.
    file.set_len(total)
        .map_err(io_err(partial, "setting the length of"))?;
    file.sync_all().map_err(io_err(partial, "syncing"))?;
    drop(file);
    sync_dir(dir)?;
    Ok(FileDigest {
        sha256: to_hex(&hasher.finalize()),
        bytes: total,
    })
}

/// Writes `data` at file offset `offset`, skipping all-zero SPARSE_BLOCK
/// blocks (the file is new, so skipped ranges read as zeros) and writing
/// each run of other blocks with one positioned write.
fn write_blocks(
    file: &File,
    data: &[u8],
    offset: u64,
    partial: &Path,
) -> Result<(), TransferError> {
    let mut run_start: Option<usize> = None;
    let mut pos = 0;
    for block in data.chunks(SPARSE_BLOCK) {
        if is_zero(block) {
            if let Some(start) = run_start.take() {
                file.write_all_at(&data[start..pos], offset + start as u64)
                    .map_err(io_err(partial, "writing"))?;
            }
        } else if run_start.is_none() {
            run_start = Some(pos);
        }
        pos += block.len();
    }
    if let Some(start) = run_start {
        file.write_all_at(&data[start..], offset + start as u64)
            .map_err(io_err(partial, "writing"))?;
    }
    Ok(())
}

/// OR-folding fixed-size chunks vectorises well, and the per-chunk early
/// exit stops at the first data in a block.
fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(512)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// After the caller compared digests: re-reads the partial from disk
/// ([`digest_file`]) and, only if it equals `expected`, renames it to
/// `final_path` without replacing anything (`Exists` if the destination
/// appeared meanwhile) and fsyncs the folder. On mismatch the partial is
/// removed and `Mismatch` returned.
///
/// Re-reading catches what the streaming digest cannot: bytes that reached
/// the hash but not the disk intact, or a partial changed behind our back.
///
/// A failure before the rename (mismatch, destination exists, read error)
/// removes the partial, so a failed commit leaves nothing; once renamed the
/// file stays, and only a failing folder fsync can still be reported.
pub async fn commit_partial(final_path: &Path, expected: &FileDigest) -> Result<(), TransferError> {
    let (dir, partial) = locate(final_path)?;
    // Armed from the start: every failure before the rename removes the
    // partial (a missing partial is simply nothing to remove).
    let mut guard = PartialGuard {
        path: partial.clone(),
        armed: true,
    };
    let got = digest_file(&partial).await?;
    if &got != expected {
        return Err(TransferError::Mismatch {
            path: final_path.to_path_buf(),
            expected: expected.clone(),
            got,
        });
    }
    let owned_final = final_path.to_path_buf();
    let owned_partial = partial.clone();
    tokio::task::spawn_blocking(move || rename_noreplace(&owned_partial, &owned_final))
        .await
        .map_err(|e| join_err(final_path, "renaming into", e))??;
    guard.armed = false;
    let dir_owned = dir.clone();
    tokio::task::spawn_blocking(move || sync_dir(&dir_owned))
        .await
        .map_err(|e| join_err(&dir, "syncing folder", e))?
}

/// Renames `from` to `to`, failing with `Exists` rather than replacing `to`.
/// `renameat2(RENAME_NOREPLACE)` does that atomically; filesystems without
/// it get `link` (which also refuses an existing target) then `unlink`.
fn rename_noreplace(from: &Path, to: &Path) -> Result<(), TransferError> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use nix::errno::Errno;
        use nix::fcntl::{renameat2, RenameFlags};
        match renameat2(None, from, None, to, RenameFlags::RENAME_NOREPLACE) {
            Ok(()) => return Ok(()),
            Err(Errno::EEXIST) => {
                return Err(TransferError::Exists {
                    path: to.to_path_buf(),
                })
            }
            // Not supported here (EINVAL: filesystem, ENOSYS: kernel):
            // fall back to link + unlink below.
            Err(Errno::EINVAL | Errno::ENOSYS) => {}
            Err(e) => return Err(io_err(to, "renaming into")(io::Error::from(e))),
        }
    }
    match std::fs::hard_link(from, to) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(TransferError::Exists {
                path: to.to_path_buf(),
            })
        }
        Err(e) => return Err(io_err(to, "linking into")(e)),
    }
    std::fs::remove_file(from).map_err(io_err(from, "removing"))
}

/// Removes the partial file if present (idempotent).
pub fn discard_partial(final_path: &Path) -> Result<(), TransferError> {
    let (_, partial) = locate(final_path)?;
    match std::fs::remove_file(&partial) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(&partial, "removing")(e)),
    }
}

/// Removes every partial file (`.NAME.ferry-partial`) in `folders`; called
/// at agent start, when no transfer can be in progress.
pub fn remove_partials<'a>(folders: impl IntoIterator<Item = &'a PathBuf>) {
    for folder in folders {
        let Ok(entries) = std::fs::read_dir(folder) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.ends_with(".ferry-partial") {
                tracing::warn!(file = %entry.path().display(), "removing a partial file left by an interrupted transfer");
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const MIB: u64 = 1024 * 1024;

    /// An 8 MiB file with 1 MiB of data at offset 0 and 1 MiB at 5 MiB; the
    /// rest are holes. Non-trivial data (not a repeated byte) so that a
    /// misplaced block would change the digest.
    fn make_sparse(path: &Path) -> Vec<u8> {
        let f = File::create(path).unwrap();
        let data: Vec<u8> = (0..MIB as usize).map(|i| (i % 251) as u8 + 1).collect();
        f.write_all_at(&data, 0).unwrap();
        f.write_all_at(&data, 5 * MIB).unwrap();
        f.set_len(8 * MIB).unwrap();
        let mut logical = vec![0u8; 8 * MIB as usize];
        logical[..MIB as usize].copy_from_slice(&data);
        logical[5 * MIB as usize..6 * MIB as usize].copy_from_slice(&data);
        logical
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn chunks(data: Vec<u8>, size: usize) -> Vec<Result<Bytes, io::Error>> {
        data.chunks(size)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect()
    }

    #[test]
    fn partial_path_is_hidden_sibling() {
        assert_eq!(
            partial_path(Path::new("/ds/a/disk.qcow2")),
            PathBuf::from("/ds/a/.disk.qcow2.ferry-partial")
        );
        assert_eq!(
            partial_path(Path::new("disk.raw")),
            PathBuf::from(".disk.raw.ferry-partial")
        );
    }

    #[tokio::test]
    async fn sparse_round_trip_stays_sparse_and_identical() {
        let src_dir = tempfile::tempdir().unwrap();
        let dst_dir = tempfile::tempdir().unwrap();
        let src = src_dir.path().join("disk.raw");
        let dst = dst_dir.path().join("disk.raw");
        let logical = make_sparse(&src);

        let source_digest = digest_file(&src).await.unwrap();
        assert_eq!(source_digest.bytes, 8 * MIB);

        let (len, stream) = file_stream(&src).await.unwrap();
        assert_eq!(len, 8 * MIB);
        // Box::pin: receive_file needs Unpin, as an HTTP body stream is.
        let received = receive_file(Box::pin(stream), &dst, Some(len), 16 * MIB)
            .await
            .unwrap();
        assert_eq!(received, source_digest);
        assert!(partial_path(&dst).exists());
        assert!(!dst.exists(), "nothing is final before the commit");

        commit_partial(&dst, &source_digest).await.unwrap();
        assert!(!partial_path(&dst).exists());
        assert_eq!(std::fs::read(&dst).unwrap(), logical);
        assert_eq!(digest_file(&dst).await.unwrap(), source_digest);

        let meta = std::fs::metadata(&dst).unwrap();
        assert_eq!(meta.len(), 8 * MIB);
        // st_blocks is in 512-byte units. 2 MiB of data plus some filesystem
        // slack must stay far below the 8 MiB a dense copy would take.
        let allocated = meta.blocks() * 512;
        assert!(
            allocated <= 3 * MIB,
            "destination not sparse: {allocated} bytes allocated"
        );
        assert_eq!(meta.mode() & 0o777, 0o600);
    }

    #[tokio::test]
    async fn odd_chunks_and_trailing_data_round_trip() {
        // Chunk sizes that straddle the 64 KiB blocks, and a length that is
        // not a multiple of them, exercise the tail handling.
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("backup.bin");
        let mut data = vec![0u8; 3 * SPARSE_BLOCK + 1234];
        data[SPARSE_BLOCK + 7] = 9;
        data[3 * SPARSE_BLOCK + 1000] = 1;
        let expected_sha = to_hex(&Sha256::digest(&data));
        let stream = futures::stream::iter(chunks(data.clone(), 10_000));
        let got = receive_file(stream, &dst, None, u64::MAX).await.unwrap();
        assert_eq!(got.sha256, expected_sha);
        assert_eq!(got.bytes, data.len() as u64);
        commit_partial(&dst, &got).await.unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), data);
    }

    #[tokio::test]
    async fn stream_error_midway_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("disk.raw");
        let mut items = chunks(vec![7u8; 2 * MIB as usize], 256 * 1024);
        items.push(Err(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "peer went away",
        )));
        items.extend(chunks(vec![7u8; MIB as usize], 256 * 1024));
        let err = receive_file(futures::stream::iter(items), &dst, None, u64::MAX)
            .await
            .unwrap_err();
        assert!(matches!(err, TransferError::Stream { .. }), "{err:?}");
        assert!(
            entries(dir.path()).is_empty(),
            "left: {:?}",
            entries(dir.path())
        );
    }

    #[tokio::test]
    async fn cancelled_receive_leaves_nothing() {
        // An aborted HTTP request drops the handler's future mid-transfer;
        // the guard must clean up even though no error was returned.
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("disk.raw");
        let stream = futures::stream::iter(chunks(vec![7u8; 2 * MIB as usize], 256 * 1024))
            .chain(futures::stream::pending());
        let res = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            receive_file(stream, &dst, None, u64::MAX),
        )
        .await;
        assert!(res.is_err(), "the stream never ends, so this must time out");
        assert!(
            entries(dir.path()).is_empty(),
            "left: {:?}",
            entries(dir.path())
        );
    }

    #[tokio::test]
    async fn file_stream_refuses_a_folder() {
        let dir = tempfile::tempdir().unwrap();
        let err = file_stream(dir.path()).await.err().unwrap();
        assert!(matches!(err, TransferError::NotAFile { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn short_stream_leaves_nothing() {
        // A connection closed cleanly but early looks like a normal end; only
        // the announced length reveals it.
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("disk.raw");
        let stream = futures::stream::iter(chunks(vec![1u8; 1000], 100));
        let err = receive_file(stream, &dst, Some(2000), u64::MAX)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                TransferError::Length {
                    expected: 2000,
                    got: 1000,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(entries(dir.path()).is_empty());
    }

    #[tokio::test]
    async fn existing_final_or_partial_is_refused_and_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("disk.raw");
        std::fs::write(&dst, b"precious").unwrap();
        let stream = futures::stream::iter(chunks(vec![1u8; 10], 5));
        let err = receive_file(stream, &dst, None, u64::MAX)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, TransferError::Exists { path } if *path == dst),
            "{err:?}"
        );
        assert_eq!(std::fs::read(&dst).unwrap(), b"precious");
        assert_eq!(entries(dir.path()), vec!["disk.raw"]);

        // A leftover partial (another transfer, or a crash) is not ours to
        // overwrite or remove: refuse and leave it.
        let other = dir.path().join("other.raw");
        std::fs::write(partial_path(&other), b"in flight").unwrap();
        let stream = futures::stream::iter(chunks(vec![1u8; 10], 5));
        let err = receive_file(stream, &other, None, u64::MAX)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, TransferError::Exists { path } if *path == partial_path(&other)),
            "{err:?}"
        );
        assert_eq!(std::fs::read(partial_path(&other)).unwrap(), b"in flight");
        assert!(!other.exists());
    }

    #[tokio::test]
    async fn mismatch_at_commit_removes_partial() {
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("disk.raw");
        let stream = futures::stream::iter(chunks(vec![3u8; 100_000], 30_000));
        let got = receive_file(stream, &dst, Some(100_000), u64::MAX)
            .await
            .unwrap();
        // The source claims other content (as if a byte flipped in transit
        // and both sides hashed honestly).
        let wrong = FileDigest {
            sha256: to_hex(&Sha256::digest(b"something else")),
            bytes: got.bytes,
        };
        let err = commit_partial(&dst, &wrong).await.unwrap_err();
        match err {
            TransferError::Mismatch {
                expected,
                got: read_back,
                ..
            } => {
                assert_eq!(expected, wrong);
                assert_eq!(read_back, got);
            }
            other => panic!("expected Mismatch, got {other:?}"),
        }
        assert!(entries(dir.path()).is_empty());
    }

    #[tokio::test]
    async fn partial_changed_on_disk_fails_commit() {
        // The re-read at commit is what catches damage after hashing.
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("disk.raw");
        let stream = futures::stream::iter(chunks(vec![3u8; 4096], 4096));
        let got = receive_file(stream, &dst, None, u64::MAX).await.unwrap();
        File::options()
            .write(true)
            .open(partial_path(&dst))
            .unwrap()
            .write_all_at(b"x", 10)
            .unwrap();
        let err = commit_partial(&dst, &got).await.unwrap_err();
        assert!(matches!(err, TransferError::Mismatch { .. }), "{err:?}");
        assert!(entries(dir.path()).is_empty());
    }

    #[tokio::test]
    async fn commit_does_not_clobber_a_final_that_appeared() {
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("disk.raw");
        let stream = futures::stream::iter(chunks(vec![5u8; 1000], 1000));
        let got = receive_file(stream, &dst, None, u64::MAX).await.unwrap();
        std::fs::write(&dst, b"someone else's").unwrap();
        let err = commit_partial(&dst, &got).await.unwrap_err();
        assert!(
            matches!(&err, TransferError::Exists { path } if *path == dst),
            "{err:?}"
        );
        assert_eq!(std::fs::read(&dst).unwrap(), b"someone else's");
        assert_eq!(entries(dir.path()), vec!["disk.raw"]);
    }

    #[tokio::test]
    async fn too_large_is_refused_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("disk.raw");
        // Without an announced length: caught on the running total.
        let stream = futures::stream::iter(chunks(vec![1u8; 10_000], 1000));
        let err = receive_file(stream, &dst, None, 5000).await.unwrap_err();
        assert!(
            matches!(err, TransferError::TooLarge { limit: 5000, .. }),
            "{err:?}"
        );
        assert!(entries(dir.path()).is_empty());
        // An announced length over the limit is refused before any write.
        let stream = futures::stream::iter(chunks(vec![1u8; 10], 10));
        let err = receive_file(stream, &dst, Some(10_000), 5000)
            .await
            .unwrap_err();
        assert!(matches!(err, TransferError::TooLarge { .. }), "{err:?}");
        assert!(entries(dir.path()).is_empty());
    }

    #[tokio::test]
    async fn discard_partial_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("disk.raw");
        std::fs::write(partial_path(&dst), b"x").unwrap();
        discard_partial(&dst).unwrap();
        discard_partial(&dst).unwrap();
        assert!(entries(dir.path()).is_empty());
    }

    #[tokio::test]
    async fn empty_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("empty");
        File::create(&src).unwrap();
        let dst = dir.path().join("copy");
        let (len, stream) = file_stream(&src).await.unwrap();
        let got = receive_file(Box::pin(stream), &dst, Some(len), 0)
            .await
            .unwrap();
        assert_eq!(got, digest_file(&src).await.unwrap());
        commit_partial(&dst, &got).await.unwrap();
        assert_eq!(std::fs::metadata(&dst).unwrap().len(), 0);
    }
}
