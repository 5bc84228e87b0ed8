//! A sink's state on disk: its cursor, its ledger counts and its own recovery data,
//! persisted together so that after a crash they agree.
//!
//! Files, in `<data_dir>/sink-state/<name>/`, in the [`StateStore`] format: a *base* record
//! holding the whole [`SinkState`] and a *log* of [`Change`] records after it. Each
//! persist (after every delivery) appends one record of what that delivery changed — the
//! new cursor, the counts it added, the sink's recovery data — with one fdatasync, so its
//! cost follows the delivery, not the number of tags and hours the sink has counted.
//! When the log has grown past twice the base, the next persist writes a new generation
//! whole (compaction) and removes the old one.
//!
//! The current generation is the highest one whose base is whole: a base is written
//! atomically and holds everything the older generation did, so a crash during a
//! compaction leaves either generation usable and loses nothing. A log record that
//! cannot be read (a torn or zeroed end) ends the log there, and the next persist
//! compacts.
//!
//! Sink state files of version 1 (`<data_dir>/sinks/<name>.json`, the whole state
//! rewritten at every delivery) are read once, turned into generation 1, and renamed
//! `<name>.json.converted`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sluice_spool::Position;

use crate::ledger::SinkCounts;
use crate::state_store::StateStore;

#[derive(Serialize, Deserialize, Default, Clone, Debug, PartialEq)]
pub struct SinkState {
    pub cursor: Option<Position>,
    pub counts: SinkCounts,
    /// The sink's own recovery data ([`crate::sinks::Deliver::recovery_state`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<serde_json::Value>,
    /// Where the delivery under way ends, for a sink that [replays
    /// exactly](crate::sinks::Deliver::replays_exactly): set before it starts, cleared
    /// after it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivering: Option<Position>,
}

