//! The reading side of the agent, on one blocking thread: the pipeline's stages
//! source → transforms → chunker. Poll every input's [`Source`], pass each line through
//! the input's [`Transforms`] (multiline, parser, event time; filters slot in there) into
//! the open chunk of its source, cut chunks by size and age, and apply acknowledgements
//! to the sources' checkpoints.
//!
//! A chunk holds lines of one source only, in file order, and carries the source id and
//! each line's byte offset as provenance. Because the output sends and the relay
//! acknowledges chunks in order, an acknowledgement means every earlier line of that
//! source is acknowledged too, and the checkpoint moves to the chunk's end. Nothing
//! moves a checkpoint but an acknowledgement: a crash at any point re-reads from the
//! last acknowledged line (at-least-once; the relay trims the resent duplicates).

use std::num::NonZeroU32;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice_forward::{encode_compressed_packed_forward, EventTime, Gzip, Provenance};
use sluice_parsers::{Event, Pending};
use sluice_tail::CheckpointStore;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::AgentMetrics;
use crate::report::{Report, REPORT_TAG};
use crate::source::{Source, SourceId};
use crate::transform::{EventWriter, HourRun, OpenChunk, SourceMap, Spare, Transforms};

/// The `input` of a report's chunk ([`crate::report`]): no input's, so its
/// acknowledgement moves no checkpoint.
pub const REPORT_INPUT: usize = usize::MAX;

/// A sealed chunk, encoded once as a whole Forward frame and resent as it is.
pub struct Chunk {
    pub id: String,
    pub input: usize,
    pub source: SourceId,
    /// The checkpoint this chunk's acknowledgement allows.
    pub end: u64,
    pub count: usize,
    pub frame: Bytes,
    /// Its events' seqs per hour, and the seq after them: what an acknowledgement of it
    /// adds to the source's checkpoint and to the agent's report.
    pub sent: Box<Sent>,
}

/// What an acknowledgement tells the reading thread beside the byte position: the seq
/// after the last event acknowledged, and the acknowledged events per event-time hour.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sent {
    pub next_seq: u64,
    pub hours: Vec<HourRun>,
}

impl Sent {
    /// Adds a later chunk of the same source (acknowledgements commit in order).
    pub fn extend(&mut self, later: &Sent) {
        self.next_seq = self.next_seq.max(later.next_seq);
        self.hours.extend_from_slice(&later.hours);
    }
}

/// Frame buffers, reused: a sealed chunk's frame lives until its acknowledgement, on
/// another thread, and a fresh ~400 KiB allocation per chunk left glibc's heap
/// fragmented while frames waited for a slow relay (bench/RESULTS.md, issue 16). A frame
/// dropped by the output (acknowledged, or given up) hands its buffer back here; at most
/// `FramePool::SPARE` wait for reuse, the rest are freed.
#[derive(Clone, Default)]
pub struct FramePool(Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

impl FramePool {
    const SPARE: usize = 4;

    fn take(&self) -> Vec<u8> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_default()
    }

    fn share(&self, frame: Vec<u8>) -> Bytes {
        Bytes::from_owner(PooledFrame {
            frame,
            pool: self.clone(),
        })
    }
}

struct PooledFrame {
    frame: Vec<u8>,
    pool: FramePool,
}

impl AsRef<[u8]> for PooledFrame {
    fn as_ref(&self) -> &[u8] {
        &self.frame
    }
}

impl Drop for PooledFrame {
    fn drop(&mut self) {
        let mut spare = self.pool.0.lock().unwrap_or_else(|e| e.into_inner());
        if spare.len() < FramePool::SPARE {
            let mut frame = std::mem::take(&mut self.frame);
            frame.clear();
            spare.push(frame);
        }
    }
}

/// An acknowledgement travelling back to the reading thread.
pub struct Commit {
    pub input: usize,
    pub source: SourceId,
    pub end: u64,
    /// The acknowledged chunks' seqs, merged.
    pub sent: Sent,
}

/// One configured input: where its lines come from, what they go through, and how fast
/// it may read.
pub struct Input {
    pub tag: String,
    pub source: Box<dyn Source>,
    pub transforms: Transforms,
    /// Caps how fast this input's files are read, if configured.
    pub rate: Option<ReadRate>,
}

