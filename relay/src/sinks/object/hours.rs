//! Hour close: what an object sink has uploaded per (tag, event-time hour), and the
//! manifests and markers that announce a complete hour.
//!
//! An hour H is closed by the first delivery that was cut when the relay's clock
//! ([`crate::clock`]) read past the end of H plus `allowed_lateness` *and* had read the
//! spool up to its committed end: every event of H acknowledged before that cut is in
//! that delivery or an earlier one, so once it is uploaded the relay writes, for each tag
//! with events in H, in the partition folder:
//!
//! - `_manifests/<relay>-<incarnation>.r000001.json`: the objects with their record
//!   counts, bytes and min/max event time, the totals, and per source the records and
//!   the lowest and highest seq;
//! - `_SUCCESS-<relay>-<incarnation>`: the marker a loader waits for;
//!
//! and, for the hour as a whole, `<prefix>/_sluice/hours/dt=<date>/hour=<HH>/<relay>.json`
//! (written even when the relay had nothing for H), listing the tags it had and their
//! latest manifest. An event of H that arrives after the close is late: it goes to a new
//! object in H's folder, the tag's manifest gets a new revision (`.r000002.json`, earlier
//! ones kept), and `sluice_relay_late_events_total` counts it.
//!
//! The book is saved in `<data_dir>/sink-state/<sink>/hours/<hour>.json` (one file per
//! hour that changed, written before the delivery's cursor) and `closed.json`. Adding an
//! object is idempotent (objects are keyed by their key), so a delivery repeated after a
//! crash counts nothing twice. Hours closed more than `RETAIN_HOURS` ago are dropped from
//! the book; a late event for one of them continues from its latest manifest in the store.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::stage::ObjectStats;

/// Hours kept in the book on disk after they closed (a week) ...
pub const RETAIN_HOURS: u64 = 24 * 7;
/// ... and in memory (a late event for an older one reads its file back).
pub const MEMORY_HOURS: u64 = 3;

/// Hours without events that still get an hour marker after a long stop.
pub const EMPTY_MARKERS: u64 = 48;

const VERSION: u32 = 1;

/// One object, as its hour's manifest lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectEntry {
    pub records: u64,
    /// Compressed bytes in the store.
    pub bytes: u64,
    pub min_time: u64,
    pub max_time: u64,
    /// The seqs of each source in the object (absent in books written before they were
    /// kept): what `reconcile` reports missing when the object is gone.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sources: BTreeMap<String, sluice_core::ranges::SeqRanges>,
}

