//! The open partitions of an object sink's current gathering: one gzip stream per (tag,
//! event-time hour), written to a local file (`<data_dir>/sink-state/<sink>/stage/`)
//! as events come, so an object of 128 MiB costs a file, not memory.
//!
//! Lines are made in the sink's task and compressed on a thread of the stage's own
//! (`object-gzip`), 64 KiB at a time, so the two halves of the work use two cores.
//! Memory per partition with an encoder is the compressor's state (ISA-L's igzip at
//! level 1, streaming: its C state, level buffer and 64 KiB output buffer, about 420 KiB)
//! and up to 64 KiB of lines not yet compressed, plus 8 pieces of 64 KiB on their way to the compressor. At most
//! `max_open_partitions` have an encoder: a chunk whose events span more
//! (a backfill of many hours) ends the least recently used one's gzip member, and its
//! next lines start a new member in the same file (multi-member gzip, which every gzip
//! reader reads whole). The gathering is cut (and its objects uploaded) once that many
//! partitions exist, or when a partition holds `max_object_size`. The files are scratch: after a crash the delivery
//! is repeated from the spool with the same events (the spool is the durable copy), so
//! the stage is emptied at start.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sluice_forward::GzipWriter;

use crate::envelope::hour_of;
use crate::record::SpooledChunk;
use crate::sinks::spec::DeliverError;
use sluice_core::ranges::SeqRanges;

/// What one object holds, for its hour's manifest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectStats {
    pub records: u64,
    /// Bytes of NDJSON before compression.
    pub bytes: u64,
    /// Event times, nanoseconds since the epoch.
    pub min_time: u64,
    pub max_time: u64,
    /// Records per source, with the lowest and highest seq.
    pub sources: BTreeMap<String, SeqSpan>,
    /// Records without provenance (a Fluentd or Fluent Bit client).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unattributed: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What an object (or an hour) holds of one source: its records, lowest and highest
/// seq, and the seqs as ranges (a sluice agent's seqs are contiguous: one range, unless
/// something is missing or the source's events went to several relays).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqSpan {
    pub records: u64,
    pub first: u64,
    pub last: u64,
    /// Absent in books written before ranges were kept.
    #[serde(default, skip_serializing_if = "SeqRanges::is_empty")]
    pub ranges: SeqRanges,
}

impl SeqSpan {
    fn of(seq: u64) -> SeqSpan {
        SeqSpan {
            records: 1,
            first: seq,
            last: seq,
            ranges: SeqRanges::from_ranges([[seq, seq]]),
        }
    }

    pub fn merge(&mut self, other: &SeqSpan) {
        self.records += other.records;
        self.first = self.first.min(other.first);
        self.last = self.last.max(other.last);
        self.ranges.union(&other.ranges);
    }

    fn add(&mut self, seq: u64) {
        self.records += 1;
        self.first = self.first.min(seq);
        self.last = self.last.max(seq);
        self.ranges.insert(seq);
    }
}

impl ObjectStats {
    fn add(&mut self, time: u64, line: usize, source: Option<&str>, seq: Option<u64>) {
        if self.records == 0 {
            (self.min_time, self.max_time) = (time, time);
        }
        self.records += 1;
        self.bytes += line as u64;
        self.min_time = self.min_time.min(time);
        self.max_time = self.max_time.max(time);
        match (source, seq) {
            (Some(source), Some(seq)) => match self.sources.get_mut(source) {
                Some(span) => span.add(seq),
                None => {
                    self.sources.insert(source.to_string(), SeqSpan::of(seq));
                }
            },
            _ => self.unattributed += 1,
        }
    }

    /// Adds another object's stats (an hour's totals).
    pub fn merge(&mut self, other: &ObjectStats) {
        if other.records == 0 {
            return;
        }
        if self.records == 0 {
            (self.min_time, self.max_time) = (other.min_time, other.max_time);
        }
        self.records += other.records;
        self.bytes += other.bytes;
        self.unattributed += other.unattributed;
        self.min_time = self.min_time.min(other.min_time);
        self.max_time = self.max_time.max(other.max_time);
        for (source, span) in &other.sources {
            match self.sources.get_mut(source) {
                Some(mine) => mine.merge(span),
                None => {
                    self.sources.insert(source.clone(), span.clone());
                }
            }
        }
    }
}

