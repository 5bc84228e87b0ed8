//! The spool's errors. Each one names the file (and, for data errors, the segment and
//! byte offset) and the cause, so an operator can find the damage without a debugger.

use std::io;
use std::path::{Path, PathBuf};

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

    /// A batch's checksum does not match: the bytes on disk changed after they were written.
    #[error("checksum mismatch in spool segment {segment} ({}) at byte offset {offset}: the batch is damaged; the reader stops here instead of skipping it", .path.display())]
    Checksum {
        segment: u64,
        offset: u64,
        path: PathBuf,
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