/// One tag's hour on this relay.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TagHour {
    pub objects: BTreeMap<String, ObjectEntry>,
    pub totals: ObjectStats,
    /// The latest manifest revision decided (0: none yet) ...
    pub revision: u32,
    /// ... and the latest one written with its `_SUCCESS` (a crash between deciding a
    /// revision and writing it leaves this behind: it is written after the restart).
    #[serde(default)]
    pub announced: u32,
    /// Objects were added since that revision.
    pub changed: bool,
    /// Clock time of the first manifest and of the latest one.
    pub closed_at: Option<f64>,
    pub revised_at: Option<f64>,
    /// Events added after the hour closed.
    #[serde(default)]
    pub late: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct HourFile {
    version: u32,
    hour: u64,
    tags: BTreeMap<String, TagHour>,
    /// The hour marker lists the latest announced revisions.
    #[serde(default)]
    marker_written: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Closed {
    version: u32,
    /// The latest hour closed; every hour before it is closed too.
    last_closed: Option<u64>,
}

pub struct HourBook {
    dir: PathBuf,
    hours: BTreeMap<u64, HourFile>,
    last_closed: Option<u64>,
    dirty: BTreeSet<u64>,
    closed_dirty: bool,
    /// Files of hours before this (plus the retention) are gone from the disk.
    pruned_upto: u64,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{} is not readable: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

impl HourFile {
    /// Its marker and every revision are written, and nothing changed since.
    fn settled(&self) -> bool {
        self.marker_written
            && self
                .tags
                .values()
                .all(|t| t.announced == t.revision && !t.changed)
    }
}

fn read_hour(path: &Path) -> Result<Option<HourFile>, String> {
    let Some(file) = read_json::<HourFile>(path)? else {
        return Ok(None);
    };
    if file.version > VERSION {
        return Err(format!(
            "{} was written by a newer sluice (version {})",
            path.display(),
            file.version
        ));
    }
    Ok(Some(file))
}

impl HourBook {
    /// The book in `dir` (empty for a new sink).
    pub fn open(dir: PathBuf) -> Result<HourBook, String> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let closed: Closed = read_json(&dir.join("closed.json"))?.unwrap_or_default();
        let mut hours = BTreeMap::new();
        let entries =
            std::fs::read_dir(&dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(hour) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".json"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            if let Some(file) = read_hour(&entry.path())? {
                let old = closed.last_closed.is_some_and(|c| hour + MEMORY_HOURS < c);
                // An old hour stays on disk only (read back if a late event comes for
                // it), unless a crash left something of it to write.
                if !old || !file.settled() {
                    hours.insert(hour, file);
                }
            }
        }
        Ok(HourBook {
            dir,
            hours,
            last_closed: closed.last_closed,
            dirty: BTreeSet::new(),
            closed_dirty: false,
            pruned_upto: 0,
        })
    }

    pub fn last_closed(&self) -> Option<u64> {
        self.last_closed
    }

    pub fn is_closed(&self, hour: u64) -> bool {
        self.last_closed.is_some_and(|c| hour <= c)
    }

    /// Whether the book has this (tag, hour), reading a closed hour's file back into
    /// memory if need be (when neither has it, it is continued from the store).
    pub fn has(&mut self, tag: &str, hour: u64) -> Result<bool, String> {
        if !self.hours.contains_key(&hour) && self.is_closed(hour) {
            if let Some(file) = read_hour(&self.dir.join(format!("{hour}.json")))? {
                self.hours.insert(hour, file);
            }
        }
        Ok(self
            .hours
            .get(&hour)
            .is_some_and(|h| h.tags.contains_key(tag)))
    }

    fn unannounced_iter(&self) -> impl Iterator<Item = (&String, u64)> + '_ {
        self.hours.iter().flat_map(|(&hour, file)| {
            file.tags
                .iter()
                .filter(|(_, th)| th.announced < th.revision)
                .map(move |(tag, _)| (tag, hour))
        })
    }

    fn markers_due_iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.hours
            .values()
            .filter(|f| self.is_closed(f.hour) && !f.marker_written)
            .map(|f| f.hour)
    }

    /// Tags whose latest revision is decided but not yet written.
    pub fn unannounced(&self) -> Vec<(String, u64)> {
        self.unannounced_iter()
            .map(|(tag, hour)| (tag.clone(), hour))
            .collect()
    }

    /// Whether a decided revision or a due hour marker is not written yet.
    pub fn has_unannounced(&self) -> bool {
        self.unannounced_iter().next().is_some() || self.markers_due_iter().next().is_some()
    }

    /// Closed hours whose marker does not list their latest revisions yet.
    pub fn markers_due(&self) -> Vec<u64> {
        self.markers_due_iter().collect()
    }

    pub fn marker_written(&mut self, hour: u64) {
        if let Some(f) = self.hours.get_mut(&hour) {
            f.marker_written = true;
            self.dirty.insert(hour);
        }
    }

    /// Puts back a tag's hour read from its latest manifest in the store.
    pub fn restore(&mut self, tag: &str, hour: u64, th: TagHour) {
        self.file(hour).tags.insert(tag.to_string(), th);
        self.dirty.insert(hour);
    }

    fn file(&mut self, hour: u64) -> &mut HourFile {
        self.hours.entry(hour).or_insert_with(|| HourFile {
            version: VERSION,
            hour,
            tags: BTreeMap::new(),
            marker_written: false,
        })
    }

    /// Adds an uploaded object. Returns its records if the object is new to the book and
    /// its hour was already closed (late events), else 0.
    pub fn add_object(
        &mut self,
        tag: &str,
        hour: u64,
        key: &str,
        entry: ObjectEntry,
        stats: &ObjectStats,
    ) -> u64 {
        let closed = self.is_closed(hour);
        let th = self.file(hour).tags.entry(tag.to_string()).or_default();
        if th.objects.contains_key(key) {
            return 0; // a repeated delivery: counted the first time
        }
        th.objects.insert(key.to_string(), entry);
        th.totals.merge(stats);
        th.changed = true;
        let late = if closed { stats.records } else { 0 };
        th.late += late;
        self.dirty.insert(hour);
        late
    }

    /// The hours to close at clock time `now` (seconds) with `lateness`: from the one
    /// after the last closed up to the last whose end plus lateness has passed. A new
    /// book starts with the hour before the first it has events for, or before `now`.
    pub fn closable(&self, now: f64, lateness: f64) -> Vec<u64> {
        let Some(upto) = closable_upto(now, lateness) else {
            return Vec::new();
        };
        let from = match self.last_closed {
            Some(c) => c + 1,
            None => {
                let first_seen = self.hours.keys().next().copied().unwrap_or(upto);
                first_seen.min(upto)
            }
        };
        (from..=upto)
            .filter(|h| self.hours.contains_key(h) || upto - h < EMPTY_MARKERS)
            .collect()
    }

    /// The tags with events in `hour`.
    pub fn tags(&self, hour: u64) -> Vec<String> {
        self.hours
            .get(&hour)
            .map(|h| h.tags.keys().cloned().collect())
            .unwrap_or_default()
    }

    pub fn get(&self, tag: &str, hour: u64) -> Option<&TagHour> {
        self.hours.get(&hour)?.tags.get(tag)
    }

    /// Tags of closed hours with objects added since their last manifest.
    pub fn revisions_due(&self) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for (&hour, file) in &self.hours {
            if !self.is_closed(hour) {
                continue;
            }
            for (tag, th) in &file.tags {
                if th.changed {
                    out.push((tag.clone(), hour));
                }
            }
        }
        out
    }

    /// Decides the next revision of a tag's hour at clock time `now` (saved with the
    /// book before it is written, so a crash cannot write one revision number twice
    /// with different content); [`HourBook::announced`] records it written.
    pub fn next_revision(&mut self, tag: &str, hour: u64, now: f64) {
        let Some(file) = self.hours.get_mut(&hour) else {
            return;
        };
        let Some(th) = file.tags.get_mut(tag) else {
            return;
        };
        th.revision += 1;
        th.changed = false;
        th.closed_at.get_or_insert(now);
        th.revised_at = Some(now);
        file.marker_written = false;
        self.dirty.insert(hour);
    }

    pub fn announced(&mut self, tag: &str, hour: u64, revision: u32) {
        if let Some(th) = self.hours.get_mut(&hour).and_then(|f| f.tags.get_mut(tag)) {
            th.announced = th.announced.max(revision);
            self.dirty.insert(hour);
        }
    }

    /// Records `hour` closed (and every hour before it); its marker is due (an hour
    /// without events gets one too, so a loader can tell "nothing" from "not yet").
    pub fn set_closed(&mut self, hour: u64) {
        if !self.is_closed(hour) {
            self.last_closed = Some(hour);
            self.closed_dirty = true;
            self.file(hour);
            self.dirty.insert(hour);
        }
    }

    /// Writes what changed, and forgets hours closed more than [`RETAIN_HOURS`] ago.
    pub fn save(&mut self) -> Result<(), String> {
        let dirty: Vec<u64> = self.dirty.iter().copied().collect();
        for hour in dirty {
            if let Some(file) = self.hours.get(&hour) {
                let path = self.dir.join(format!("{hour}.json"));
                let bytes = serde_json::to_vec(file).map_err(|e| e.to_string())?;
                // What is not written stays dirty (this hour and those after it).
                sluice_core::durable::write_atomic(&path, &bytes)
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            }
            self.dirty.remove(&hour);
        }
        if self.closed_dirty {
            let path = self.dir.join("closed.json");
            let bytes = serde_json::to_vec(&Closed {
                version: VERSION,
                last_closed: self.last_closed,
            })
            .map_err(|e| e.to_string())?;
            sluice_core::durable::write_atomic(&path, &bytes)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            self.closed_dirty = false;
        }
        if let Some(closed) = self.last_closed {
            // Out of memory once written and announced; off the disk after a week.
            let old: Vec<u64> = self
                .hours
                .iter()
                .take_while(|(&h, _)| h + MEMORY_HOURS < closed)
                .filter(|(_, f)| f.settled())
                .map(|(&h, _)| h)
                .collect();
            for hour in old {
                self.hours.remove(&hour);
            }
            if closed > self.pruned_upto + RETAIN_HOURS {
                let entries = std::fs::read_dir(&self.dir)
                    .map_err(|e| format!("cannot read {}: {e}", self.dir.display()))?;
                for entry in entries.flatten() {
                    let hour = entry
                        .file_name()
                        .to_str()
                        .and_then(|n| n.strip_suffix(".json"))
                        .and_then(|n| n.parse::<u64>().ok());
                    if hour.is_some_and(|h| h + RETAIN_HOURS < closed) {
                        let _ = std::fs::remove_file(entry.path());
                    }
                }
                self.pruned_upto = closed - RETAIN_HOURS;
            }
        }
        Ok(())
    }
}

