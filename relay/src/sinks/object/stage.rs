//! The open partitions of an object sink's current gathering: one gzip stream per (tag,
//! event-time hour), written to a local file (`<data_dir>/sink-state/<sink>/stage/`)
//! as events come, so an object of 128 MiB costs a file, not memory.
//!
//! Memory per open partition is the compressor's state and a 64 KiB write buffer (about
//! 350 KiB with zlib-rs at the fast level); `max_open_partitions` bounds how many there
//! are: the gathering is cut (and its objects uploaded) when it is reached, or when a
//! partition holds `max_object_size`. The files are scratch: after a crash the delivery
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
    gz: GzEncoder<BufWriter<File>>,
    path: PathBuf,
    stats: ObjectStats,
}

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
    pub max_open: usize,
    pub max_bytes: u64,
    next: u64,
    line: Vec<u8>,
}

fn io(what: &str, path: &Path, e: std::io::Error) -> DeliverError {
    DeliverError::Transient(format!("{what} {}: {e}", path.display()))
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
            max_open: max_open.max(1),
            max_bytes,
            next: 0,
            line: Vec::with_capacity(4096),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
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
            let hour = hour_of(entry.time);
            let part = match self.open.get_mut(&(chunk.tag.to_string(), hour)) {
                Some(p) => p,
                None => {
                    let path = self.dir.join(format!("{}.gz", self.next));
                    self.next += 1;
                    let file = File::create(&path).map_err(|e| io("cannot create", &path, e))?;
                    let gz = GzEncoder::new(
                        BufWriter::with_capacity(1 << 16, file),
                        Compression::fast(),
                    );
                    self.open
                        .entry((chunk.tag.to_string(), hour))
                        .or_insert(Open {
                            gz,
                            path,
                            stats: ObjectStats::default(),
                        })
                }
            };
            part.gz
                .write_all(&self.line)
                .map_err(|e| io("cannot write", &part.path, e))?;
            part.stats.add(
                entry.time.as_unix_nanos(),
                self.line.len(),
                chunk.source,
                seq,
            );
            full |= part.stats.bytes >= self.max_bytes;
        }
        Ok(full || self.open.len() >= self.max_open)
    }

    /// Finishes every open partition (in (tag, hour) order).
    pub fn finish(&mut self) -> Result<Vec<Staged>, DeliverError> {
        let mut out = Vec::with_capacity(self.open.len());
        for ((tag, hour), part) in std::mem::take(&mut self.open) {
            let path = part.path;
            let file = part
                .gz
                .finish()
                .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
                .map_err(|e| io("cannot finish", &path, e))?;
            let len = file
                .metadata()
                .map_err(|e| io("cannot stat", &path, e))?
                .len();
            out.push(Staged {
                tag,
                hour,
                path,
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
        for (_, part) in std::mem::take(&mut self.open) {
            let _ = std::fs::remove_file(&part.path);
        }
    }
}

/// Removes finished partitions' files.
pub fn remove(staged: &[Staged]) {
    for s in staged {
        let _ = std::fs::remove_file(&s.path);
    }
}
