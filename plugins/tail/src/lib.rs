//! Rotation-safe file tailing with durable checkpoints, for the sluice agent.
//!
//! `sluice-tail` follows the files matched by a set of glob patterns and hands out their
//! lines, each tagged with a [`SourceId`] (which byte stream) and the byte range it
//! occupies in that stream. The caller acknowledges lines with [`Tailer::commit`] once
//! they are safe elsewhere (for the agent: once the relay acknowledged the chunk), and
//! persists [`Tailer::checkpoints`] with a [`CheckpointStore`]. The library is
//! synchronous and std-only; the agent drives it from one blocking thread.
//!
//! # Guarantees
//!
//! * **At-least-once per line.** A checkpoint only ever holds *committed* positions, so
//!   after a crash or restart every line that was not committed is read again.
//!   Duplicates therefore occur only for lines that were emitted but not yet committed
//!   when the process stopped; they carry the same `(SourceId, offset)` as the first time,
//!   so a consumer can drop them. When every emitted line was committed before a restart,
//!   each line is emitted exactly once.
//! * **Identity, not path.** A file is followed by device + inode, guarded by a
//!   [`Fingerprint`] of its first bytes against inode reuse. Renames (rotation) do not
//!   re-read a file, even if the glob matches the rotated names too, and a restart finds
//!   a file again after it was renamed while the agent was stopped.
//! * **Offsets only grow within a [`SourceId`].** A truncated file (copytruncate) starts a
//!   new generation, hence a new `SourceId`, at offset 0. A truncation is noticed at every
//!   read, not only by "the file is shorter than our position": the tailer keeps the last
//!   bytes it read before its position and checks, after each read, that the file still
//!   holds them there. So a file truncated and written past the old position again before
//!   the tailer looked is read from its first byte as the new stream; nothing of the new
//!   stream is skipped, and nothing of it is handed out under the old `SourceId`.
//! * **Known, counted losses only.** Bytes can be lost in these documented cases, all of
//!   them counted in [`TailStats`] and logged at warning level where they are detected:
//!   - copytruncate: bytes of the old stream after what was read when the truncation
//!     came ([`TailStats::bytes_lost_to_truncation`] counts those the tailer knew of: up
//!     to the largest size it saw, at its last read or scan; the copy is another file —
//!     exclude it from the globs or it is read as a new file). Bytes written after the
//!     tailer's last look and before the truncation were never seen by it and cannot be
//!     counted by it; reading often keeps them few. Lines handed out but not yet
//!     committed when the file is truncated cannot be read again if the process restarts
//!     before they are committed;
//!   - [`LongLines::Truncate`]: the rest of an over-long line ([`TailStats::bytes_skipped`]).
//!
//!   Outside the library's control: a file deleted *and* closed (agent stopped) before
//!   its lines were committed cannot be read again; a file rotated out of the globs is
//!   read to its end while the agent runs, and after a restart only from its
//!   checkpointed path.
//! * **Bounded memory.** Each open file keeps at most `max_line_bytes` + 1 bytes of an
//!   incomplete line; reading goes through one shared buffer of `read_chunk_bytes` +
//!   `max_line_bytes`.
//!
//! # Example
//!
//! ```
//! use sluice_tail::{CheckpointStore, TailConfig, Tailer};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! std::fs::write(dir.path().join("app.log"), b"hello\nworld\n")?;
//! let (mut store, saved) = CheckpointStore::open(&dir.path().join("checkpoints.json"))?;
//! let cfg = TailConfig {
//!     include: vec![format!("{}/*.log", dir.path().display())],
//!     ..TailConfig::default()
//! };
//! let mine: Vec<_> = saved.into_iter().filter(|c| c.input == "app").collect();
//! let mut tailer = Tailer::new("app", cfg, &mine)?;
//! let mut acked = Vec::new();
//! tailer.poll(1 << 20, &mut |line| {
//!     println!("{}", String::from_utf8_lossy(line.bytes));
//!     acked.push((line.source.clone(), line.end));
//! })?;
//! // ... later, when the lines are safe downstream:
//! for (source, end) in acked {
//!     tailer.commit(&source, end);
//! }
//! store.save(&tailer.checkpoints())?;
//! # Ok(())
//! # }
//! ```

mod checkpoint;
mod fingerprint;
mod lines;
mod tailer;
mod watch;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use checkpoint::{CheckpointStore, FileCheckpoint};
pub use fingerprint::{Fingerprint, FINGERPRINT_BYTES};
pub use tailer::Tailer;

