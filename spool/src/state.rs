//! Small state files next to the segments: the lock, the sink cursors and the named
//! snapshots. Cursors and snapshots are replaced atomically (see [`write_atomically`]).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Position, SpoolError};

pub(crate) const LOCK_FILE: &str = "spool.lock";
pub(crate) const CURSORS_FILE: &str = "cursors.json";
const SNAPSHOT_PREFIX: &str = "snapshot-";
const SNAPSHOT_SUFFIX: &str = ".snap";
pub(crate) const TMP_SUFFIX: &str = ".tmp";

/// Takes the spool's exclusive lock. The lock is an `flock` on a file that stays open for
/// the spool's lifetime: the kernel releases it when the process dies, however it dies,
/// so a crashed relay never leaves a stale lock behind.
pub(crate) fn lock(dir: &Path) -> Result<File, SpoolError> {
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| SpoolError::io("open lock file", &path, e))?;
    // SAFETY: flock on a valid, open file descriptor has no memory-safety requirements.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            return Err(SpoolError::Locked {
                dir: dir.to_path_buf(),
                lock: path,
                holder: Some(holder.trim().to_string()),
            });
        }
        return Err(SpoolError::io("lock", &path, err));
    }
    // The pid is only for the error message of a second relay; failing to write it is harmless.
    let _ = file
        .set_len(0)
        .and_then(|()| write!(file, "{}", std::process::id()));
    Ok(file)
}

/// Replaces `path` with `bytes` so that after a crash at any point the file holds either
/// the complete old content or the complete new content, never a mix:
///
/// 1. write everything to `<path>.tmp` — a crash here leaves only a stray temp file,
///    which [`remove_temp_files`] deletes at the next open; `path` is untouched;
/// 2. fsync the temp file — without this, the rename below could reach the disk before
///    the data does, and a power loss would leave `path` naming an empty or partial file;
/// 3. rename over `path` — atomic in POSIX: readers and a crash see old or new;
/// 4. fsync the directory — makes the rename itself durable. A crash before this may
///    bring back the old content after reboot, which is still a complete file. Callers
///    only rely on the new content (e.g. to collect segments) after this returns.
pub(crate) fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), SpoolError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(TMP_SUFFIX);
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp).map_err(|e| SpoolError::io("create", &tmp, e))?;
    f.write_all(bytes)
        .map_err(|e| SpoolError::io("write", &tmp, e))?;
    f.sync_all().map_err(|e| SpoolError::io("fsync", &tmp, e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| SpoolError::io("rename into place", path, e))?;
    sync_dir(dir)
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| SpoolError::io("fsync directory", dir, e))
}

/// Deletes temp files a crash left behind in step 1 or 2 of [`write_atomically`].
pub(crate) fn remove_temp_files(dir: &Path, names: &[String]) {
    for name in names.iter().filter(|n| n.ends_with(TMP_SUFFIX)) {
        let path = dir.join(name);
        match fs::remove_file(&path) {
            Ok(()) => {
                tracing::debug!(path = %path.display(), "removed a temp file left by a crash")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove a stray temp file")
            }
        }
    }
}

/// Moves a damaged file out of the way (`<name>.corrupt`, or `.corrupt.N` if taken) so an
/// operator can inspect it, and returns its new path.
pub(crate) fn set_aside(path: &Path) -> Result<PathBuf, SpoolError> {
    let base = path.as_os_str().to_owned();
    let mut n = 0u32;
    let target = loop {
        let mut t = base.clone();
        t.push(".corrupt");
        if n > 0 {
            t.push(format!(".{n}"));
        }
        let t = PathBuf::from(t);
        if !t.exists() {
            break t;
        }
        n += 1;
    };
    fs::rename(path, &target).map_err(|e| SpoolError::io("set aside damaged file", path, e))?;
    Ok(target)
}

/// Snapshot names become parts of file names, so keep them tame.
pub(crate) fn check_name(what: &'static str, name: &str) -> Result<(), SpoolError> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(SpoolError::InvalidName {
            what,
            name: name.to_string(),
            rule: "use 1 to 100 characters from A-Z a-z 0-9 _ -",
        })
    }
}

// ---- cursors ---------------------------------------------------------------------

/// The cursors file. New versions are added as variants so older files stay readable.
#[derive(Serialize, Deserialize)]
#[serde(tag = "version")]
enum CursorsFile {
    #[serde(rename = "1")]
    V1 {
        cursors: BTreeMap<String, Position>,
        /// The spool's committed end when the file was written: everything before it
        /// had been acknowledged. Lets recovery confirm the last commit group, which no
        /// later batch header can. Absent in files of older builds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        committed: Option<Position>,
    },
}

pub(crate) fn encode_cursors(
    cursors: &BTreeMap<String, Position>,
    committed: Option<Position>,
) -> Vec<u8> {
    let file = CursorsFile::V1 {
        cursors: cursors.clone(),
        committed,
    };
    // Maps of strings to plain structs always serialize.
    serde_json::to_vec_pretty(&file).expect("cursors serialize")
}

/// What the cursors file holds.
pub(crate) type Cursors = (BTreeMap<String, Position>, Option<Position>);