/// What one persist changed.
#[derive(Serialize, Deserialize, Default, Debug)]
struct Change {
    cursor: Option<Position>,
    /// Counts added since the previous record.
    added: SinkCounts,
    /// The sink's recovery data as it is now (small: the Kafka sink's partition offsets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    resume: Option<serde_json::Value>,
    /// Hours before this one are forgotten (`relay.ledger_retention`).
    forgotten_before: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    delivering: Option<Position>,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Record {
    Full { version: u32, state: SinkState },
    Change(Change),
}

const VERSION: u32 = 2;

/// Version 1: the whole state in one JSON file.
#[derive(Deserialize)]
#[serde(tag = "version")]
enum V1File {
    #[serde(rename = "1")]
    V1(SinkState),
}

/// A sink's state, in memory and on disk. Changes go through [`SinkStateFile::count`] so
/// the next persist knows what to append.
pub struct SinkStateFile {
    dir: PathBuf,
    store: Option<StateStore>,
    state: SinkState,
    /// Counts added since the last record that was written.
    added: SinkCounts,
    forgotten_before: u64,
    /// The log ended in a record that could not be read: write a new generation next.
    must_compact: bool,
}

/// The folder a sink's state lives in. Sink names are non-empty, hold no `/`, `\\` or
/// control characters and do not start with `.` (`config.rs`), so `.removed` is no
/// sink's folder.
pub fn state_dir(data_dir: &Path, sink: &str) -> PathBuf {
    data_dir.join("sink-state").join(sink)
}

fn v1_path(data_dir: &Path, sink: &str) -> PathBuf {
    data_dir.join("sinks").join(format!("{sink}.json"))
}

/// Sets a removed sink's state aside (in `sink-state/.removed/<name>`), so that adding
/// a sink of that name later starts where its `start_from` says, not at a cursor long
/// collected.
pub fn set_aside(data_dir: &Path, sink: &str) -> std::io::Result<()> {
    let dir = state_dir(data_dir, sink);
    if dir.exists() {
        let removed = data_dir.join("sink-state").join(".removed");
        std::fs::create_dir_all(&removed)?;
        let aside = removed.join(sink);
        if aside.exists() {
            std::fs::remove_dir_all(&aside)?;
        }
        std::fs::rename(&dir, &aside)?;
    }
    let v1 = v1_path(data_dir, sink);
    if v1.exists() {
        std::fs::rename(&v1, v1.with_extension("json.removed"))?;
    }
    Ok(())
}

impl SinkStateFile {
    /// Reads the sink's state (empty for a new sink). A version 1 file is converted.
    pub fn open(data_dir: &Path, sink: &str) -> Result<SinkStateFile, String> {
        let dir = state_dir(data_dir, sink);
        let mut file = SinkStateFile {
            dir: dir.clone(),
            store: None,
            state: SinkState::default(),
            added: SinkCounts::default(),
            forgotten_before: 0,
            must_compact: false,
        };
        let mut generations = generations(&dir)?;
        generations.sort_unstable_by(|a, b| b.cmp(a));
        let mut damaged = Vec::new();
        for generation in generations {
            match StateStore::open(&dir, generation) {
                Ok(loaded) => {
                    let (state, unread) = replay(&loaded.records).map_err(|e| {
                        format!("sink state in {} is unreadable: {e}", dir.display())
                    })?;
                    file.state = state;
                    if loaded.torn || unread > 0 {
                        tracing::warn!(path = %dir.display(), unreadable_records = unread, "the sink state log ended in a torn record (a crash while saving); it was cut off there, and the deliveries it recorded are repeated");
                    }
                    file.must_compact = unread > 0;
                    file.store = Some(loaded.store);
                    break;
                }
                // Only a damaged base falls back to an older generation; an I/O error
                // must not make the relay go back in time.
                Err(e) if e.contains(crate::state_store::DAMAGED) => {
                    tracing::warn!(path = %dir.display(), error = %e, "a sink state generation is damaged; trying the one before it");
                    damaged.push(e);
                }
                Err(e) => return Err(e),
            }
        }
        if file.store.is_none() && !damaged.is_empty() {
            return Err(format!(
                "sink state in {} is damaged: {}",
                dir.display(),
                damaged.join("; ")
            ));
        }
        let v1 = v1_path(data_dir, sink);
        if file.store.is_none() {
            match std::fs::read(&v1) {
                Ok(bytes) => {
                    let V1File::V1(state) = serde_json::from_slice(&bytes)
                        .map_err(|e| format!("sink state {} is unreadable: {e}", v1.display()))?;
                    file.state = state;
                    file.compact()
                        .map_err(|e| format!("cannot convert {}: {e}", v1.display()))?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("cannot read sink state {}: {e}", v1.display())),
            }
        }
        // Converted (now or at an earlier start that crashed before renaming it).
        if file.store.is_some() && v1.exists() {
            let done = v1.with_extension("json.converted");
            std::fs::rename(&v1, &done)
                .map_err(|e| format!("cannot rename the converted {}: {e}", v1.display()))?;
        }
        Ok(file)
    }

    pub fn state(&self) -> &SinkState {
        &self.state
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Adds to the sink's counts (saved with the next [`persist`](Self::persist)).
    pub fn count(&mut self, change: impl Fn(&mut SinkCounts)) {
        change(&mut self.state.counts);
        change(&mut self.added);
    }

    pub fn set_resume(&mut self, resume: Option<serde_json::Value>) {
        self.state.resume = resume;
    }

    pub fn set_delivering(&mut self, end: Option<Position>) {
        self.state.delivering = end;
    }

    /// Forgets counts of hours before `hour` (saved with the next persist).
    pub fn forget_before(&mut self, hour: u64) {
        if hour > self.forgotten_before {
            self.forgotten_before = hour;
        }
        self.state.counts.forget_before(hour);
    }

    /// Saves the cursor with every change since the last persist; returns the bytes
    /// written. On failure nothing is lost from memory: the next persist writes it all.
    pub fn persist(&mut self, cursor: Position) -> std::io::Result<u64> {
        self.state.cursor = Some(cursor);
        let Some(store) = self.store.as_ref() else {
            return self.compact();
        };
        if self.must_compact || store.should_compact() {
            match self.compact() {
                Ok(n) => return Ok(n),
                // A full disk has room for a small record sooner than for the whole
                // state: append, and compact at a later persist.
                Err(e) if !self.must_compact => {
                    tracing::warn!(path = %self.dir.display(), error = %e, "cannot compact the sink state; appending instead");
                }
                Err(e) => return Err(e),
            }
        }
        let bytes = serde_json::to_vec(&Record::Change(Change {
            cursor: self.state.cursor,
            added: self.added.clone(),
            resume: self.state.resume.clone(),
            forgotten_before: self.forgotten_before,
            delivering: self.state.delivering,
        }))?;
        let store = self.store.as_mut().expect("checked above");
        let n = store.append(&bytes)?;
        self.added = SinkCounts::default();
        Ok(n)
    }

    /// Writes the whole state as a new generation and removes the older ones.
    fn compact(&mut self) -> std::io::Result<u64> {
        let next = self.store.as_ref().map_or(1, |s| s.generation() + 1);
        let bytes = serde_json::to_vec(&Record::Full {
            version: VERSION,
            state: self.state.clone(),
        })?;
        let store = StateStore::create(&self.dir, next, &bytes)?;
        store.remove_others();
        let written = store.base_bytes();
        self.store = Some(store);
        self.added = SinkCounts::default();
        self.must_compact = false;
        Ok(written)
    }
}

/// The generations that have a base file in `dir` (none when it does not exist).
fn generations(dir: &Path) -> Result<Vec<u64>, String> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot read {}: {e}", dir.display())),
    };
    Ok(entries
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".base")?
                .parse::<u64>()
                .ok()
        })
        .collect())
}