/// A partition of the current gathering, as the sink's task sees it.
struct Open {
    /// Its number for the compressor thread.
    id: u64,
    /// Lines not yet handed to the compressor: compressing in 64 KiB pieces, not per
    /// line, keeps the compressor's per-call costs off every event.
    pending: Vec<u8>,
    path: PathBuf,
    stats: ObjectStats,
}

/// Lines gathered per partition before they are compressed.
const PENDING: usize = 64 << 10;

/// Pieces of lines on their way to the compressor thread (its backpressure).
const IN_FLIGHT: usize = 8;

/// A finished partition, waiting in its file to be uploaded.
pub struct Staged {
    pub tag: String,
    pub hour: u64,
    pub path: PathBuf,
    /// Compressed length.
    pub len: u64,
    pub stats: ObjectStats,
    /// Set once its object is in the store (a retried delivery skips it), with its key.
    pub uploaded: bool,
    pub key: Option<String>,
}

impl Staged {
    /// The whole object.
    pub fn read(&self) -> std::io::Result<Vec<u8>> {
        std::fs::read(&self.path)
    }

    /// `len` bytes from `at`.
    pub fn read_at(&self, at: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let mut f = File::open(&self.path)?;
        f.seek(SeekFrom::Start(at))?;
        let mut buf = vec![0; len];
        f.read_exact(&mut buf)?;
        Ok(buf)
    }

    /// The gzip trailer (CRC32 and length of the uncompressed data).
    pub fn trailer(&self) -> std::io::Result<Vec<u8>> {
        self.read_at(self.len.saturating_sub(8), 8.min(self.len as usize))
    }
}

/// What the sink's task asks of the compressor thread.
enum Cmd {
    /// Compress these lines into partition `id`'s file (created at `path` if new).
    Write {
        id: u64,
        path: PathBuf,
        lines: Vec<u8>,
    },
    /// End the gzip members of these partitions and report their files' lengths.
    Finish(Vec<u64>),
    /// Drop every encoder (the files are removed by the sink's task once answered).
    Clear,
}

enum Reply {
    Finished(Result<Vec<(u64, u64)>, String>),
    Cleared,
}

