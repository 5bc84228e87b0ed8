//! The open partitions of an object sink's current gathering: one gzip stream per (tag,
//! event-time hour), written to a local file (`<data_dir>/sink-state/<sink>/stage/`)
//! as events come, so an object of 128 MiB costs a file, not memory.
//!
//! Memory per partition with an encoder is the compressor's state, a 64 KiB write buffer
//! and up to 64 KiB of lines not yet compressed (about 420 KiB with zlib-rs at the fast
//! level). At most `max_open_partitions` have an encoder: a chunk whose events span more
//! (a backfill of many hours) ends the least recently used one's gzip member, and its
//! next lines start a new member in the same file (multi-member gzip, which every gzip
//! reader reads whole). The gathering is cut (and its objects uploaded) once that many
//! partitions exist, or when a partition holds `max_object_size`. The files are scratch: after a crash the delivery
//! is repeated from the spool with the same events (the spool is the durable copy), so
//! the stage is emptied at start.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use flate2::Compression;
use serde::{Deserialize, Serialize};

use crate::envelope::hour_of;
use crate::record::SpooledChunk;
use crate::sinks::spec::DeliverError;

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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqSpan {
    pub records: u64,
    pub first: u64,
    pub last: u64,
}

impl SeqSpan {
    pub fn merge(&mut self, other: &SeqSpan) {
        self.records += other.records;
        self.first = self.first.min(other.first);
        self.last = self.last.max(other.last);
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
                Some(span) => span.merge(&SeqSpan {
                    records: 1,
                    first: seq,
                    last: seq,
                }),
                None => {
                    self.sources.insert(
                        source.to_string(),
                        SeqSpan {
                            records: 1,
                            first: seq,
                            last: seq,
                        },
                    );
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
                    self.sources.insert(source.clone(), *span);
                }
            }
        }
    }
}

struct Open {
    /// The gzip member being written; `None` when none is (not yet, or finished to make
    /// room for another partition's: the next lines start a new member in the file).
    gz: Option<GzEncoder<BufWriter<File>>>,
    /// Lines not yet compressed: compressing in 64 KiB pieces, not per line, keeps
    /// per-call costs (zlib-rs' CRC setup, deflate's flush) off every event.
    pending: Vec<u8>,
    path: PathBuf,
    stats: ObjectStats,
    /// When its encoder was last used, to find the least recently used one.
    used: u64,
}

/// Lines gathered per partition before they are compressed.
const PENDING: usize = 64 << 10;

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

pub struct Stage {
    dir: PathBuf,
    open: BTreeMap<(String, u64), Open>,
    /// Partitions with an encoder (at most `max_open`).
    active: usize,
    pub max_open: usize,
    pub max_bytes: u64,
    next: u64,
    tick: u64,
    line: Vec<u8>,
}

fn io(what: &str, path: &Path, e: std::io::Error) -> DeliverError {
    DeliverError::Transient(format!("{what} {}: {e}", path.display()))
}

/// A new gzip member appended to the partition's file.
fn encoder(path: &Path) -> Result<GzEncoder<BufWriter<File>>, DeliverError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| io("cannot open", path, e))?;
    Ok(GzEncoder::new(
        BufWriter::with_capacity(1 << 16, file),
        Compression::fast(),
    ))
}

/// Ends the partition's gzip member (its file stays, closed).
fn end_member(part: &mut Open) -> Result<(), DeliverError> {
    if let Some(gz) = part.gz.take() {
        gz.finish()
            .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
            .map_err(|e| io("cannot finish", &part.path, e))?;
    }
    Ok(())
}