/// The last hour whose end plus `lateness` is at or before `now`.
pub fn closable_upto(now: f64, lateness: f64) -> Option<u64> {
    let t = now - lateness;
    (t >= 3600.0).then(|| (t / 3600.0).floor() as u64 - 1)
}

/// When the hour after `last_closed` (or the current hour, for a new book) closes, in
/// clock seconds.
pub fn next_close(last_closed: Option<u64>, now: f64, lateness: f64) -> f64 {
    let next = match last_closed {
        Some(c) => c + 1,
        None => (now / 3600.0).floor() as u64,
    };
    (next + 1) as f64 * 3600.0 + lateness
}

/// `YYYY-MM-DDTHH:MM:SS.fffZ` of a clock time in seconds.
pub fn rfc3339_secs(secs: f64) -> String {
    let nanos = (secs.max(0.0) * 1e9) as u64;
    rfc3339_nanos(nanos)
}

pub fn rfc3339_nanos(nanos: u64) -> String {
    let mut out = Vec::new();
    crate::envelope::write_rfc3339(
        &mut out,
        sluice_forward::EventTime {
            secs: (nanos / 1_000_000_000) as u32,
            nanos: (nanos % 1_000_000_000) as u32,
        },
    );
    String::from_utf8(out).unwrap_or_default()
}

