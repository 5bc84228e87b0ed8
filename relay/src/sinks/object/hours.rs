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

/// Hours kept in the book after they closed (a week).
pub const RETAIN_HOURS: u64 = 24 * 7;

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
}

/// One tag's hour on this relay.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TagHour {
    pub objects: BTreeMap<String, ObjectEntry>,
    pub totals: ObjectStats,
    /// The last manifest revision written (0: none yet).
    pub revision: u32,
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
            if let Some(file) = read_json::<HourFile>(&entry.path())? {
                if file.version > VERSION {
                    return Err(format!(
                        "{} was written by a newer sluice (version {})",
                        entry.path().display(),
                        file.version
                    ));
                }
                hours.insert(hour, file);
            }
        }
        Ok(HourBook {
            dir,
            hours,
            last_closed: closed.last_closed,
            dirty: BTreeSet::new(),
            closed_dirty: false,
        })
    }

    pub fn last_closed(&self) -> Option<u64> {
        self.last_closed
    }

    pub fn is_closed(&self, hour: u64) -> bool {
        self.last_closed.is_some_and(|c| hour <= c)
    }

    /// Whether the book still has this (tag, hour) (or must load it from the store).
    pub fn has(&self, tag: &str, hour: u64) -> bool {
        self.hours
            .get(&hour)
            .is_some_and(|h| h.tags.contains_key(tag))
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

    /// Starts the next revision of a tag's hour at clock time `now`: returns it, to be
    /// written, and [`HourBook::written`] records it once it is.
    pub fn next_revision(&mut self, tag: &str, hour: u64, now: f64) -> Option<(u32, TagHour)> {
        let th = self.hours.get_mut(&hour)?.tags.get_mut(tag)?;
        let mut next = th.clone();
        next.revision += 1;
        next.changed = false;
        next.closed_at.get_or_insert(now);
        next.revised_at = Some(now);
        Some((next.revision, next))
    }

    pub fn written(&mut self, tag: &str, hour: u64, th: TagHour) {
        self.file(hour).tags.insert(tag.to_string(), th);
        self.dirty.insert(hour);
    }

    pub fn set_closed(&mut self, hour: u64) {
        if !self.is_closed(hour) {
            self.last_closed = Some(hour);
            self.closed_dirty = true;
        }
    }

    /// Writes what changed, and forgets hours closed more than [`RETAIN_HOURS`] ago.
    pub fn save(&mut self) -> Result<(), String> {
        for hour in std::mem::take(&mut self.dirty) {
            let Some(file) = self.hours.get(&hour) else {
                continue;
            };
            let path = self.dir.join(format!("{hour}.json"));
            let bytes = serde_json::to_vec(file).map_err(|e| e.to_string())?;
            if let Err(e) = sluice_core::durable::write_atomic(&path, &bytes) {
                self.dirty.insert(hour);
                return Err(format!("cannot write {}: {e}", path.display()));
            }
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
            let old: Vec<u64> = self
                .hours
                .keys()
                .copied()
                .take_while(|&h| h + RETAIN_HOURS < closed)
                .collect();
            for hour in old {
                self.hours.remove(&hour);
                let _ = std::fs::remove_file(self.dir.join(format!("{hour}.json")));
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
                serde_json::json!({"records": span.records, "first_seq": span.first, "last_seq": span.last}),
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
    /// new revision due; the book survives a restart.
    #[test]
    fn objects_count_once_and_late_ones_revise_the_hour() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hours");
        let mut book = HourBook::open(path.clone()).unwrap();
        assert_eq!(book.add_object("t", 10, "k1", entry(5), &stats(5)), 0);
        assert_eq!(book.add_object("t", 10, "k1", entry(5), &stats(5)), 0);
        assert_eq!(book.get("t", 10).unwrap().totals.records, 5);
        let (rev, th) = book.next_revision("t", 10, 40_000.0).unwrap();
        assert_eq!(rev, 1);
        book.written("t", 10, th);
        book.set_closed(10);
        book.save().unwrap();
        assert!(book.revisions_due().is_empty());

        let mut book = HourBook::open(path).unwrap();
        assert!(book.is_closed(10));
        assert_eq!(book.add_object("t", 10, "k2", entry(3), &stats(3)), 3);
        assert_eq!(book.add_object("t", 10, "k2", entry(3), &stats(3)), 0);
        assert_eq!(book.revisions_due(), vec![("t".to_string(), 10)]);
        let (rev, th) = book.next_revision("t", 10, 50_000.0).unwrap();
        assert_eq!((rev, th.totals.records, th.late), (2, 8, 3));
        assert_eq!(th.closed_at, Some(40_000.0));
        let m = manifest_json("r", "i0000000000000001", "t", 10, &th);
        assert_eq!(m["records"], 8);
        assert_eq!(m["objects"].as_array().unwrap().len(), 2);
        assert_eq!(m["sources"]["src"]["records"], 8);
    }
}
