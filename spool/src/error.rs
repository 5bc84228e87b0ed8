//! The spool's errors. Each one names the file (and, for data errors, the segment and
//! byte offset) and the cause, so an operator can find the damage without a debugger.

use std::io;
use std::path::{Path, PathBuf};

use crate::Position;

/// Everything that can go wrong in the spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Another process (usually a second relay) holds the spool's lock file.
    #[error("the spool in {} is in use by another process{} (lock file {} is held); run one relay per spool directory", .dir.display(), holder_suffix(.holder), .lock.display())]
    Locked {
        dir: PathBuf,
        lock: PathBuf,
        /// The content of the lock file, normally the holder's pid.
        holder: Option<String>,
    },

    /// The file system is full (ENOSPC or EDQUOT). The write was undone; nothing was acknowledged.
    #[error("disk full while trying to {op} {}: {source}", .path.display())]
    DiskFull {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// Any other I/O failure.
    #[error("cannot {op} {}: {source}", .path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A version 1 batch's checksum does not match: the bytes on disk changed after they
    /// were written. Version 1 has no batch magic to resynchronise on, so the reader
    /// stays here.
    #[error("checksum mismatch in spool segment {segment} ({}) at byte offset {offset}: the batch is damaged; the reader stops here instead of skipping it (a version 1 segment cannot be resynchronised)", .path.display())]
    Checksum {
        segment: u64,
        offset: u64,
        path: PathBuf,
    },

    /// A stretch of a segment holds no valid batch. The reader has moved past it, to the
    /// next valid batch: call `next` again to go on. The batches in it are lost.
    #[error("{damage}; the reader moved on to {}", .damage.to)]
    Damaged {
        damage: Box<Damage>,
        /// False if this damage was reported before (found at open, or by another
        /// reader), so that it is counted once.
        first_report: bool,
    },

    /// A segment's header or a batch's framing is invalid.
    #[error("spool segment {segment} ({}) is damaged at byte offset {offset}: {reason}", .path.display())]
    Corrupt {
        segment: u64,
        offset: u64,
        path: PathBuf,
        reason: String,
    },

    /// A segment a reader still needed is gone (deleted outside the spool, or collected
    /// while no cursor protected it).
    #[error("spool segment {segment} ({}) is missing but the reader has not finished it; was it deleted by hand or collected without a cursor?", .path.display())]
    SegmentMissing { segment: u64, path: PathBuf },

    /// The payload is larger than one batch may be.
    #[error("batch of {len} bytes is larger than the spool's limit of {max} bytes per batch")]
    BatchTooLarge { len: usize, max: u32 },

    /// A cursor or snapshot name that cannot be used as (part of) a file name.
    #[error("invalid {what} name {name:?}: {rule}")]
    InvalidName {
        what: &'static str,
        name: String,
        rule: &'static str,
    },

    /// A cursors or snapshot file that cannot be decoded.
    #[error("spool state file {} is unreadable: {reason}", .path.display())]
    StateFile { path: PathBuf, reason: String },

    /// An earlier write or fsync failed in a way that leaves the on-disk state unknown
    /// (e.g. fsync returned EIO: the kernel may already have dropped the dirty pages).
    /// The spool refuses further writes; reopening it runs recovery.
    #[error("the spool stopped accepting writes after an earlier failure ({cause}); restart the relay to recover the spool")]
    Poisoned { cause: String },
}

/// A stretch of a segment that holds no valid batch: what damage on disk cost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// The segment file.
    pub path: PathBuf,
    /// The first damaged byte, where a batch should have started.
    pub from: Position,
    /// Where the next valid batch starts, or the end of the segment's data.
    pub to: Position,
    /// Batches lost. Exact when the damaged batches' headers are intact (a flipped bit
    /// in a payload); a lower bound when damage also hit headers.
    pub batches: u64,
    /// Whether these batches had been acknowledged to their senders.
    pub acknowledged: Acknowledged,
    /// What was found at `from`.
    pub reason: &'static str,
}

impl Damage {
    /// Bytes lost, headers included.
    pub fn bytes(&self) -> u64 {
        self.to.offset - self.from.offset
    }
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "spool segment {} ({}) is damaged at byte offset {}..{} ({} bytes, {} batch{} lost, {}): {}",
            self.from.segment,
            self.path.display(),
            self.from.offset,
            self.to.offset,
            self.bytes(),
            self.batches,
            if self.batches == 1 { "" } else { "es" },
            self.acknowledged,
            self.reason
        )
    }
}

/// Whether damaged batches had been acknowledged to the clients that sent them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acknowledged {
    /// They had been committed (so the relay acknowledged them, and their senders will
    /// not send them again): a reader found the damage in committed data, or a batch
    /// written later records a committed end past the damage.
    Yes,
    /// Recovery cannot prove they had been committed (damage at the end of a segment
    /// whose next batch was appended in the same commit group).
    NotKnown,
}

impl std::fmt::Display for Acknowledged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Acknowledged::Yes => "acknowledged to clients",
            Acknowledged::NotKnown => "not known to have been acknowledged",
        })
    }
}

fn holder_suffix(holder: &Option<String>) -> String {
    match holder {
        Some(h) if !h.is_empty() => format!(" (pid {h})"),
        _ => String::new(),
    }
}

impl SpoolError {
    /// Wraps an I/O error, telling a full disk apart from other failures.
    pub(crate) fn io(op: &'static str, path: &Path, source: io::Error) -> SpoolError {
        let full = matches!(
            source.raw_os_error(),
            Some(libc::ENOSPC) | Some(libc::EDQUOT)
        );
        let path = path.to_path_buf();
        if full {
            SpoolError::DiskFull { op, path, source }
        } else {
            SpoolError::Io { op, path, source }
        }
    }

    /// Whether this is a full disk (the caller may retry after garbage collection).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, SpoolError::DiskFull { .. })
    }
}