/// The manifest of one revision of a tag's hour, as written to the store.
pub fn manifest_json(
    relay: &str,
    incarnation: &str,
    tag: &str,
    hour: u64,
    th: &TagHour,
) -> serde_json::Value {
    let objects: Vec<serde_json::Value> = th
        .objects
        .iter()
        .map(|(key, o)| {
            serde_json::json!({
                "key": key,
                "records": o.records,
                "bytes": o.bytes,
                "min_time": rfc3339_nanos(o.min_time),
                "max_time": rfc3339_nanos(o.max_time),
                "sources": o.sources,
            })
        })
        .collect();
    let sources: serde_json::Map<String, serde_json::Value> = th
        .totals
        .sources
        .iter()
        .map(|(s, span)| {
            (
                s.clone(),
                serde_json::json!({"records": span.records, "first_seq": span.first, "last_seq": span.last, "ranges": span.ranges}),
            )
        })
        .collect();
    serde_json::json!({
        "version": VERSION,
        "relay": relay,
        "incarnation": incarnation,
        "tag": tag,
        "hour": crate::envelope::hour_label(hour),
        "revision": th.revision,
        "closed_at": th.closed_at.map(rfc3339_secs),
        "revised_at": th.revised_at.map(rfc3339_secs),
        "records": th.totals.records,
        "late_records": th.late,
        "unattributed_records": th.totals.unattributed,
        "bytes": th.objects.values().map(|o| o.bytes).sum::<u64>(),
        "min_time": (th.totals.records > 0).then(|| rfc3339_nanos(th.totals.min_time)),
        "max_time": (th.totals.records > 0).then(|| rfc3339_nanos(th.totals.max_time)),
        "objects": objects,
        "sources": sources,
        "book": th,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(records: u64) -> ObjectStats {
        let mut s = ObjectStats {
            records,
            bytes: records * 100,
            min_time: 10,
            max_time: 20,
            ..ObjectStats::default()
        };
        s.sources.insert(
            "src".into(),
            super::super::stage::SeqSpan {
                records,
                first: 0,
                last: records - 1,
                ranges: sluice_core::ranges::SeqRanges::from_ranges([[0, records - 1]]),
            },
        );
        s
    }

    fn entry(records: u64) -> ObjectEntry {
        ObjectEntry {
            records,
            bytes: 10,
            min_time: 10,
            max_time: 20,
            sources: BTreeMap::new(),
        }
    }

    #[test]
    fn hours_close_after_their_end_plus_lateness() {
        assert_eq!(closable_upto(3600.0 * 11.0 + 299.0, 300.0), Some(9));
        assert_eq!(closable_upto(3600.0 * 11.0 + 300.0, 300.0), Some(10));
        assert_eq!(next_close(Some(9), 0.0, 300.0), 3600.0 * 11.0 + 300.0);
        let dir = tempfile::tempdir().unwrap();
        let mut book = HourBook::open(dir.path().join("hours")).unwrap();
        book.add_object("t", 10, "k1", entry(5), &stats(5));
        // A new book closes from the hour before its first events (an empty marker).
        assert_eq!(book.closable(3600.0 * 11.0 + 10.0, 300.0), vec![9]);
        assert_eq!(book.closable(3600.0 * 12.0 + 300.0, 300.0), vec![10, 11]);
    }

    /// A repeated delivery adds nothing; an object after the close is late and makes a
    /// new revision due; decided revisions not yet written survive a restart.
    #[test]
    fn objects_count_once_and_late_ones_revise_the_hour() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hours");
        let mut book = HourBook::open(path.clone()).unwrap();
        assert_eq!(book.add_object("t", 10, "k1", entry(5), &stats(5)), 0);
        assert_eq!(book.add_object("t", 10, "k1", entry(5), &stats(5)), 0);
        assert_eq!(book.get("t", 10).unwrap().totals.records, 5);
        book.next_revision("t", 10, 40_000.0);
        book.set_closed(10);
        book.save().unwrap();
        // A crash before the manifest was written: it is still due after the restart.
        let mut book = HourBook::open(path.clone()).unwrap();
        assert!(book.has_unannounced());
        assert_eq!(book.unannounced(), vec![("t".to_string(), 10)]);
        assert_eq!(book.markers_due(), vec![10]);
        book.announced("t", 10, 1);
        book.marker_written(10);
        book.save().unwrap();
        assert!(!book.has_unannounced());
        assert!(book.revisions_due().is_empty());

        let mut book = HourBook::open(path).unwrap();
        assert!(book.is_closed(10));
        assert!(book.has("t", 10).unwrap());
        assert_eq!(book.add_object("t", 10, "k2", entry(3), &stats(3)), 3);
        assert_eq!(book.add_object("t", 10, "k2", entry(3), &stats(3)), 0);
        assert_eq!(book.revisions_due(), vec![("t".to_string(), 10)]);
        book.next_revision("t", 10, 50_000.0);
        let th = book.get("t", 10).unwrap().clone();
        assert_eq!(
            (th.revision, th.announced, th.totals.records, th.late),
            (2, 1, 8, 3)
        );
        assert_eq!(th.closed_at, Some(40_000.0));
        let m = manifest_json("r", "i0000000000000001", "t", 10, &th);
        assert_eq!(m["records"], 8);
        assert_eq!(m["objects"].as_array().unwrap().len(), 2);
        assert_eq!(m["sources"]["src"]["records"], 8);
    }

    /// Closed hours leave memory after `MEMORY_HOURS` and come back from their file.
    #[test]
    fn old_hours_are_read_back_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hours");
        let mut book = HourBook::open(path.clone()).unwrap();
        book.add_object("t", 10, "k1", entry(5), &stats(5));
        book.next_revision("t", 10, 40_000.0);
        book.set_closed(10);
        book.announced("t", 10, 1);
        book.marker_written(10);
        for h in 11..=20 {
            book.set_closed(h);
            book.marker_written(h);
        }
        book.save().unwrap();
        assert!(book.get("t", 10).is_none(), "out of memory");
        assert!(book.has("t", 10).unwrap(), "back from its file");
        assert_eq!(book.get("t", 10).unwrap().totals.records, 5);
        let book = HourBook::open(path).unwrap();
        assert!(book.get("t", 10).is_none(), "not loaded at start");
    }
}