/// A read rate limit of one input (governor's GCRA over KiB). The reading loop asks for
/// a budget before each poll: a tenth of a second's worth, or nothing while the input is
/// over its rate. Unread bytes stay in the files, like with any backpressure.
pub struct ReadRate {
    limiter: governor::DefaultDirectRateLimiter,
    slice_kib: NonZeroU32,
}

impl ReadRate {
    pub fn new(bytes_per_second: u64) -> ReadRate {
        let kib = (bytes_per_second / 1024).clamp(1, u64::from(u32::MAX)) as u32;
        let slice = (kib / 10).clamp(1, (POLL_BYTES / 1024) as u32);
        let (kib, slice) = (
            NonZeroU32::new(kib).unwrap_or(NonZeroU32::MIN),
            NonZeroU32::new(slice).unwrap_or(NonZeroU32::MIN),
        );
        ReadRate {
            limiter: governor::RateLimiter::direct(
                governor::Quota::per_second(kib).allow_burst(slice),
            ),
            slice_kib: slice,
        }
    }

    /// Bytes this input may read now.
    fn budget(&self) -> usize {
        match self.limiter.check_n(self.slice_kib) {
            Ok(Ok(())) => self.slice_kib.get() as usize * 1024,
            _ => 0,
        }
    }
}

pub struct Pipeline {
    pub agent_id: String,
    pub inputs: Vec<Input>,
    pub store: CheckpointStore,
    pub chunk_size: usize,
    pub chunk_age: Duration,
    pub metrics: Arc<AgentMetrics>,
    pub frames: FramePool,
    /// What the relays acknowledged, per (tag, hour, source), saved with the checkpoints.
    pub report: Report,
    /// How often the report goes to a relay (`output.report_interval`); None: never.
    pub report_interval: Option<Duration>,
}

const POLL_BYTES: usize = 1 << 20;
const DISCOVER_EVERY: Duration = Duration::from_millis(250);
const SAVE_EVERY: Duration = Duration::from_secs(1);
/// Nothing new to read: wait this long (or for an acknowledgement) before looking again.
const IDLE_WAIT: Duration = Duration::from_millis(100);
/// ... but only this long while the inputs had data in the last [`BUSY_FOR`]. What a
/// copytruncate takes away before the agent read it is lost, and the agent cannot count
/// bytes written after its last look (docs/agent.md, "Copytruncate"): on a busy log the
/// time between a write and the read is the loss, so it must be milliseconds, not 100.
const BUSY_WAIT: Duration = Duration::from_millis(2);
const BUSY_FOR: Duration = Duration::from_secs(1);