/// Loads the cursors file (cursors and the committed end); None if there is none yet.
pub(crate) fn load_cursors(path: &Path) -> Result<Option<Cursors>, SpoolError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(SpoolError::io("read", path, e)),
    };
    match serde_json::from_slice::<CursorsFile>(&bytes) {
        Ok(CursorsFile::V1 { cursors, committed }) => Ok(Some((cursors, committed))),
        Err(e) => Err(SpoolError::StateFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

// ---- snapshots -------------------------------------------------------------------
//
// A snapshot is an opaque blob (the relay's dedup table can be large), so it is stored
// in binary rather than JSON, which would triple the size of a byte array:
//
//   "SLSN" | version u16 LE (=1) | reserved u16 | at.segment u64 LE | at.offset u64 LE
//   | len u64 LE | crc32 u32 LE (over everything before it and the blob) | blob[len]

const SNAP_MAGIC: [u8; 4] = *b"SLSN";
const SNAP_HEADER_LEN: usize = 4 + 2 + 2 + 8 + 8 + 8 + 4;

/// A decoded snapshot file; versions are variants, as for the cursors file.
pub(crate) enum SnapshotFile {
    V1 { at: Position, bytes: Vec<u8> },
}

pub(crate) fn snapshot_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{SNAPSHOT_PREFIX}{name}{SNAPSHOT_SUFFIX}"))
}

/// The snapshot name of a file name, or None for any other file.
pub(crate) fn parse_snapshot_name(file_name: &str) -> Option<&str> {
    let name = file_name
        .strip_prefix(SNAPSHOT_PREFIX)?
        .strip_suffix(SNAPSHOT_SUFFIX)?;
    check_name("snapshot", name).ok().map(|()| name)
}

pub(crate) fn encode_snapshot(at: Position, blob: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SNAP_HEADER_LEN + blob.len());
    out.extend_from_slice(&SNAP_MAGIC);
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&at.segment.to_le_bytes());
    out.extend_from_slice(&at.offset.to_le_bytes());
    out.extend_from_slice(&(blob.len() as u64).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&out);
    crc.update(blob);
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(blob);
    out
}

pub(crate) fn decode_snapshot(path: &Path, mut raw: Vec<u8>) -> Result<SnapshotFile, SpoolError> {
    let bad = |reason: String| SpoolError::StateFile {
        path: path.to_path_buf(),
        reason,
    };
    if raw.len() < SNAP_HEADER_LEN {
        return Err(bad(format!(
            "{} bytes is shorter than a snapshot header",
            raw.len()
        )));
    }
    if raw[0..4] != SNAP_MAGIC {
        return Err(bad("bad magic: not a spool snapshot".into()));
    }
    let u64_at = |i: usize| u64::from_le_bytes(raw[i..i + 8].try_into().expect("8 bytes"));
    let version = u16::from_le_bytes([raw[4], raw[5]]);
    if version != 1 {
        return Err(bad(format!("unsupported snapshot version {version}")));
    }
    let at = Position {
        segment: u64_at(8),
        offset: u64_at(16),
    };
    let len = u64_at(24);
    if len != (raw.len() - SNAP_HEADER_LEN) as u64 {
        return Err(bad(format!(
            "header says {len} bytes but the file holds {}",
            raw.len() - SNAP_HEADER_LEN
        )));
    }
    let stored = u32::from_le_bytes(raw[32..36].try_into().expect("4 bytes"));
    let mut crc = crc32fast::Hasher::new();
    crc.update(&raw[..32]);
    crc.update(&raw[SNAP_HEADER_LEN..]);
    if crc.finalize() != stored {
        return Err(bad("checksum mismatch".into()));
    }
    raw.drain(..SNAP_HEADER_LEN);
    Ok(SnapshotFile::V1 { at, bytes: raw })
}

pub(crate) fn read_snapshot_file(path: &Path) -> Result<Option<SnapshotFile>, SpoolError> {
    match fs::read(path) {
        Ok(raw) => decode_snapshot(path, raw).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(SpoolError::io("read", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_round_trip_and_damage() {
        let at = Position {
            segment: 3,
            offset: 16,
        };
        let enc = encode_snapshot(at, b"state");
        let p = Path::new("x");
        let SnapshotFile::V1 { at: a, bytes } = decode_snapshot(p, enc.clone()).unwrap();
        assert_eq!((a, bytes.as_slice()), (at, &b"state"[..]));
        for i in 0..enc.len() {
            let mut bad = enc.clone();
            bad[i] ^= 0x40;
            assert!(decode_snapshot(p, bad).is_err(), "flip at {i} undetected");
        }
        assert!(decode_snapshot(p, enc[..enc.len() - 1].to_vec()).is_err());
    }

    #[test]
    fn cursors_file_is_versioned() {
        let mut m = BTreeMap::new();
        m.insert(
            "kafka".to_string(),
            Position {
                segment: 1,
                offset: 40,
            },
        );
        let enc = encode_cursors(&m, None);
        let text = String::from_utf8(enc.clone()).unwrap();
        assert!(text.contains("\"version\": \"1\""), "{text}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(CURSORS_FILE);
        fs::write(&p, enc).unwrap();
        assert_eq!(load_cursors(&p).unwrap(), Some((m.clone(), None)));
        let at = Position {
            segment: 2,
            offset: 99,
        };
        fs::write(&p, encode_cursors(&m, Some(at))).unwrap();
        assert_eq!(load_cursors(&p).unwrap(), Some((m, Some(at))));
    }

    #[test]
    fn names() {
        assert!(check_name("snapshot", "relay-state_1").is_ok());
        for bad in ["", ".x", "a/b", "a.b", "ü", &"x".repeat(101)] {
            assert!(check_name("snapshot", bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_snapshot_name("snapshot-relay.snap"), Some("relay"));
        assert_eq!(parse_snapshot_name("snapshot-relay.snap.tmp"), None);
    }
}
