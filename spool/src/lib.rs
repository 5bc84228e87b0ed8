//! The relay's durable spool: a segmented, checksummed, append-only log on local disk,
//! with persisted per-sink cursors and named snapshots.
//!
//! One writer ([`Spool`]) appends opaque batches and commits them in groups; any number
//! of readers ([`SpoolReader`], one per sink, each on its own thread) follow the
//! committed data independently. Everything is synchronous `std::fs`; run it on a
//! dedicated thread or `spawn_blocking`.
//!
//! ```
//! use sluice_spool::{Spool, SpoolConfig};
//!
//! # fn main() -> Result<(), sluice_spool::SpoolError> {
//! # let tmp = tempfile::tempdir().unwrap();
//! # let dir = tmp.path();
//! let (mut spool, recovery) = Spool::open(dir, SpoolConfig::default())?;
//! assert!(recovery.damaged.is_empty() && recovery.corrupt_segments.is_empty());
//!
//! // Writer: append a group of batches, then commit once (one fdatasync) and ack them all.
//! let first = spool.append(b"chunk from agent a")?;
//! spool.append(b"chunk from agent b")?;
//! spool.commit()?;
//!
//! // A sink reads from its persisted cursor, delivers, then stores the position after.
//! let mut reader = spool.reader(spool.head())?;
//! let mut buf = Vec::new();
//! let (at, next) = reader.next(&mut buf)?.expect("committed batch");
//! assert_eq!((at, buf.as_slice()), (first, &b"chunk from agent a"[..]));
//! spool.set_cursor("kafka", next)?;
//! spool.gc()?; // frees whole segments every cursor and snapshot is past
//! # Ok(()) }
//! ```
//!
//! # Guarantees
//!
//! - **Durable when acknowledged.** With [`FsyncPolicy::Always`], [`Spool::commit`]
//!   returns only after `fdatasync` of the active segment; segments are also synced
//!   when the writer rolls past them, and the directory is synced when a segment is
//!   created. A batch acknowledged after `commit` survives a crash or power loss.
//!   `Interval` and `Never` trade that for throughput: a *process* crash loses nothing
//!   that was committed (the data is in the page cache), a power loss may lose the
//!   batches since the last sync.
//! - **Readers see committed data only**, so with `Always` a reader never sees a batch
//!   that a later recovery could remove.
//! - **Damage costs only what it touched, and is never skipped silently.** Every batch
//!   carries a magic, a header CRC and a payload CRC (segment format version 2; see the
//!   `segment` module). Recovery and readers both *resynchronise*: past a damaged batch
//!   they scan forward for the next valid batch header and keep every valid batch.
//!   Each damaged stretch is reported once per reader as [`SpoolError::Damaged`] (the
//!   reader has then moved past it; call `next` again to go on) and, when
//!   [`Spool::open`] finds it, in [`Recovery::damaged`], with the segment file, the
//!   byte range, the batches lost and whether they had been acknowledged
//!   ([`Acknowledged`]). At open, a torn tail of the newest segment (an append
//!   interrupted by a crash: an incomplete or damaged last batch, a zero-filled tail) is
//!   truncated and counted in [`Recovery::torn_bytes_truncated`]; so is damage inside
//!   the newest segment's last commit group when recovery cannot confirm that commit
//!   (no later batch confirms it, and [`Spool::close`] did not record it at a clean stop;
//!   keeping the valid batches after it could let the relay's dedup discard the resend
//!   of the damaged ones; see [`Recovery::torn_batches_dropped`]). Only a damaged
//!   *segment header*, and any damage in a version 1 segment written by an older build
//!   (which has no magic to resynchronise on), still sets the whole segment aside as
//!   `<name>.corrupt` ([`Recovery::corrupt_segments`]). Opening always succeeds unless
//!   the disk itself fails.
//! - **Bounded.** [`Spool::is_full`] reports when live segments reach `max_bytes`; the
//!   relay stops acknowledging until [`Spool::gc`] frees space. A batch is at most
//!   [`MAX_BATCH_BYTES`], so a damaged length field cannot cause a huge allocation.
//! - **State files are atomic.** Cursors and snapshots are replaced with temp file +
//!   fsync + rename + directory fsync: after a crash each holds its old or new content.
//! - **One writer per directory**, enforced by an `flock` on `spool.lock`.
//!
//! Recovery reads every segment once to verify checksums, so opening a full 10 GiB
//! spool costs one sequential read of it.
//!
//! The on-disk format is described in the `segment` module; see [`SEGMENT_HEADER_LEN`]
//! and [`BATCH_HEADER_LEN`].

mod error;
mod reader;
mod segment;
mod shared;
mod spool;
mod state;

use std::path::PathBuf;
use std::time::Duration;

pub use error::{Acknowledged, Damage, SpoolError};
pub use reader::SpoolReader;
pub use segment::{BATCH_HEADER_LEN, MAX_BATCH_BYTES, SEGMENT_HEADER_LEN};
pub use spool::Spool;

/// Where a batch lives: a segment id and the byte offset of the batch's header in it.
///
/// Positions order like the log. The position *after* a batch (the next batch's
/// offset, or the segment's end) is what a sink stores as its cursor. An offset inside
/// a segment's header (e.g. 0) means "the start of that segment".
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.segment, self.offset)
    }
}

/// When [`Spool::commit`] calls `fdatasync`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// At every commit that has new data: acknowledged data survives power loss.
    Always,
    /// At a commit when this much time passed since the last sync. Readers see the
    /// data at every commit, synced or not.
    Interval(Duration),
    /// Never (the kernel writes back on its own schedule); segments are not synced at
    /// rolls either. Survives a process crash, not a power loss: after one, a closed
    /// segment whose tail did not reach the disk is set aside as damaged.
    Never,
}

/// Spool settings.
#[derive(Clone, Debug)]
pub struct SpoolConfig {
    /// A segment is closed and a new one started when the next batch would make it
    /// larger than this (a single larger batch gets a segment of its own). Default 64 MiB.
    pub segment_bytes: u64,
    /// [`Spool::is_full`] once live segments hold this many bytes. Default 10 GiB.
    pub max_bytes: u64,
    /// Default [`FsyncPolicy::Always`].
    pub fsync: FsyncPolicy,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            segment_bytes: 64 * 1024 * 1024,
            max_bytes: 10 * 1024 * 1024 * 1024,
            fsync: FsyncPolicy::Always,
        }
    }
}

/// What [`Spool::open`] found and repaired.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Live segments after recovery.
    pub segments: usize,
    /// Valid batches in them.
    pub batches: u64,
    /// Bytes in them (headers included).
    pub bytes: u64,
    /// Bytes cut off the newest segment's torn tail (appends a crash interrupted).
    pub torn_bytes_truncated: u64,
    /// Valid batches cut off with the torn tail because they followed damage inside the
    /// newest segment's last commit group (normally 0; see the crate docs).
    pub torn_batches_dropped: u64,
    /// Damaged stretches inside live segments: their batches are lost, every batch
    /// around them is kept. Readers skip them (with [`SpoolError::Damaged`]).
    pub damaged: Vec<Damage>,
    /// Damaged segments renamed to `*.corrupt` (their data is not read): a damaged
    /// segment header, or damage in a version 1 segment.
    pub corrupt_segments: Vec<PathBuf>,
    /// Damaged cursors or snapshot files renamed to `*.corrupt` (treated as absent).
    pub corrupt_state_files: Vec<PathBuf>,
}
