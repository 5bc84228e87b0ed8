//! The relay state (dedup marks and received counts, [`crate::dedup`]) on disk, next to
//! the spool: a full record (the *base*) and an append-only *log* of change records
//! after it. Persisting after a segment roll appends one record of what changed, so its
//! cost follows the traffic, not the number of sources known; when the log has grown
//! past twice the base, a new base replaces both (compaction).
//!
//! Files, in `<spool dir>/relay-state/`:
//!
//! - `<generation>.base`: one framed record of kind "full", written atomically;
//! - `<generation>.log`: framed records appended, each followed by an fdatasync.
//!
//! A frame is `len u32 LE | crc32 u32 LE (of the payload) | payload`. The spool snapshot
//! `relay-state` (the spool's own atomic state file) holds the manifest — which
//! generation is current — and its position pins the spool segments recovery replays.
//!
//! Crash reasoning:
//!
//! - A record is appended only after the spool data it covers is synced (the writer
//!   calls [`StateStore::append`] after a synced commit, with the spool's tail), so no
//!   record claims a mark beyond what is on disk.
//! - The manifest is written after the record, so its position is at or before the last
//!   record's: the segments recovery needs are never collected. A crash between the two
//!   leaves a record newer than the manifest, which recovery uses (it is durable).
//! - A torn append (a crash, a full disk) leaves a bad frame at the end of the log;
//!   reading stops there, and the log is cut back to its last good frame before the
//!   next append, so later records never follow garbage.
//! - Compaction writes the new generation whole before the manifest names it, and
//!   deletes the old one after: a crash in between leaves the old generation current
//!   and a stray new one, removed at the next start.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The log is compacted once it holds more than this many times the base's bytes…
const COMPACT_FACTOR: u64 = 2;
/// …and at least this much (a tiny base would otherwise be rewritten at every roll).
const COMPACT_MIN_LOG: u64 = 1 << 20;
const FRAME_HEADER: usize = 8;
/// How [`StateStore::open`] says a base fails its checksum or length (as opposed to an
/// I/O error), so a caller may fall back to an older generation.
pub const DAMAGED: &str = "is damaged (checksum or length)";

/// The spool snapshot's content from version 2 on: a pointer to the current generation.
/// (Version 1 held the whole state as JSON; see `Dedup::from_v1_snapshot`.)
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
#[serde(tag = "version")]
pub enum Manifest {
    #[serde(rename = "2")]
    V2 { generation: u64 },
}

impl Manifest {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// `None` when the bytes are not a version 2 manifest (then they may be version 1).
    pub fn decode(bytes: &[u8]) -> Option<Manifest> {
        // A version 1 snapshot is large: look at the start before parsing it as a manifest.
        if bytes.len() > 256 {
            return None;
        }
        serde_json::from_slice(bytes).ok()
    }
}

/// One generation's files, open for appending.
pub struct StateStore {
    dir: PathBuf,
    generation: u64,
    base_bytes: u64,
    log: File,
    /// Bytes of good frames in the log; the next record goes here.
    log_bytes: u64,
}

/// What [`StateStore::open`] read: the base, then the log's records, in order.
pub struct Loaded {
    pub store: StateStore,
    pub records: Vec<Vec<u8>>,
    /// The log ended in a bad frame (a torn append), cut off.
    pub torn: bool,
}

impl StateStore {
    pub fn dir_in(spool_dir: &Path) -> PathBuf {
        spool_dir.join("relay-state")
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether the next persist should be a compaction.
    pub fn should_compact(&self) -> bool {
        self.log_bytes > COMPACT_MIN_LOG.max(COMPACT_FACTOR * self.base_bytes)
    }

    /// Starts generation `generation` with `full` as its base and an empty log. Nothing
    /// refers to it until the caller writes the manifest.
    pub fn create(dir: &Path, generation: u64, full: &[u8]) -> io::Result<StateStore> {
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            // The new folder's own entry must be durable before anything relies on it.
            if let Some(parent) = dir.parent() {
                File::open(parent)?.sync_all()?;
            }
        }
        let mut framed = Vec::with_capacity(full.len() + FRAME_HEADER);
        frame(&mut framed, full);
        sluice_core::durable::write_atomic(&base_path(dir, generation), &framed)?;
        let log = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(log_path(dir, generation))?;
        log.sync_all()?;
        File::open(dir)?.sync_all()?;
        Ok(StateStore {
            dir: dir.to_path_buf(),
            generation,
            base_bytes: framed.len() as u64,
            log,
            log_bytes: 0,
        })
    }