impl Pipeline {
    /// Runs until `stop`; then seals what is open, hands it over, and keeps applying
    /// acknowledgements until the output is gone, so the last checkpoint is as far as
    /// the relay confirmed.
    pub fn run(
        mut self,
        chunks: mpsc::Sender<Chunk>,
        commits: Receiver<Commit>,
        stop: CancellationToken,
    ) {
        // Per input, per source; looked up by reference so a line costs no allocation.
        let mut open: Vec<SourceMap<OpenChunk>> =
            self.inputs.iter().map(|_| SourceMap::default()).collect();
        // Per input, per source: the open multiline event (inputs with `multiline` only).
        let mut pending: Vec<SourceMap<Pending>> =
            self.inputs.iter().map(|_| SourceMap::default()).collect();
        // Per input, per source: the seq of its next event not in an open chunk (set when
        // a chunk is sealed, read when the next one opens). Sources the input no longer
        // follows are forgotten at each discovery: nothing of theirs is in flight then.
        let mut next_seq: Vec<SourceMap<u64>> =
            self.inputs.iter().map(|_| SourceMap::default()).collect();
        let mut last_discover: Option<Instant> = None;
        let mut last_read: Option<Instant> = None;
        let mut last_save = Instant::now();
        let mut last_report = Instant::now();
        let mut dirty = false;
        let mut chunks = Some(chunks);
        let mut gzip = Gzip::default();
        let spare = Spare::default();
        loop {
            // Acknowledgements first: they free checkpoints and rotated files.
            loop {
                match commits.try_recv() {
                    Ok(c) => {
                        self.commit(c);
                        dirty = true;
                    }
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                        // The output is gone (after shutdown): last save, done.
                        self.save();
                        return;
                    }
                }
            }
            if dirty && last_save.elapsed() >= SAVE_EVERY {
                self.save();
                dirty = false;
                last_save = Instant::now();
            }
            let Some(sender) = chunks.as_ref() else {
                // Shutting down: only acknowledgements matter now.
                match commits.recv_timeout(Duration::from_millis(200)) {
                    Ok(c) => {
                        self.commit(c);
                        dirty = true;
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => {
                        self.save();
                        return;
                    }
                }
                continue;
            };
            if let Some(every) = self.report_interval {
                if last_report.elapsed() >= every {
                    last_report = Instant::now();
                    // One source per agent, so the agents' reports spread over the relays.
                    let source = SourceId(format!("{}:{}", REPORT_TAG, self.agent_id));
                    for (i, (id, frame)) in
                        self.report.frames(&self.agent_id).into_iter().enumerate()
                    {
                        let chunk = Chunk {
                            id,
                            input: REPORT_INPUT,
                            source: source.clone(),
                            // Distinct, so each frame's acknowledgement finds its own.
                            end: i as u64,
                            // Not a log event: the agent's event counters leave it out.
                            count: 0,
                            frame,
                            sent: Box::default(),
                        };
                        if sender.try_send(chunk).is_err() {
                            // The output is busy with data: the next interval sends it all.
                            self.report.send_later();
                            break;
                        }
                    }
                }
            }
            if stop.is_cancelled() {
                // Open multiline events are finished as they are, like a partial line at
                // shutdown: their lines were read, they are sent.
                for (index, input) in self.inputs.iter().enumerate() {
                    let Some(m) = &input.transforms.multiline else {
                        continue;
                    };
                    let writer = EventWriter {
                        transforms: &input.transforms,
                        spare: &spare,
                        chunk_size: self.chunk_size,
                        time: EventTime::now(),
                        index,
                    };
                    let mut full = Vec::new();
                    for (source, p) in pending[index].iter_mut() {
                        m.flush(p, &mut |e| {
                            writer.add(
                                &mut open[index],
                                &mut next_seq[index],
                                &mut full,
                                source,
                                0,
                                e.offset,
                                e.end,
                                e.bytes,
                            )
                        });
                    }
                    pending[index].clear();
                }
                for (index, sources) in open.iter_mut().enumerate() {
                    for (source, c) in sources.drain() {
                        next_seq[index].insert(source.clone(), c.next_seq);
                        let chunk = self.seal(&mut gzip, &spare, (index, source), c);
                        let _ = sender.blocking_send(chunk);
                    }
                }
                chunks = None;
                continue;
            }
            if last_discover.is_none_or(|t| t.elapsed() >= DISCOVER_EVERY) {
                for (index, input) in self.inputs.iter_mut().enumerate() {
                    if let Err(e) = input.source.discover() {
                        tracing::warn!(error = %e, "file discovery failed");
                    }
                    let seqs = &mut next_seq[index];
                    if !seqs.is_empty() {
                        let mut followed = std::collections::HashSet::new();
                        input.source.followed(&mut |s| {
                            followed.insert(s.clone());
                        });
                        // A stream the tailer dropped (truncated without a copy) may still
                        // have an open chunk or a multiline event waiting: keep its numbers.
                        let (open, waiting) = (&open[index], &pending[index]);
                        seqs.retain(|s, _| {
                            followed.contains(s) || open.contains_key(s) || waiting.contains_key(s)
                        });
                    }
                }
                self.export_stats();
                last_discover = Some(Instant::now());
            }
            let mut read = 0;
            let now = EventTime::now();
            let instant = Instant::now();
            let mut full = Vec::new();
            for (index, input) in self.inputs.iter_mut().enumerate() {
                let metrics = &self.metrics;
                let writer = EventWriter {
                    transforms: &input.transforms,
                    spare: &spare,
                    chunk_size: self.chunk_size,
                    time: now,
                    index,
                };
                let sources = &mut open[index];
                let seqs = &mut next_seq[index];
                let waiting = &mut pending[index];
                let multiline = input.transforms.multiline.as_ref();
                let budget = input.rate.as_ref().map_or(POLL_BYTES, ReadRate::budget);
                if budget > 0 {
                    let polled = input.source.poll(budget, &mut |line| {
                        metrics.lines_read.inc();
                        metrics.bytes_read.inc_by(line.bytes.len() as u64 + 1);
                        let Some(m) = multiline else {
                            let (offset, end) = (line.offset, line.end);
                            let start = line.start_seq;
                            writer.add(
                                sources,
                                seqs,
                                &mut full,
                                line.source,
                                start,
                                offset,
                                end,
                                line.bytes,
                            );
                            return;
                        };
                        if !waiting.contains_key(line.source) {
                            waiting.insert(line.source.clone(), Pending::default());
                            // Multiline events may be finished outside this poll (by
                            // age): the source's numbering must be known by then.
                            seqs.entry(line.source.clone()).or_insert(line.start_seq);
                        }
                        let Some(p) = waiting.get_mut(line.source) else {
                            return;
                        };
                        // A piece of a split over-long line consumed no newline.
                        let continues = line.end == line.offset + line.bytes.len() as u64;
                        m.push(
                            p,
                            Event {
                                offset: line.offset,
                                end: line.end,
                                bytes: line.bytes,
                            },
                            continues,
                            instant,
                            &mut |e| {
                                writer.add(
                                    sources,
                                    seqs,
                                    &mut full,
                                    line.source,
                                    line.start_seq,
                                    e.offset,
                                    e.end,
                                    e.bytes,
                                )
                            },
                        );
                    });
                    match polled {
                        Ok(n) => read += n,
                        Err(e) => tracing::warn!(error = %e, "reading files failed"),
                    }
                }
                if let Some(m) = multiline {
                    for (source, p) in waiting.iter_mut() {
                        m.flush_expired(p, instant, &mut |e| {
                            writer.add(
                                sources, seqs, &mut full, source, 0, e.offset, e.end, e.bytes,
                            )
                        });
                    }
                    waiting.retain(|_, p| !p.is_empty());
                }
            }
            // Bounded memory whatever the number of files: when the open chunks together
            // hold more than two chunks' worth, the largest are sealed early.
            let mut open_bytes: usize = open
                .iter()
                .flat_map(|sources| sources.values())
                .map(|c| c.entries.len())
                .sum();
            if open_bytes > 2 * self.chunk_size {
                let mut largest: Vec<(usize, usize, &SourceId)> = open
                    .iter()
                    .enumerate()
                    .flat_map(|(i, sources)| {
                        sources.iter().map(move |(s, c)| (c.entries.len(), i, s))
                    })
                    .collect();
                largest.sort_unstable_by_key(|&(len, _, _)| std::cmp::Reverse(len));
                for (len, i, source) in largest {
                    if open_bytes <= self.chunk_size {
                        break;
                    }
                    open_bytes -= len;
                    full.push((i, source.clone()));
                }
            }
            full.sort();
            full.dedup();
            let aged: Vec<_> = open
                .iter()
                .enumerate()
                .flat_map(|(i, sources)| {
                    sources
                        .iter()
                        .filter(|(_, c)| c.opened.elapsed() >= self.chunk_age)
                        .map(move |(s, _)| (i, s.clone()))
                })
                .collect();
            for key in full.into_iter().chain(aged) {
                if let Some(c) = open[key.0].remove(&key.1) {
                    next_seq[key.0].insert(key.1.clone(), c.next_seq);
                    let chunk = self.seal(&mut gzip, &spare, key, c);
                    // Blocks while the output is behind: the files are the buffer.
                    if sender.blocking_send(chunk).is_err() {
                        tracing::warn!("output stopped; reading stops");
                        chunks = None;
                        break;
                    }
                }
            }
            if read > 0 {
                last_read = Some(instant);
            } else {
                // Idle: wait for an acknowledgement or the next poll, whichever first.
                let idle_wait = if last_read.is_some_and(|t| t.elapsed() < BUSY_FOR) {
                    BUSY_WAIT
                } else {
                    IDLE_WAIT
                };
                let multiline_due =
                    self.inputs
                        .iter()
                        .zip(&pending)
                        .flat_map(|(input, waiting)| {
                            let m = input.transforms.multiline.as_ref();
                            waiting
                                .values()
                                .filter_map(move |p| m.and_then(|m| m.deadline(p)))
                                .map(|t| t.saturating_duration_since(Instant::now()))
                        });
                let wait = open
                    .iter()
                    .flat_map(|sources| sources.values())
                    .map(|c| self.chunk_age.saturating_sub(c.opened.elapsed()))
                    .chain(multiline_due)
                    .min()
                    .unwrap_or(idle_wait)
                    .min(idle_wait);
                match commits.recv_timeout(wait) {
                    Ok(c) => {
                        self.commit(c);
                        dirty = true;
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => {
                        self.save();
                        return;
                    }
                }
            }
        }
    }

    fn seal(
        &self,
        gzip: &mut Gzip,
        spare: &Spare,
        (input, source): (usize, SourceId),
        c: OpenChunk,
    ) -> Chunk {
        let count = c.seqs.len();
        let compressed = gzip.compress(&c.entries);
        let id_bytes: [u8; 16] = rand::random();
        let id = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, id_bytes);
        let provenance = Provenance {
            source: format!("{}:{}", self.agent_id, source.0),
            seqs: c.seqs,
            offsets: c.offsets,
        };
        let mut frame = self.frames.take();
        // Two uints of at most 9 bytes per event: seq and offset.
        frame.reserve(compressed.len() + count * 18 + 256);
        encode_compressed_packed_forward(
            &self.inputs[input].tag,
            compressed,
            count,
            &id,
            Some(&provenance),
            &mut frame,
        );
        spare.give_back(c.entries, provenance.seqs, provenance.offsets);
        self.metrics.chunks_sealed.inc();
        Chunk {
            id,
            input,
            source,
            end: c.end,
            count,
            frame: self.frames.share(frame),
            sent: Box::new(Sent {
                next_seq: c.next_seq,
                hours: c.hours,
            }),
        }
    }

