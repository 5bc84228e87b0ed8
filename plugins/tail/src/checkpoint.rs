//! The durable checkpoint file: committed positions of every input of one agent.
//!
//! On disk it is JSON, `{"version": 1, "checkpoints": [...]}`. The version is read first
//! and decides how the rest is parsed, so a later format can be read next to this one.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::{Fingerprint, SourceId, TailError};

/// The committed position of one file, as persisted.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileCheckpoint {
    /// The input (tail configuration) the file belongs to.
    pub input: String,
    /// The byte stream the offset refers to.
    pub source: SourceId,
    /// Where the file was last seen. Used to find it again after a restart when the globs
    /// no longer match it (rotated away); identity still decides.
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
    /// Guards `dev`/`ino` against inode reuse.
    pub fingerprint: Fingerprint,
    /// Truncations seen so far; part of `source`.
    pub generation: u64,
    /// Every byte before this offset was committed (or deliberately skipped).
    pub offset: u64,
    /// The seq of the first event at `offset`: events of a source are numbered 0, 1, 2,
    /// ... (multiline events count once), and numbering goes on from here after a
    /// restart. None in version 1 files (events were numbered by byte offset then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

/// The persisted formats. Version 2 adds each file's `seq` and the agent's `sent`
/// report state; version 1 is still read.
#[derive(Debug, PartialEq, Eq)]
struct State {
    checkpoints: Vec<FileCheckpoint>,
    sent: Option<serde_json::Value>,
}

#[derive(serde::Deserialize)]
struct VersionProbe {
    version: u64,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct V1 {
    #[allow(dead_code)]
    version: u64,
    checkpoints: Vec<FileCheckpoint>,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct V2 {
    version: u64,
    checkpoints: Vec<FileCheckpoint>,
    /// What the agent keeps with its checkpoints (its report of what was acknowledged),
    /// opaque to this crate: saved in the same atomic write, so the two never disagree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sent: Option<serde_json::Value>,
}

impl State {
    fn encode(&self) -> Vec<u8> {
        let body = V2 {
            version: 2,
            checkpoints: self.checkpoints.clone(),
            sent: self.sent.clone(),
        };
        // Serializing plain structs of strings and integers into memory cannot fail.
        serde_json::to_vec_pretty(&body).unwrap_or_default()
    }

    fn decode(bytes: &[u8]) -> Result<State, String> {
        let probe: VersionProbe = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        match probe.version {
            1 => {
                let v1: V1 = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
                Ok(State {
                    checkpoints: v1.checkpoints,
                    sent: None,
                })
            }
            2 => {
                let v2: V2 = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
                Ok(State {
                    checkpoints: v2.checkpoints,
                    sent: v2.sent,
                })
            }
            v => Err(format!(
                "unsupported version {v}; this agent reads versions 1 and 2"
            )),
        }
    }
}

/// One durable checkpoint file per agent, for all inputs.
#[derive(Debug)]
pub struct CheckpointStore {
    path: PathBuf,
    tmp_path: PathBuf,
    last_saved: Option<State>,
    /// The `sent` value the file held when opened.
    opened_sent: Option<serde_json::Value>,
}

impl CheckpointStore {
    /// Opens the checkpoint file at `path` and returns what it holds. A missing file means
    /// no checkpoints yet; a file that cannot be parsed is an error naming the path, never
    /// a silent fresh start (which would re-read or skip whole files).
    pub fn open(path: &Path) -> Result<(CheckpointStore, Vec<FileCheckpoint>), TailError> {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".tmp");
        let store = CheckpointStore {
            path: path.to_path_buf(),
            tmp_path: path.with_file_name(name),
            last_saved: None,
            opened_sent: None,
        };
        // A leftover temp file is ignored on purpose: it exists only if a save stopped
        // before its rename, so it may be incomplete, and the stable file still holds the
        // last complete state. The next save overwrites it.
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((store, Vec::new())),
            Err(e) => return Err(TailError::io("cannot read checkpoint file", path, e)),
        };
        let state = State::decode(&bytes).map_err(|cause| TailError::CorruptCheckpoint {
            path: path.to_path_buf(),
            cause,
        })?;
        let mut store = store;
        store.opened_sent = state.sent;
        Ok((store, state.checkpoints))
    }

    /// The path of the stable checkpoint file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the file's content with `all`, atomically: after a crash at any point the
    /// file holds either the previous or the new state, complete.
    pub fn save(&mut self, all: &[FileCheckpoint]) -> Result<(), TailError> {
        self.save_with(all, None)
    }

    /// The `sent` value the file held when it was opened (None: none, or version 1).
    pub fn take_opened_sent(&mut self) -> Option<serde_json::Value> {
        self.opened_sent.take()
    }