/// The open partitions of the current gathering. Lines are made in the sink's task;
/// the compression runs on a thread of its own (so turning records into lines and
/// compressing them use two cores), in the order the lines were handed over.
pub struct Stage {
    dir: PathBuf,
    /// By tag, then hour (looked up by `&str`: no allocation per event).
    open: BTreeMap<String, BTreeMap<u64, Open>>,
    /// Partitions in `open`.
    partitions: usize,
    pub max_open: usize,
    pub max_bytes: u64,
    next: u64,
    to_compressor: std::sync::mpsc::SyncSender<Cmd>,
    // (In mutexes only so that the stage is `Sync`, as the sink's future must be.)
    replies: std::sync::Mutex<std::sync::mpsc::Receiver<Reply>>,
    /// Buffers the compressor is done with, for reuse.
    spare: std::sync::Mutex<std::sync::mpsc::Receiver<Vec<u8>>>,
    /// The compressor's first error since the last finish or clear.
    failed: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    /// Most encoders the compressor held at once (for tests).
    pub peak_encoders: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

fn compressor_gone() -> DeliverError {
    DeliverError::Transient("the object sink's compressor thread is gone".into())
}

/// The compressor thread: at most `max_open` encoders; when another partition needs
/// one, the least recently used ends its gzip member and its next lines start a new
/// member in the same file.
struct Compressor {
    max_open: usize,
    /// The encoders, with when each was last used.
    encoders: std::collections::HashMap<u64, (GzipWriter<File>, u64)>,
    /// The file of every partition written to since the last finish.
    paths: std::collections::HashMap<u64, PathBuf>,
    tick: u64,
    failed: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    peak: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Compressor {
    fn fail(&self, e: String) {
        let mut f = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        f.get_or_insert(e);
    }

    fn end(&mut self, id: u64) -> Result<(), String> {
        if let Some((gz, _)) = self.encoders.remove(&id) {
            gz.finish()
                .map_err(|e| format!("cannot finish {}: {e}", self.paths[&id].display()))?;
        }
        Ok(())
    }

    fn write(&mut self, id: u64, path: PathBuf, lines: &[u8]) -> Result<(), String> {
        self.tick += 1;
        if !self.encoders.contains_key(&id) {
            if self.encoders.len() >= self.max_open {
                let lru = self
                    .encoders
                    .iter()
                    .min_by_key(|(_, (_, used))| *used)
                    .map(|(&k, _)| k);
                if let Some(lru) = lru {
                    self.end(lru)?;
                }
            }
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            let gz = GzipWriter::new(file);
            self.paths.insert(id, path);
            self.encoders.insert(id, (gz, self.tick));
            self.peak
                .fetch_max(self.encoders.len(), std::sync::atomic::Ordering::Relaxed);
        }
        let (gz, used) = self.encoders.get_mut(&id).expect("made above");
        *used = self.tick;
        gz.write_all(lines)
            .map_err(|e| format!("cannot write {}: {e}", self.paths[&id].display()))
    }

    fn run(
        mut self,
        cmds: std::sync::mpsc::Receiver<Cmd>,
        replies: std::sync::mpsc::Sender<Reply>,
        spare: std::sync::mpsc::SyncSender<Vec<u8>>,
    ) {
        for cmd in cmds {
            match cmd {
                Cmd::Write {
                    id,
                    path,
                    mut lines,
                } => {
                    let failed = self.failed.lock().map(|f| f.is_some()).unwrap_or(true);
                    if !failed {
                        if let Err(e) = self.write(id, path, &lines) {
                            self.fail(e);
                        }
                    }
                    lines.clear();
                    let _ = spare.try_send(lines);
                }
                Cmd::Finish(ids) => {
                    let mut lens = Vec::with_capacity(ids.len());
                    let mut result = Ok(());
                    for id in ids {
                        result = result.and_then(|()| self.end(id));
                        let len = self
                            .paths
                            .remove(&id)
                            .map(|p| std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0))
                            .unwrap_or(0);
                        lens.push((id, len));
                    }
                    let failed = self.failed.lock().unwrap_or_else(|p| p.into_inner()).take();
                    let reply = match (failed, result) {
                        (Some(e), _) | (None, Err(e)) => Err(e),
                        (None, Ok(())) => Ok(lens),
                    };
                    if replies.send(Reply::Finished(reply)).is_err() {
                        return;
                    }
                }
                Cmd::Clear => {
                    self.encoders.clear();
                    self.paths.clear();
                    self.failed.lock().unwrap_or_else(|p| p.into_inner()).take();
                    if replies.send(Reply::Cleared).is_err() {
                        return;
                    }
                }
            }
        }
    }
}

impl Stage {
    /// A stage in `dir`, emptied of what an earlier run left there, with its
    /// compressor thread.
    pub fn open(dir: PathBuf, max_open: usize, max_bytes: u64) -> Result<Stage, String> {
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| format!("cannot empty {}: {e}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let (to_compressor, cmds) = std::sync::mpsc::sync_channel(IN_FLIGHT);
        let (reply_tx, replies) = std::sync::mpsc::channel();
        let (spare_tx, spare) = std::sync::mpsc::sync_channel(IN_FLIGHT + 1);
        let failed = std::sync::Arc::new(std::sync::Mutex::new(None));
        let peak_encoders = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let compressor = Compressor {
            max_open: max_open.max(1),
            encoders: Default::default(),
            paths: Default::default(),
            tick: 0,
            failed: failed.clone(),
            peak: peak_encoders.clone(),
        };
        std::thread::Builder::new()
            .name("object-gzip".into())
            .spawn(move || compressor.run(cmds, reply_tx, spare_tx))
            .map_err(|e| format!("cannot start the compressor thread: {e}"))?;
        Ok(Stage {
            dir,
            open: BTreeMap::new(),
            partitions: 0,
            max_open: max_open.max(1),
            max_bytes,
            next: 0,
            to_compressor,
            replies: std::sync::Mutex::new(replies),
            spare: std::sync::Mutex::new(spare),
            failed,
            peak_encoders,
        })
    }

    /// Hands a partition's pending lines to the compressor.
    fn compress(&mut self, tag: &str, hour: u64) -> Result<(), DeliverError> {
        let fresh = self
            .spare
            .lock()
            .ok()
            .and_then(|s| s.try_recv().ok())
            .unwrap_or_else(|| Vec::with_capacity(PENDING + 4096));
        let part = self
            .open
            .get_mut(tag)
            .and_then(|hours| hours.get_mut(&hour))
            .expect("the caller made it");
        let lines = std::mem::replace(&mut part.pending, fresh);
        let cmd = Cmd::Write {
            id: part.id,
            path: part.path.clone(),
            lines,
        };
        self.to_compressor.send(cmd).map_err(|_| compressor_gone())
    }

    fn check(&self) -> Result<(), DeliverError> {
        match &*self.failed.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(DeliverError::Transient(e.clone())),
            None => Ok(()),
        }
    }