    /// Applies an acknowledgement: the source's checkpoint (position and next seq).
    fn commit(&mut self, c: Commit) {
        // A report's acknowledgement (REPORT_INPUT) moves no checkpoint.
        let Some(input) = self.inputs.get_mut(c.input) else {
            return;
        };
        input.source.commit(&c.source, c.end, c.sent.next_seq);
        let source = format!("{}:{}", self.agent_id, c.source.0);
        self.report.add(&input.tag, &source, &c.sent.hours);
    }

    fn save(&mut self) {
        let all: Vec<_> = self
            .inputs
            .iter()
            .flat_map(|i| i.source.checkpoints())
            .collect();
        match self.store.save_with(&all, self.report.saved()) {
            Ok(()) => {
                self.metrics.checkpoint_saves.inc();
            }
            Err(e) => {
                self.metrics.checkpoint_errors.inc();
                tracing::warn!(error = %e, "cannot save checkpoints; positions will be re-read after a restart");
            }
        };
    }

    fn export_stats(&self) {
        let (mut open, mut held, mut alarm, mut truncated, mut lost) = (0, 0, false, 0, 0);
        for input in &self.inputs {
            let s = input.source.stats();
            open += s.files_open as i64;
            held += s.deleted_bytes_held as i64;
            alarm |= s.deleted_bytes_alarm;
            truncated += s.lines_truncated as i64;
            lost += s.bytes_lost_to_truncation as i64;
        }
        self.metrics.files_open.set(open);
        self.metrics.deleted_bytes_held.set(held);
        self.metrics.deleted_bytes_alarm.set(alarm as i64);
        self.metrics.lines_truncated.set(truncated);
        self.metrics.bytes_lost_to_truncation.set(lost);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_frame_gives_its_buffer_back_and_the_pool_stays_bounded() {
        let pool = FramePool::default();
        let mut buf = pool.take();
        buf.extend_from_slice(&[7u8; 100_000]);
        let ptr = buf.as_ptr();
        let frame = pool.share(buf);
        let copy = frame.clone(); // a resend holds the frame too
        assert_eq!(&frame[..3], &[7, 7, 7]);
        drop(frame);
        assert_eq!(pool.0.lock().unwrap().len(), 0, "still held by its clone");
        drop(copy);
        let again = pool.take();
        assert_eq!(
            (again.as_ptr(), again.len()),
            (ptr, 0),
            "the same buffer, emptied"
        );
        assert!(again.capacity() >= 100_000);
        let frames: Vec<Bytes> = (0..FramePool::SPARE + 3)
            .map(|_| pool.share(vec![1u8; 1000]))
            .collect();
        drop(frames);
        assert_eq!(pool.0.lock().unwrap().len(), FramePool::SPARE);
    }
}