    /// [`save`](Self::save), with the agent's `sent` value in the same atomic write.
    pub fn save_with(
        &mut self,
        all: &[FileCheckpoint],
        sent: Option<serde_json::Value>,
    ) -> Result<(), TailError> {
        let state = State {
            checkpoints: all.to_vec(),
            sent,
        };
        if self.last_saved.as_ref() == Some(&state) {
            return Ok(());
        }
        let bytes = state.encode();

        // 1. Write the new state to a temp file next to the stable one (same directory,
        //    so same file system, so the rename below is atomic). A crash here leaves
        //    the stable file untouched; `open` ignores the temp file.
        let mut tmp = File::create(&self.tmp_path)
            .map_err(|e| TailError::io("cannot create checkpoint temp file", &self.tmp_path, e))?;
        tmp.write_all(&bytes)
            .map_err(|e| TailError::io("cannot write checkpoint temp file", &self.tmp_path, e))?;
        // 2. Force the data to disk before the rename makes it visible. Without this a
        //    crash after the rename could leave the new name pointing at an empty or
        //    partial file (the metadata may reach the disk before the data).
        tmp.sync_all()
            .map_err(|e| TailError::io("cannot fsync checkpoint temp file", &self.tmp_path, e))?;
        drop(tmp);
        // 3. rename(2) replaces the stable name in one step: readers and a crash see the
        //    old file or the new one, never a mix.
        fs::rename(&self.tmp_path, &self.path)
            .map_err(|e| TailError::io("cannot rename checkpoint temp file to", &self.path, e))?;
        // 4. The rename lives in the directory; fsync it so the new name survives a power
        //    loss. Until this returns a crash may bring back the previous state, which is
        //    still complete and only older (more lines re-read, none lost).
        let dir = match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| TailError::io("cannot fsync checkpoint directory", dir, e))?;
        self.last_saved = Some(state);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: u64) -> FileCheckpoint {
        FileCheckpoint {
            input: "app".into(),
            source: SourceId(format!("app:1:{n}:deadbeef:0")),
            path: PathBuf::from(format!("/var/log/app{n}.log")),
            dev: 1,
            ino: n,
            fingerprint: Fingerprint {
                len: 256,
                crc: 0xdead_beef,
            },
            generation: 0,
            offset: n * 100,
            seq: Some(n),
        }
    }

    #[test]
    fn missing_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let (_, saved) = CheckpointStore::open(&dir.path().join("cp.json")).unwrap();
        assert!(saved.is_empty());
    }

    #[test]
    fn round_trip_and_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp.json");
        let (mut store, _) = CheckpointStore::open(&path).unwrap();
        store.save(&[sample(1), sample(2)]).unwrap();
        store.save(&[sample(3)]).unwrap();
        let (_, saved) = CheckpointStore::open(&path).unwrap();
        assert_eq!(saved, vec![sample(3)]);
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"version\": 2"), "{text}");
        // Nothing left behind but the stable file.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("cp.json")]);
    }

    #[test]
    fn corrupt_file_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp.json");
        fs::write(&path, b"{\"version\":1,\"checkpoints\":[{\"inp").unwrap();
        let err = CheckpointStore::open(&path).unwrap_err();
        assert!(matches!(err, TailError::CorruptCheckpoint { .. }));
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );

        fs::write(&path, b"{\"version\":7,\"checkpoints\":[]}").unwrap();
        let err = CheckpointStore::open(&path).unwrap_err().to_string();
        assert!(err.contains("unsupported version 7"), "{err}");
    }

    #[test]
    fn version_1_files_are_read_without_seqs_and_sent_travels_with_the_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp.json");
        let mut v1 = sample(4);
        v1.seq = None;
        let body = serde_json::json!({"version": 1, "checkpoints": [v1]});
        fs::write(&path, serde_json::to_vec(&body).unwrap()).unwrap();
        let (mut store, saved) = CheckpointStore::open(&path).unwrap();
        assert_eq!(saved, vec![v1.clone()]);
        assert_eq!(store.take_opened_sent(), None);
        let sent = serde_json::json!({"hours": [1, 2]});
        store.save_with(&[sample(4)], Some(sent.clone())).unwrap();
        let (mut store, saved) = CheckpointStore::open(&path).unwrap();
        assert_eq!(saved, vec![sample(4)]);
        assert_eq!(store.take_opened_sent(), Some(sent));
    }

    #[test]
    fn interrupted_save_keeps_the_previous_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp.json");
        let (mut store, _) = CheckpointStore::open(&path).unwrap();
        store.save(&[sample(1)]).unwrap();
        // A crash between writing the temp file and the rename leaves a partial temp file.
        fs::write(dir.path().join("cp.json.tmp"), b"{\"version\":1,\"check").unwrap();
        let (mut store, saved) = CheckpointStore::open(&path).unwrap();
        assert_eq!(saved, vec![sample(1)]);
        store.save(&[sample(2)]).unwrap();
        assert_eq!(CheckpointStore::open(&path).unwrap().1, vec![sample(2)]);
    }
}