/// Configuration of one tail input. Defaults are documented per field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TailConfig {
    /// Glob patterns of the files to follow.
    pub include: Vec<String>,
    /// Glob patterns of paths to leave alone even if `include` matches them (matched
    /// against the whole path).
    pub exclude: Vec<String>,
    /// Where to start in files without a checkpoint that exist when the [`Tailer`] is
    /// created. Files that appear later are always read from their first byte.
    /// Default: [`StartAt::Beginning`].
    pub start_at: StartAt,
    /// Longest line handed out, in bytes, without its newline. Default: 64 KiB.
    pub max_line_bytes: usize,
    /// What to do with a line longer than `max_line_bytes`. Default: [`LongLines::Split`].
    pub long_lines: LongLines,
    /// A last line without newline is handed out once it waited this long. Default: 5 s.
    pub partial_line_timeout: Duration,
    /// Bytes held open by deleted files before [`TailStats::deleted_bytes_alarm`] is raised
    /// and a warning logged. Default: 1 GiB.
    pub max_deleted_bytes: u64,
    /// Bytes read from one file before the next file gets its turn. Default: 256 KiB.
    pub read_chunk_bytes: usize,
    /// Open new files the moment they appear (inotify, Linux), not only at the next
    /// scan, so that a file rotated away and deleted within milliseconds is still read
    /// through its open handle. Scans still run and find everything where inotify is
    /// unavailable. Default: true.
    pub watch: bool,
}

impl Default for TailConfig {
    fn default() -> Self {
        TailConfig {
            include: Vec::new(),
            exclude: Vec::new(),
            start_at: StartAt::Beginning,
            max_line_bytes: 64 * 1024,
            long_lines: LongLines::Split,
            partial_line_timeout: Duration::from_secs(5),
            max_deleted_bytes: 1 << 30,
            read_chunk_bytes: 256 * 1024,
            watch: true,
        }
    }
}

/// Where to start reading a file seen for the first time when the [`Tailer`] is created.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum StartAt {
    /// From the first byte.
    Beginning,
    /// From the end: only what is written from now on.
    End,
}

/// What to do with a line longer than [`TailConfig::max_line_bytes`].
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum LongLines {
    /// Hand the line out in pieces of `max_line_bytes`, each marked `truncated`.
    Split,
    /// Hand out the first `max_line_bytes` (marked `truncated`), skip the rest.
    Truncate,
}

/// Stable identity of one byte stream.
///
/// It changes when the file is a different file (other device/inode or fingerprint) and
/// when a file is truncated (copytruncate), so byte offsets within one `SourceId` only
/// grow. Format: `<input>:<dev>:<ino>:<crc32 of the first bytes, hex>:<generation>`.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct SourceId(pub String);

impl std::fmt::Display for SourceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One line handed out by [`Tailer::poll`]. Borrowed from the tailer's read buffer: copy
/// what you keep.
#[derive(Clone, Copy, Debug)]
pub struct Line<'a> {
    /// The byte stream the line belongs to.
    pub source: &'a SourceId,
    /// The path the file had when the line was read.
    pub path: &'a Path,
    /// Byte offset of the line's first byte in the file.
    pub offset: u64,
    /// Byte offset just after the line's newline (what [`Tailer::commit`] takes).
    pub end: u64,
    /// The line without `"\n"` or `"\r\n"`; raw bytes, invalid UTF-8 kept as is.
    pub bytes: &'a [u8],
    /// The bytes are not the whole line as written: a piece of a split line, or the kept
    /// head of a truncated one (see [`LongLines`]).
    pub truncated: bool,
    /// The seq of the first event of this stream since it was resumed (see
    /// [`FileCheckpoint::seq`]); the reader numbers events on from it.
    pub start_seq: u64,
}

/// Counters and gauges of one [`Tailer`], for metrics. Counters start at 0 with each
/// `Tailer`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TailStats {
    /// Files held open (followed, or rotated away/deleted and not yet finished).
    pub files_open: u64,
    /// Of those, files no longer matched by the globs (rotated away or deleted).
    pub files_gone: u64,
    /// Size of deleted files still held open because they are not fully read and committed.
    pub deleted_bytes_held: u64,
    /// `deleted_bytes_held` exceeds [`TailConfig::max_deleted_bytes`].
    pub deleted_bytes_alarm: bool,
    /// Over-long lines cut by [`LongLines::Truncate`].
    pub lines_truncated: u64,
    /// Over-long lines handed out in pieces by [`LongLines::Split`].
    pub lines_split: u64,
    /// Bytes of over-long lines skipped by [`LongLines::Truncate`].
    pub bytes_skipped: u64,
    /// Last lines without newline handed out after `partial_line_timeout`.
    pub partial_lines_flushed: u64,
    /// Truncations (copytruncate) noticed; each starts a new generation.
    pub truncations: u64,
    /// Bytes of truncated streams that were not read: from the last consumed line to the
    /// largest size the tailer saw (an incomplete last line included). Bytes written after
    /// the tailer's last read or scan and before the truncation are not known to it.
    pub bytes_lost_to_truncation: u64,
}

/// Why the tailer or the checkpoint store failed. Every variant names the path involved.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    /// A glob in `include` or `exclude` does not parse.
    #[error("invalid glob pattern {pattern:?}: {source}")]
    Pattern {
        pattern: String,
        #[source]
        source: glob::PatternError,
    },
    /// A configuration value is out of range.
    #[error("invalid tail configuration: {0}")]
    Config(String),
    /// Reading or writing `path` failed.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The checkpoint file exists but cannot be understood. Starting over silently would
    /// re-read or skip data, so this is fatal until someone looks at the file.
    #[error("checkpoint file {path} is unreadable ({cause}); move it away to start over")]
    CorruptCheckpoint { path: PathBuf, cause: String },
}

impl TailError {
    fn io(action: &'static str, path: &Path, source: std::io::Error) -> TailError {
        TailError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}