impl Stage {
    /// A stage in `dir`, emptied of what an earlier run left there.
    pub fn open(dir: PathBuf, max_open: usize, max_bytes: u64) -> Result<Stage, String> {
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| format!("cannot empty {}: {e}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(Stage {
            dir,
            open: BTreeMap::new(),
            active: 0,
            max_open: max_open.max(1),
            max_bytes,
            next: 0,
            tick: 0,
            line: Vec::with_capacity(4096),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// Compresses a partition's pending lines, giving it an encoder first; when
    /// `max_open` encoders exist, the least recently used one ends its member.
    fn compress(&mut self, key: &(String, u64)) -> Result<(), DeliverError> {
        let needs_encoder = self.open.get(key).is_some_and(|p| p.gz.is_none());
        if needs_encoder && self.active >= self.max_open {
            let lru = self
                .open
                .iter()
                .filter(|(k, p)| p.gz.is_some() && *k != key)
                .min_by_key(|(_, p)| p.used)
                .map(|(k, _)| k.clone());
            if let Some(lru) = lru {
                let part = self.open.get_mut(&lru).expect("listed");
                end_member(part)?;
                self.active -= 1;
            }
        }
        self.tick += 1;
        let part = self.open.get_mut(key).expect("the caller made it");
        if part.gz.is_none() {
            part.gz = Some(encoder(&part.path)?);
            self.active += 1;
        }
        part.used = self.tick;
        let gz = part.gz.as_mut().expect("made above");
        gz.write_all(&part.pending)
            .map_err(|e| io("cannot write", &part.path, e))?;
        part.pending.clear();
        Ok(())
    }

    /// Writes a chunk's events into their partitions. Returns whether the gathering
    /// should be cut now (a partition is full, or `max_open` partitions are open).
    pub fn add(&mut self, chunk: &SpooledChunk<'_>) -> Result<bool, DeliverError> {
        let mut full = false;
        for event in chunk.events() {
            let (entry, seq) = event?;
            self.line.clear();
            crate::envelope::write_flat(
                &mut self.line,
                entry.time,
                chunk.tag,
                chunk.source,
                seq,
                entry.record,
            )?;
            self.line.push(b'\n');
            let key = (chunk.tag.to_string(), hour_of(entry.time));
            let part = match self.open.get_mut(&key) {
                Some(p) => p,
                None => {
                    let path = self.dir.join(format!("{}.gz", self.next));
                    self.next += 1;
                    self.open.entry(key.clone()).or_insert(Open {
                        gz: None,
                        pending: Vec::new(),
                        path,
                        stats: ObjectStats::default(),
                        used: 0,
                    })
                }
            };
            part.pending.extend_from_slice(&self.line);
            part.stats.add(
                entry.time.as_unix_nanos(),
                self.line.len(),
                chunk.source,
                seq,
            );
            full |= part.stats.bytes >= self.max_bytes;
            if part.pending.len() >= PENDING {
                self.compress(&key)?;
            }
        }
        Ok(full || self.open.len() >= self.max_open)
    }

    /// Finishes every open partition (in (tag, hour) order). On an error every file of
    /// the stage is removed (the gathering is read again).
    pub fn finish(&mut self) -> Result<Vec<Staged>, DeliverError> {
        let keys: Vec<(String, u64)> = self.open.keys().cloned().collect();
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            let finished = (|| {
                if !self.open[&key].pending.is_empty() {
                    self.compress(&key)?;
                }
                let part = self.open.get_mut(&key).expect("listed");
                if part.gz.is_some() {
                    end_member(part)?;
                    self.active -= 1;
                }
                std::fs::metadata(&part.path)
                    .map(|m| m.len())
                    .map_err(|e| io("cannot stat", &part.path, e))
            })();
            let len = match finished {
                Ok(len) => len,
                Err(e) => {
                    remove(&out);
                    self.clear();
                    return Err(e);
                }
            };
            let part = self.open.remove(&key).expect("listed");
            out.push(Staged {
                tag: key.0,
                hour: key.1,
                path: part.path,
                len,
                stats: part.stats,
                uploaded: false,
                key: None,
            });
        }
        self.active = 0;
        Ok(out)
    }

    /// Drops every open partition and its file.
    pub fn clear(&mut self) {
        for (_, part) in std::mem::take(&mut self.open) {
            drop(part.gz);
            let _ = std::fs::remove_file(&part.path);
        }
        self.active = 0;
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
        assert!(stage.active <= 4, "{} encoders", stage.active);
        let staged = stage.finish().unwrap();
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