    /// Writes a chunk's events into their partitions. Returns whether the gathering
    /// should be cut now (a partition is full, or `max_open` partitions are open).
    pub fn add(&mut self, chunk: &SpooledChunk<'_>) -> Result<bool, DeliverError> {
        self.check()?;
        let mut full = false;
        if !self.open.contains_key(chunk.tag) {
            self.open.insert(chunk.tag.to_string(), BTreeMap::new());
        }
        for event in chunk.events() {
            let (entry, mark) = event?;
            let hour = hour_of(entry.time);
            let hours = self.open.get_mut(chunk.tag).expect("made above");
            let part = match hours.entry(hour) {
                std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => {
                    let id = self.next;
                    self.next += 1;
                    self.partitions += 1;
                    v.insert(Open {
                        id,
                        pending: Vec::with_capacity(PENDING + 4096),
                        path: self.dir.join(format!("{id}.gz")),
                        stats: ObjectStats::default(),
                    })
                }
            };
            // The line goes straight into the partition's pending lines.
            let at = part.pending.len();
            let written = crate::envelope::write_flat(
                &mut part.pending,
                entry.time,
                chunk.tag,
                chunk.source,
                mark,
                entry.record,
            );
            if let Err(e) = written {
                part.pending.truncate(at);
                return Err(e.into());
            }
            part.pending.push(b'\n');
            let len = part.pending.len() - at;
            part.stats
                .add(entry.time.as_unix_nanos(), len, chunk.source, mark.seq);
            full |= part.stats.bytes >= self.max_bytes;
            if part.pending.len() >= PENDING {
                self.compress(chunk.tag, hour)?;
            }
        }
        Ok(full || self.partitions >= self.max_open)
    }

    /// Finishes every open partition (in (tag, hour) order). On an error every file of
    /// the stage is removed (the gathering is read again).
    pub fn finish(&mut self) -> Result<Vec<Staged>, DeliverError> {
        let keys: Vec<(String, u64)> = self
            .open
            .iter()
            .flat_map(|(tag, hours)| hours.keys().map(move |&h| (tag.clone(), h)))
            .collect();
        let mut ids = Vec::with_capacity(keys.len());
        let mut sent = Ok(());
        for (tag, hour) in &keys {
            let part = &self.open[tag][hour];
            ids.push(part.id);
            if sent.is_ok() && !part.pending.is_empty() {
                sent = self.compress(tag, *hour);
            }
        }
        let lens = sent.and_then(|()| {
            self.to_compressor
                .send(Cmd::Finish(ids))
                .map_err(|_| compressor_gone())?;
            let reply = self.replies.lock().map_err(|_| compressor_gone())?.recv();
            match reply {
                Ok(Reply::Finished(Ok(lens))) => Ok(lens),
                Ok(Reply::Finished(Err(e))) => Err(DeliverError::Transient(e)),
                Ok(Reply::Cleared) | Err(_) => Err(compressor_gone()),
            }
        });
        let lens = match lens {
            Ok(l) => l,
            Err(e) => {
                self.clear();
                return Err(e);
            }
        };
        let mut open = std::mem::take(&mut self.open);
        self.partitions = 0;
        let mut out = Vec::with_capacity(keys.len());
        for ((tag, hour), (_, len)) in keys.into_iter().zip(lens) {
            let part = open
                .get_mut(&tag)
                .and_then(|hours| hours.remove(&hour))
                .expect("listed");
            out.push(Staged {
                tag,
                hour,
                path: part.path,
                len,
                stats: part.stats,
                uploaded: false,
                key: None,
            });
        }
        Ok(out)
    }

