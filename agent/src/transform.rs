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
use sluice_forward::{set_entry_time, write_entry_header, EventTime, ENTRY_HEADER_LEN};
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

/// The open (not yet sealed) chunk of one source: encoded entries and their seqs.
pub(crate) struct OpenChunk {
    pub entries: Vec<u8>,
    pub seqs: Vec<u64>,
    pub end: u64,
    pub opened: Instant,
}

/// Appends events of one input to the open chunks of their sources.
pub(crate) struct EventWriter<'a> {
    pub transforms: &'a Transforms,
    pub chunk_size: usize,
    /// The read time: the event time of records whose own time is not used.
    pub time: EventTime,
    /// The input's index, to key the chunks that got full.
    pub index: usize,
}

impl EventWriter<'_> {
    #[inline]
    pub fn add(
        &self,
        sources: &mut HashMap<SourceId, OpenChunk>,
        full: &mut Vec<(usize, SourceId)>,
        source: &SourceId,
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
                sources.entry(source.clone()).or_insert(OpenChunk {
                    entries: Vec::with_capacity(room),
                    seqs: Vec::with_capacity(room / 64),
                    end: 0,
                    opened: Instant::now(),
                })
            }
        };
        let entry = c.entries.len();
        write_entry_header(&mut c.entries, self.time);
        if self.transforms.parser.write_record(bytes, &mut c.entries) == Outcome::Failed {
            self.transforms.parse_errors.inc();
        } else {
            let record = &c.entries[entry + ENTRY_HEADER_LEN..];
            match self.transforms.parser.record_time(record, self.time.secs) {
                None => {}
                Some(Ok(t)) => set_entry_time(
                    &mut c.entries[entry..],
                    EventTime {
                        secs: t.secs,
                        nanos: t.nanos,
                    },
                ),
                Some(Err(e)) => self.time_error(e, source, offset),
            }
        }
        c.seqs.push(offset);
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