/// The state the records make, and how many records at the end could not be read (the
/// log is taken to end before them).
fn replay(records: &[Vec<u8>]) -> Result<(SinkState, usize), String> {
    let mut state = SinkState::default();
    for (i, bytes) in records.iter().enumerate() {
        let record: Record = match serde_json::from_slice(bytes) {
            Ok(r) => r,
            Err(e) if i == 0 => return Err(format!("the base: {e}")),
            Err(_) => return Ok((state, records.len() - i)),
        };
        match (i, record) {
            (0, Record::Full { version, state: s }) if version <= VERSION => state = s,
            (0, Record::Full { version, .. }) => {
                return Err(format!(
                    "written by a newer sluice (state version {version}, this one reads up to {VERSION})"
                ))
            }
            (0, Record::Change(_)) => return Err("the base is not a full record".into()),
            (_, Record::Full { .. }) => return Err(format!("record {i}: a full record in the log")),
            (_, Record::Change(c)) => {
                state.cursor = c.cursor;
                state.counts.merge(&c.added);
                state.counts.forget_before(c.forgotten_before);
                state.resume = c.resume;
                state.delivering = c.delivering;
            }
        }
    }
    Ok((state, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(segment: u64, offset: u64) -> Position {
        Position { segment, offset }
    }

    /// A sink that has counted many tags and hours: a delivery's persist writes what the
    /// delivery changed, not the whole history; reopening gives back the same state.
    #[test]
    fn a_persist_writes_the_change_not_the_history() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = SinkStateFile::open(dir.path(), "k").unwrap();
        f.count(|c| {
            for tag in 0..100 {
                for hour in 0..100 {
                    c.delivered
                        .add(&format!("app.service-{tag}"), 490_000 + hour, 7);
                }
            }
        });
        let base = f.persist(pos(0, 10)).unwrap();
        assert!(
            base > 100_000,
            "the first persist writes the state whole ({base} bytes)"
        );
        for i in 0..50u64 {
            f.count(|c| {
                c.offered.add("app.service-3", 490_099, 5);
                c.delivered.add("app.service-3", 490_099, 5);
            });
            f.set_resume(Some(serde_json::json!({ "p0": i })));
            let n = f.persist(pos(0, 100 + i)).unwrap();
            assert!(
                n < 512,
                "persist {i} wrote {n} bytes against a {base}-byte state"
            );
        }
        let expected = f.state().clone();
        drop(f);
        let back = SinkStateFile::open(dir.path(), "k").unwrap();
        assert_eq!(back.state(), &expected);
        assert_eq!(
            back.state().counts.delivered.get("app.service-3", 490_099),
            7 + 250
        );
        assert_eq!(back.state().cursor, Some(pos(0, 149)));
    }

    #[test]
    fn the_log_is_compacted_and_forgotten_hours_stay_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = SinkStateFile::open(dir.path(), "k").unwrap();
        for i in 0..20_000u64 {
            f.count(|c| c.delivered.add("t", 1000 + i / 100, 1));
            f.persist(pos(1, i)).unwrap();
        }
        f.forget_before(1100);
        f.persist(pos(2, 0)).unwrap();
        let log = std::fs::metadata(dir.path().join("sink-state/k"))
            .map(|_| {
                std::fs::read_dir(dir.path().join("sink-state/k"))
                    .unwrap()
                    .flatten()
                    .map(|e| e.metadata().unwrap().len())
                    .sum::<u64>()
            })
            .unwrap();
        assert!(
            log < 3 << 20,
            "state files hold {log} bytes: the log is not compacted"
        );
        let expected = f.state().clone();
        drop(f);
        let back = SinkStateFile::open(dir.path(), "k").unwrap();
        assert_eq!(back.state(), &expected);
        assert_eq!(back.state().counts.delivered.get("t", 1099), 0);
        assert_eq!(back.state().counts.delivered.get("t", 1100), 100);
        assert_eq!(back.state().counts.delivered.total(), 20_000 - 10_000);
    }

    #[test]
    fn a_version_1_file_is_converted_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sinks")).unwrap();
        let v1 = br#"{"version":"1","cursor":{"segment":3,"offset":40},"counts":{"offered":{},"delivered":{"a":{"2026-11-23T09":5}},"dropped":{}},"resume":{"x":1}}"#;
        std::fs::write(dir.path().join("sinks/k.json"), v1).unwrap();
        let mut f = SinkStateFile::open(dir.path(), "k").unwrap();
        assert_eq!(f.state().cursor, Some(pos(3, 40)));
        assert_eq!(f.state().counts.delivered.total(), 5);
        assert!(!dir.path().join("sinks/k.json").exists());
        assert!(dir.path().join("sinks/k.json.converted").exists());
        f.count(|c| c.delivered.add("a", 1, 1));
        f.persist(pos(3, 50)).unwrap();
        drop(f);
        let back = SinkStateFile::open(dir.path(), "k").unwrap();
        assert_eq!(back.state().counts.delivered.total(), 6);
        assert_eq!(back.state().resume, Some(serde_json::json!({ "x": 1 })));
    }

    /// A sink state after two deliveries of 3 and 4 events (generation 1, two records).
    fn two_deliveries(data_dir: &Path) -> SinkStateFile {
        let mut f = SinkStateFile::open(data_dir, "k").unwrap();
        f.count(|c| c.delivered.add("a", 1, 3));
        f.persist(pos(0, 1)).unwrap();
        f.count(|c| c.delivered.add("a", 1, 4));
        f.persist(pos(0, 2)).unwrap();
        f
    }

    /// A crash during a compaction, after the new base was written and before the old
    /// generation was removed: the newer base holds everything.
    #[test]
    fn a_compaction_cut_short_leaves_a_usable_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = two_deliveries(dir.path());
        let expected = f.state().clone();
        let sdir = dir.path().join("sink-state/k");
        // The old generation's files, kept as if the removal had not happened.
        let old_base = std::fs::read(sdir.join("1.base")).unwrap();
        let old_log = std::fs::read(sdir.join("1.log")).unwrap();
        f.compact().unwrap();
        std::fs::write(sdir.join("1.base"), old_base).unwrap();
        std::fs::write(sdir.join("1.log"), old_log).unwrap();
        drop(f);
        let back = SinkStateFile::open(dir.path(), "k").unwrap();
        assert_eq!(back.state(), &expected);
        assert!(!sdir.join("1.base").exists());
    }

    /// A file system that extended the log before writing its data leaves zeros at the
    /// end after a crash: the state reads up to them, the log is cut back there, and the
    /// next persist appends after the good records.
    #[test]
    fn a_zeroed_log_end_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let f = two_deliveries(dir.path());
        let expected = f.state().clone();
        drop(f);
        let log = dir.path().join("sink-state/k/1.log");
        let mut bytes = std::fs::read(&log).unwrap();
        bytes.extend_from_slice(&[0u8; 64]);
        std::fs::write(&log, bytes).unwrap();
        let mut back = SinkStateFile::open(dir.path(), "k").unwrap();
        assert_eq!(back.state(), &expected);
        back.count(|c| c.delivered.add("a", 1, 1));
        back.persist(pos(0, 3)).unwrap();
        drop(back);
        let again = SinkStateFile::open(dir.path(), "k").unwrap();
        assert_eq!(again.state().counts.delivered.get("a", 1), 8);
    }
}