    /// Drops every open partition and its file.
    pub fn clear(&mut self) {
        // The compressor lets go of the files first (and forgets its error).
        if self.to_compressor.send(Cmd::Clear).is_ok() {
            if let Ok(replies) = self.replies.lock() {
                let _ = replies.recv();
            }
        }
        for part in std::mem::take(&mut self.open)
            .into_values()
            .flat_map(|h| h.into_values())
        {
            let _ = std::fs::remove_file(&part.path);
        }
        self.partitions = 0;
    }
}

/// Removes finished partitions' files.
pub fn remove(staged: &[Staged]) {
    for s in staged {
        let _ = std::fs::remove_file(&s.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_forward::{write_entry, EventBatch, EventTime, Options, Provenance};
    use std::io::Read;

    /// One spool record of `n` events, event i stamped `hours[i % len]`.
    fn record(n: u64, hours: &[u64]) -> Vec<u8> {
        let mut entries = Vec::new();
        for i in 0..n {
            let time = EventTime {
                secs: (hours[(i as usize) % hours.len()] * 3600 + 5) as u32,
                nanos: 0,
            };
            write_entry(&mut entries, time, &[("n", i.to_string().as_bytes())]);
        }
        let batch = EventBatch {
            tag: "t".into(),
            count: n as usize,
            entries,
            options: Options {
                provenance: Some(Provenance {
                    source: "s".into(),
                    seqs: (0..n).collect(),
                    offsets: Vec::new(),
                }),
                ..Options::default()
            },
            hours: Vec::new(),
        };
        let mut buf = Vec::new();
        crate::record::encode(&mut buf, EventTime::now(), &batch, None, 0, 0).unwrap();
        buf
    }

    /// A chunk spanning more hours than `max_open` never holds more encoders than that:
    /// partitions take turns, each file a run of gzip members that reads as one.
    #[test]
    fn a_chunk_of_many_hours_keeps_encoders_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut stage = Stage::open(dir.path().join("stage"), 4, 1 << 30).unwrap();
        let hours: Vec<u64> = (491_000..491_010).collect();
        // Enough events per hour that each partition compresses several times.
        let rec = record(200_000, &hours);
        let chunk = crate::record::decode(&rec).unwrap();
        let cut = stage.add(&chunk).unwrap();
        assert!(
            cut,
            "10 partitions exceed max_open = 4: the gathering is cut"
        );
        let staged = stage.finish().unwrap();
        let peak = stage
            .peak_encoders
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!((1..=4).contains(&peak), "{peak} encoders");
        assert_eq!(staged.len(), 10);
        let mut lines = 0;
        for s in &staged {
            let mut text = String::new();
            flate2::read::MultiGzDecoder::new(&s.read().unwrap()[..])
                .read_to_string(&mut text)
                .unwrap();
            let n = text.lines().count() as u64;
            assert_eq!(n, s.stats.records);
            assert!(text.lines().all(|l| l.contains("\"_tag\":\"t\"")));
            lines += n;
        }
        assert_eq!(lines, 200_000);
        remove(&staged);
        assert_eq!(
            std::fs::read_dir(dir.path().join("stage")).unwrap().count(),
            0
        );
    }
}