    /// Opens generation `generation`: its base (which must be whole) and every good
    /// record of its log. Other generations' files are leftovers and are removed.
    pub fn open(dir: &Path, generation: u64) -> Result<Loaded, String> {
        let base_file = base_path(dir, generation);
        let base = std::fs::read(&base_file)
            .map_err(|e| format!("cannot read {}: {e}", base_file.display()))?;
        let (mut records, rest) = unframe(&base);
        if records.len() != 1 || !rest.is_empty() {
            return Err(format!("{} {DAMAGED}", base_file.display()));
        }
        let log_file = log_path(dir, generation);
        let log_bytes = match std::fs::read(&log_file) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(format!("cannot read {}: {e}", log_file.display())),
        };
        let (log_records, rest) = unframe(&log_bytes);
        let good = (log_bytes.len() - rest.len()) as u64;
        let log = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&log_file)
            .map_err(|e| format!("cannot open {}: {e}", log_file.display()))?;
        if !rest.is_empty() {
            log.set_len(good)
                .and_then(|()| log.sync_all())
                .map_err(|e| format!("cannot cut the torn end of {}: {e}", log_file.display()))?;
        }
        records.extend(log_records);
        let store = StateStore {
            dir: dir.to_path_buf(),
            generation,
            base_bytes: base.len() as u64,
            log,
            log_bytes: good,
        };
        store.remove_others();
        Ok(Loaded {
            store,
            records: records.into_iter().map(<[u8]>::to_vec).collect(),
            torn: !rest.is_empty(),
        })
    }

    /// Appends one record and makes it durable; returns the bytes written. On failure
    /// the log is cut back to its last good frame.
    pub fn append(&mut self, record: &[u8]) -> io::Result<u64> {
        let mut framed = Vec::with_capacity(record.len() + FRAME_HEADER);
        frame(&mut framed, record);
        let written = self
            .log
            .write_all_at(&framed, self.log_bytes)
            .and_then(|()| self.log.sync_data());
        match written {
            Ok(()) => {
                self.log_bytes += framed.len() as u64;
                Ok(framed.len() as u64)
            }
            Err(e) => {
                // If this fails too, the bad frame stays: reading stops there, and the
                // next open cuts it; appending after it is what must not happen, so the
                // next write goes to the same offset anyway.
                let _ = self.log.set_len(self.log_bytes);
                Err(e)
            }
        }
    }

    pub fn base_bytes(&self) -> u64 {
        self.base_bytes
    }

    pub fn log_bytes(&self) -> u64 {
        self.log_bytes
    }

    /// Removes every generation but this one (after the manifest names this one).
    pub fn remove_others(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let generation = name
                .strip_suffix(".base")
                .or_else(|| name.strip_suffix(".log"))
                .and_then(|g| g.parse::<u64>().ok());
            let stray_tmp = name.ends_with(".tmp");
            if stray_tmp || generation.is_some_and(|g| g != self.generation) {
                if let Err(e) = std::fs::remove_file(entry.path()) {
                    tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove an old relay state file");
                }
            }
        }
    }
}

fn base_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("{generation}.base"))
}

fn log_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("{generation}.log"))
}

fn frame(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    // Vec<u8>'s Write cannot fail.
    let _ = out.write_all(payload);
}

/// The good frames at the start of `bytes`, and what follows them (empty unless the end
/// is torn or damaged).
fn unframe(mut bytes: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    let mut out = Vec::new();
    while bytes.len() >= FRAME_HEADER {
        let len = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
        // No record is empty: a zero header is a file extended before its data was
        // written (a crash on a file system that does that), i.e. a torn end.
        if len == 0 {
            break;
        }
        let Some(payload) = bytes.get(FRAME_HEADER..FRAME_HEADER + len) else {
            break;
        };
        if crc32fast::hash(payload) != crc {
            break;
        }
        out.push(payload);
        bytes = &bytes[FRAME_HEADER + len..];
    }
    (out, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_append_is_cut_and_later_records_follow_good_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = StateStore::create(dir.path(), 3, b"base").unwrap();
        s.append(b"one").unwrap();
        s.append(b"two").unwrap();
        drop(s);
        // A crash in the middle of the third append.
        let log = log_path(dir.path(), 3);
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(&[9, 0, 0, 0, 1, 2]).unwrap();
        drop(f);
        let loaded = StateStore::open(dir.path(), 3).unwrap();
        assert!(loaded.torn);
        assert_eq!(
            loaded.records,
            vec![b"base".to_vec(), b"one".to_vec(), b"two".to_vec()]
        );
        let mut s = loaded.store;
        s.append(b"three").unwrap();
        drop(s);
        let loaded = StateStore::open(dir.path(), 3).unwrap();
        assert!(!loaded.torn);
        assert_eq!(loaded.records.len(), 4);
    }

    #[test]
    fn opening_a_generation_removes_the_others() {
        let dir = tempfile::tempdir().unwrap();
        StateStore::create(dir.path(), 1, b"old").unwrap();
        StateStore::create(dir.path(), 2, b"new").unwrap();
        let loaded = StateStore::open(dir.path(), 2).unwrap();
        assert_eq!(loaded.records, vec![b"new".to_vec()]);
        assert!(!base_path(dir.path(), 1).exists());
        assert!(StateStore::open(dir.path(), 1).is_err());
    }

    #[test]
    fn manifests_round_trip_and_v1_is_not_one() {
        let m = Manifest::V2 { generation: 7 };
        assert_eq!(Manifest::decode(&m.encode()), Some(m));
        assert_eq!(
            Manifest::decode(br#"{"version":"1","dedup":{},"received":{},"duplicates":0}"#),
            None
        );
    }
}
