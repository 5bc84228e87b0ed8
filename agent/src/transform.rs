//! The transform stage of the agent's pipeline: what a line goes through between its
//! source and its chunk. In order: multiline joins the lines of one event (driven by the
//! pipeline, which owns the open events per source), the parser turns the event into a
//! record, and the event time is taken from the record where configured. Filters
//! (drop, sample, redact) slot in after the parser, before the record is kept.
//!
//! Nothing here drops an event: a line that does not parse is kept raw with a
//! `parse_error` field and counted, a record whose time is unusable keeps the read time
//! and is counted.

use std::cell::Cell;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use sluice_forward::{set_entry_time, write_entry_header, EventTime};
use sluice_parsers::{Multiline, Outcome, Parser};

use crate::source::SourceId;

/// The transform chain of one input.
pub struct Transforms {
    pub parser: Parser,
    /// Joins the lines of one event before parsing, if configured.
    pub multiline: Option<Multiline>,
    /// This input's `sluice_agent_parse_errors_total`.
    pub parse_errors: Counter,
    /// This input's `sluice_agent_time_errors_total`.
    pub time_errors: Counter,
    /// When a time error was last logged: one line per minute per input, not per line.
    pub time_warned: Cell<Option<Instant>>,
}

/// Per-source state looked up once per line: foldhash, not SipHash, which cost 4% of the
/// agent's CPU hashing the path for every line (keys are this host's own file paths,
/// not input an attacker picks).
pub(crate) type SourceMap<V> = HashMap<SourceId, V, foldhash::fast::RandomState>;

/// The open (not yet sealed) chunk of one source: encoded entries, their seqs (the
/// source's event numbers, contiguous) and byte offsets, and their event-time hours.
pub(crate) struct OpenChunk {
    pub entries: Vec<u8>,
    pub seqs: Vec<u64>,
    pub offsets: Vec<u64>,
    /// The seq the next event of the source gets.
    pub next_seq: u64,
    /// Consecutive events of one event-time hour: (hour, first seq, events).
    pub hours: Vec<HourRun>,
    pub end: u64,
    pub opened: Instant,
}

/// Consecutive events of one source in one event-time hour (hours since the epoch): the
/// first's seq and how many. What a chunk holds, per hour, for the agent's report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HourRun {
    pub hour: u64,
    pub first_seq: u64,
    pub events: u64,
}

/// The buffers of the last sealed chunk, for the next chunk that opens. A 1 MiB chunk
/// grown from 4 KiB by doubling allocates and copies about 2 MiB, and the freed buffers
/// kept glibc's heap fragmented while frames waited for a slow relay: 2-3 MiB of the
/// agent's peak RSS (bench/RESULTS.md, issue 16). One set is kept, so with many files
/// at most one open chunk holds a big buffer it did not grow itself.
#[derive(Default)]
pub(crate) struct Spare {
    entries: Cell<Vec<u8>>,
    seqs: Cell<Vec<u64>>,
    offsets: Cell<Vec<u64>>,
}

/// Keeps in `cell` the larger of what it holds and `v`, emptied.
fn keep_larger<T>(cell: &Cell<Vec<T>>, mut v: Vec<T>) {
    v.clear();
    let kept = cell.take();
    cell.set(if kept.capacity() >= v.capacity() {
        kept
    } else {
        v
    });
}

impl Spare {
    fn open(&self, room: usize, next_seq: u64) -> OpenChunk {
        let (mut entries, mut seqs, mut offsets) =
            (self.entries.take(), self.seqs.take(), self.offsets.take());
        if entries.capacity() == 0 {
            entries.reserve(room);
        }
        if seqs.capacity() == 0 {
            seqs.reserve(room / 64);
        }
        if offsets.capacity() == 0 {
            offsets.reserve(room / 64);
        }
        OpenChunk {
            entries,
            seqs,
            offsets,
            next_seq,
            hours: Vec::new(),
            end: 0,
            opened: Instant::now(),
        }
    }

    /// Keeps the larger of what is kept and what comes back, emptied.
    pub fn give_back(&self, entries: Vec<u8>, seqs: Vec<u64>, offsets: Vec<u64>) {
        keep_larger(&self.entries, entries);
        keep_larger(&self.seqs, seqs);
        keep_larger(&self.offsets, offsets);
    }
}

/// Appends events of one input to the open chunks of their sources.
pub(crate) struct EventWriter<'a> {
    pub transforms: &'a Transforms,
    pub spare: &'a Spare,
    pub chunk_size: usize,
    /// The read time: the event time of records whose own time is not used.
    pub time: EventTime,
    /// The input's index, to key the chunks that got full.
    pub index: usize,
}

impl EventWriter<'_> {
    /// Appends one event of `source`, which began at byte `offset` and ends before `end`.
    /// Its seq is the next of its source: from `next_seq` (what the source's last sealed
    /// chunk left there), else `start_seq` (where the source's stream was resumed).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub fn add(
        &self,
        sources: &mut SourceMap<OpenChunk>,
        next_seq: &mut SourceMap<u64>,
        full: &mut Vec<(usize, SourceId)>,
        source: &SourceId,
        start_seq: u64,
        offset: u64,
        end: u64,
        bytes: &[u8],
    ) {
        // One hash per line in the common case (the source has an open chunk).
        let c = match sources.get_mut(source) {
            Some(c) => c,
            None => {
                // Small at first and grown by doubling: with many files most chunks stay
                // small (sealed by age or by the pipeline's cap on open bytes), and
                // memory must follow what a file wrote, not files x a fixed reserve.
                let room = self.chunk_size.min(4096);
                let seq = *next_seq.entry(source.clone()).or_insert(start_seq);
                sources
                    .entry(source.clone())
                    .or_insert_with(|| self.spare.open(room, seq))
            }
        };
        let entry = c.entries.len();
        write_entry_header(&mut c.entries, self.time);
        let parser = &self.transforms.parser;
        let mut secs = self.time.secs;
        match parser.write_record_timed(bytes, &mut c.entries, self.time.secs) {
            (Outcome::Failed, _) => {
                self.transforms.parse_errors.inc();
            }
            (Outcome::Parsed, None) => {}
            (Outcome::Parsed, Some(Ok(t))) => {
                secs = t.secs;
                set_entry_time(
                    &mut c.entries[entry..],
                    EventTime {
                        secs: t.secs,
                        nanos: t.nanos,
                    },
                )
            }
            (Outcome::Parsed, Some(Err(e))) => self.time_error(e, source, offset),
        }
        let seq = c.next_seq;
        c.next_seq += 1;
        c.seqs.push(seq);
        c.offsets.push(offset);
        let hour = u64::from(secs) / 3600;
        match c.hours.last_mut() {
            Some(run) if run.hour == hour => run.events += 1,
            _ => c.hours.push(HourRun {
                hour,
                first_seq: seq,
                events: 1,
            }),
        }
        c.end = end;
        if c.entries.len() >= self.chunk_size {
            full.push((self.index, source.clone()));
        }
    }

    /// Counts a record whose time field was unusable (it keeps the read time) and says
    /// so in the log at most once a minute per input, naming the first such line.
    #[cold]
    fn time_error(&self, e: sluice_parsers::TimeError, source: &SourceId, offset: u64) {
        self.transforms.time_errors.inc();
        if self
            .transforms
            .time_warned
            .get()
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
        {
            self.transforms.time_warned.set(Some(Instant::now()));
            let field = self.transforms.parser.time_field();
            tracing::warn!(%source, offset, field = field.map(|f| f.key()), format = ?field.map(|f| f.format()),
                error = e.as_str(), total = self.transforms.time_errors.get(),
                "record time unusable; the event keeps the time it was read (sluice_agent_time_errors_total counts them; logged once a minute)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_chunk_opens_with_the_largest_buffers_given_back() {
        let spare = Spare::default();
        let first = spare.open(4096, 0);
        assert!(first.entries.capacity() >= 4096 && first.entries.is_empty());
        spare.give_back(vec![1u8; 1 << 20], vec![5u64; 9000], vec![7u64; 9000]);
        spare.give_back(vec![2u8; 10], vec![6u64; 3], vec![8u64; 3]); // smaller: not kept
        let next = spare.open(4096, 12);
        assert!(next.entries.is_empty() && next.seqs.is_empty() && next.offsets.is_empty());
        assert_eq!(next.next_seq, 12);
        assert!(next.entries.capacity() >= 1 << 20);
        assert!(next.seqs.capacity() >= 9000 && next.offsets.capacity() >= 9000);
        // Taken: the chunk after opens small again.
        assert!(spare.open(4096, 0).entries.capacity() < 1 << 20);
    }
}
