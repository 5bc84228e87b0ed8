//! Dedup: which events of a source the relay already has, so that resent chunks are
//! trimmed instead of spooled twice. Pure bookkeeping, no I/O: the spool writer calls it
//! and persists its changes ([`Dedup::encode_changes`]) next to the spool
//! (`crate::state_store`).
//!
//! The rule: for every source, the highest seq accepted so far (its high-water mark). A
//! chunk's seqs ascend, so a resent or overlapping chunk loses a prefix: the seqs at or
//! below the mark. This is exact only if a source's chunks are accepted in order, which
//! the ordering guard keeps: when a chunk of a source could not be spooled (a full disk,
//! an I/O error), that source's later chunks — already pipelined behind it — are refused
//! until the failed one is resent. Accepting them would raise the mark past the failed
//! chunk, and its resend would then be trimmed as a duplicate: lost.
//!
//! Alongside, the events received per tag and event-time hour (the ledger's "received")
//! and the number of duplicates trimmed, which travel in the same records so that
//! counts and marks always agree after a restart. Rebuilding replays the spool from the
//! last record on; taking the maximum is idempotent, so replaying a little too much is
//! harmless for the marks.
//!
//! # Bounded
//!
//! Every rotated file is a new source, so the table would grow for good. Each mark
//! therefore remembers when its source was last heard of and where its last chunk ends
//! in the spool; [`Dedup::prune`] forgets a source that has been silent for the
//! retention *and* whose data every sink is past. The trade-off: a source silent for
//! longer than the retention that then resends an old chunk gets it spooled again (a
//! duplicate, never a loss). Received counts of hours older than the ledger's
//! retention are forgotten the same way ([`Dedup::prune_received_before`]).
//!
//! # Persistence is incremental
//!
//! The table can hold millions of sources, so it is never serialized whole per segment
//! roll. What changed since the last record (marks set or removed, count cells, the
//! duplicate total) is kept in a change set and written as one small record
//! ([`Dedup::encode_changes`]); now and then the log of records is compacted into a full
//! record ([`Dedup::encode_full`]). Records hold absolute values, not increments, so
//! applying one twice is harmless.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sluice_spool::Position;

use crate::ledger::Counts;
use crate::record::SpooledChunk;

#[derive(Default, Debug)]
pub struct Dedup {
    state: State,
    /// Sources whose chunk could not be spooled (not persisted: after a restart every
    /// unacknowledged chunk is resent anyway).
    refused: HashMap<String, Refusal>,
    /// What changed since the last record was persisted.
    changes: Changes,
    /// Count cells changed since the ledger last took them ([`Dedup::export_received`]).
    unexported: HashMap<String, HashSet<u64>>,
}

/// What the relay knows of one source. About 130 bytes in memory with the table's
/// overhead, plus the source id (docs/relay.md, "Memory per source").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    /// The highest seq accepted.
    pub high: u64,
    /// When a chunk of it was last offered (unix seconds, the relay's clock).
    pub last_seen: u64,
    /// The spool position right after its last spooled chunk: once every sink's cursor is
    /// past it, no sink needs anything of this source any more.
    pub end: Position,
}

/// When and where a chunk was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// Unix seconds.
    pub secs: u64,
    /// The spool position right after the chunk.
    pub end: Position,
}

#[derive(Default, Debug, Clone, PartialEq)]
struct State {
    marks: HashMap<Arc<str>, Mark>,
    received: Counts,
    duplicates: u64,
}

#[derive(Default, Debug)]
struct Changes {
    /// Sources set or removed.
    sources: HashSet<Arc<str>>,
    /// Count cells set or removed, by tag.
    cells: HashMap<String, HashSet<u64>>,
    duplicates: bool,
}

impl Changes {
    fn cell(cells: &mut HashMap<String, HashSet<u64>>, tag: &str, hour: u64) {
        match cells.get_mut(tag) {
            Some(hours) => {
                hours.insert(hour);
            }
            None => {
                cells.insert(tag.to_string(), HashSet::from([hour]));
            }
        }
    }
}

/// The first on-disk format, a JSON snapshot of the whole state (before sluice 0.2);
/// still read, so an upgraded relay keeps its marks.
#[derive(Serialize, Deserialize)]
#[serde(tag = "version")]
enum StateFileV1 {
    #[serde(rename = "1")]
    V1 {
        dedup: HashMap<String, u64>,
        received: Counts,
        duplicates: u64,
    },
}

/// A persisted record that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("relay state record: {0}")]
pub struct StateRecordError(pub String);

/// The record format ([`Dedup::encode_changes`]): a version byte, then
///
/// ```text
/// kind u8 (0 = full: replaces the state, 1 = changes) | at.segment u64 | at.offset u64
/// | duplicates u64
/// | marks u32,   each: source str | high u64 | last_seen u64 | end.segment u64 | end.offset u64
/// | removed u32, each: source str
/// | cells u32,   each: tag str | hour u64 | events u64 (0 = removed)
/// ```
///
/// integers little-endian, `str` a u32 length and UTF-8 bytes. Framing and checksums
/// are the store's (`crate::state_store`).
const RECORD_VERSION: u8 = 2;
const KIND_FULL: u8 = 0;
const KIND_CHANGES: u8 = 1;

/// The ordering guard of one source: its chunk from seq `failed` could not be spooled.
#[derive(Debug, Clone, Copy)]
struct Refusal {
    failed: u64,
    /// The connection that chunk came on. Once it is closed, no chunk pipelined behind
    /// the failed one can arrive any more, and a sender resends from its oldest
    /// unacknowledged chunk: the guard has done its job and is lifted by whatever comes
    /// next. This is what heals a sender that failed over to another relay (which took
    /// the failed chunk) and came back with later chunks only.
    connection: u64,
    closed: bool,
}

/// A chunk refused by the ordering guard: an earlier chunk of its source, from seq
/// `failed`, has to be resent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfOrder {
    pub failed: u64,
}

impl Dedup {
    /// Reads the version 1 JSON snapshot (the upgrade path). Its marks have no time or
    /// position: they count as seen `now` at `at`, so the retention starts over for them.
    pub fn from_v1_snapshot(
        bytes: &[u8],
        now: u64,
        at: Position,
    ) -> Result<Dedup, serde_json::Error> {
        let StateFileV1::V1 {
            dedup,
            received,
            duplicates,
        } = serde_json::from_slice(bytes)?;
        let mut d = Dedup::default();
        for (source, high) in dedup {
            d.accept(&source, high, Seen { secs: now, end: at });
        }
        for (tag, hours) in &received.0 {
            for (&hour, &n) in hours {
                d.count_received(tag, hour, n);
            }
        }
        d.count_duplicates(duplicates);
        Ok(d)
    }

    /// The ordering guard, before a chunk of `source` with seqs `first..=last` is
    /// spooled. While the connection of a failed chunk is open,
    /// a chunk that starts past the failed one is refused; one that starts at or before
    /// it is admitted (it cannot raise the mark past the gap unless it fills it), and the
    /// guard is lifted by a chunk that covers the failed seq. Lifting it on any older
    /// resend (a sender that replays an acknowledged range) would let its next new chunk
    /// jump the gap and lose the failed one. Once that connection is closed
    /// ([`Dedup::connection_closed`]) the guard is lifted by the next chunk, whatever
    /// it holds (see [`Refusal::connection`]).
    pub fn admit(&mut self, source: &str, first: u64, last: u64) -> Result<(), OutOfOrder> {
        if let Some(r) = self.refused.get(source).copied() {
            if r.closed {
                self.refused.remove(source);
                return Ok(());
            }
            if first > r.failed {
                return Err(OutOfOrder { failed: r.failed });
            }
            if last >= r.failed {
                self.refused.remove(source);
            }
        }
        Ok(())
    }

    /// The chunk of `source` starting at `first`, from `connection`, could not be spooled.
    pub fn refuse(&mut self, source: &str, first: u64, connection: u64) {
        let fresh = Refusal {
            failed: first,
            connection,
            closed: false,
        };
        let r = self.refused.entry(source.to_string()).or_insert(fresh);
        if r.closed || first < r.failed {
            *r = fresh;
        }
    }

    /// `connection` is closed: no more chunks come on it.
    pub fn connection_closed(&mut self, connection: u64) {
        for r in self.refused.values_mut() {
            if r.connection == connection {
                r.closed = true;
            }
        }
    }

    /// How many leading entries of a chunk with these (ascending) seqs the relay has.
    pub fn duplicate_prefix(&self, source: &str, seqs: &[u64]) -> usize {
        match self.state.marks.get(source) {
            Some(m) => seqs.partition_point(|&s| s <= m.high),
            None => 0,
        }
    }

    pub fn count_duplicates(&mut self, n: u64) {
        if n > 0 {
            self.state.duplicates += n;
            self.changes.duplicates = true;
        }
    }

    /// A chunk of `source` up to `last` is spooled (or was wholly a duplicate: a source
    /// that resends is alive, so it is seen all the same).
    pub fn accept(&mut self, source: &str, last: u64, seen: Seen) {
        match self.state.marks.get_key_value(source) {
            Some((key, old)) => {
                let new = Mark {
                    high: old.high.max(last),
                    last_seen: old.last_seen.max(seen.secs),
                    end: old.end.max(seen.end),
                };
                if new != *old {
                    let key = key.clone();
                    if !self.changes.sources.contains(&*key) {
                        self.changes.sources.insert(key.clone());
                    }
                    self.state.marks.insert(key, new);
                }
            }
            None => {
                let key: Arc<str> = source.into();
                self.changes.sources.insert(key.clone());
                self.state.marks.insert(
                    key,
                    Mark {
                        high: last,
                        last_seen: seen.secs,
                        end: seen.end,
                    },
                );
            }
        }
    }

    pub fn count_received(&mut self, tag: &str, hour: u64, n: u64) {
        if n == 0 {
            return;
        }
        self.state.received.add(tag, hour, n);
        Changes::cell(&mut self.changes.cells, tag, hour);
        Changes::cell(&mut self.unexported, tag, hour);
    }

    /// Applies a spooled chunk (at recovery, or when the decoder did not count hours):
    /// its mark, seen when it was received, and its events per hour. `end` is the spool
    /// position right after it.
    pub fn replay(&mut self, chunk: &SpooledChunk<'_>, end: Position) {
        if let (Some(key), Some(last)) = (chunk.dedup_key(), chunk.last_mark()) {
            let secs = chunk.received_at / 1_000_000_000;
            self.accept(&key, last, Seen { secs, end });
        }
        let tag = chunk.tag;
        chunk.count_hours(|hour, n| self.count_received(tag, hour, n));
    }

    /// Forgets every source silent for more than `retention` seconds at `now` whose
    /// last chunk every sink is past (`delivered`: the oldest sink cursor). A source
    /// with a chunk under the ordering guard is kept. Returns how many were forgotten.
    pub fn prune(&mut self, now: u64, retention: u64, delivered: Position) -> usize {
        let before = self.state.marks.len();
        let (changes, refused) = (&mut self.changes, &self.refused);
        self.state.marks.retain(|source, m| {
            let keep = now.saturating_sub(m.last_seen) <= retention
                || m.end > delivered
                || refused.contains_key(&**source);
            if !keep {
                changes.sources.insert(source.clone());
            }
            keep
        });
        before - self.state.marks.len()
    }

    /// Forgets the received counts of hours before `hour` (the ledger's retention).
    /// Returns how many (tag, hour) cells were forgotten.
    pub fn prune_received_before(&mut self, hour: u64) -> usize {
        let mut gone = Vec::new();
        self.state
            .received
            .prune_before(hour, |tag, h| gone.push((tag.to_string(), h)));
        for (tag, h) in &gone {
            Changes::cell(&mut self.changes.cells, tag, *h);
            Changes::cell(&mut self.unexported, tag, *h);
        }
        gone.len()
    }

    pub fn sources(&self) -> usize {
        self.state.marks.len()
    }

    pub fn mark(&self, source: &str) -> Option<Mark> {
        self.state.marks.get(source).copied()
    }

    pub fn received(&self) -> &Counts {
        &self.state.received
    }

    /// Brings `into` up to date with the received counts, copying only the cells that
    /// changed since the last call (the ledger's copy is refreshed every second).
    /// Returns whether anything changed.
    pub fn export_received(&mut self, into: &mut Counts) -> bool {
        let changed = !self.unexported.is_empty();
        for (tag, hours) in self.unexported.drain() {
            for hour in hours {
                into.set(&tag, hour, self.state.received.get(&tag, hour));
            }
        }
        changed
    }

    pub fn duplicates(&self) -> u64 {
        self.state.duplicates
    }

    /// Marks, removed marks and count cells changed since the last persisted record.
    pub fn pending_changes(&self) -> usize {
        self.changes.sources.len()
            + self.changes.cells.values().map(HashSet::len).sum::<usize>()
            + usize::from(self.changes.duplicates)
    }

    /// Appends to `out` a record of what changed since the last persisted one, as the
    /// state stood at spool position `at`. Its size is proportional to the change.
    pub fn encode_changes(&self, at: Position, out: &mut Vec<u8>) {
        let mut removed = Vec::new();
        let mut marks = Vec::new();
        for source in &self.changes.sources {
            match self.state.marks.get(source) {
                Some(m) => marks.push((&**source, *m)),
                None => removed.push(&**source),
            }
        }
        let cells = self.changes.cells.iter().flat_map(|(tag, hours)| {
            hours
                .iter()
                .map(move |&h| (tag.as_str(), h, self.state.received.get(tag, h)))
        });
        encode(
            out,
            KIND_CHANGES,
            at,
            self.state.duplicates,
            marks.into_iter(),
            removed,
            cells,
        );
    }

    /// Appends to `out` a record of the whole state at spool position `at`.
    pub fn encode_full(&self, at: Position, out: &mut Vec<u8>) {
        let marks = self.state.marks.iter().map(|(s, m)| (&**s, *m));
        encode(
            out,
            KIND_FULL,
            at,
            self.state.duplicates,
            marks,
            std::iter::empty(),
            self.state.received.cells(),
        );
    }

    /// The changes up to now are persisted (after [`encode_changes`](Self::encode_changes)
    /// or [`encode_full`](Self::encode_full) reached the disk).
    pub fn changes_persisted(&mut self) {
        self.changes = Changes::default();
    }

    /// Applies a persisted record (recovery: a full record, then the changes records in
    /// order) and returns the spool position it was taken at.
    pub fn apply(&mut self, record: &[u8]) -> Result<Position, StateRecordError> {
        let mut r = Reader(record);
        let version = r.u8()?;
        if version != RECORD_VERSION {
            return Err(StateRecordError(format!("unknown version {version}")));
        }
        let kind = r.u8()?;
        if kind == KIND_FULL {
            self.state = State::default();
        } else if kind != KIND_CHANGES {
            return Err(StateRecordError(format!("unknown record kind {kind}")));
        }
        let at = r.position()?;
        self.state.duplicates = r.u64()?;
        for _ in 0..r.u32()? {
            let source = r.str()?;
            let mark = Mark {
                high: r.u64()?,
                last_seen: r.u64()?,
                end: r.position()?,
            };
            self.state.marks.insert(source.into(), mark);
        }
        for _ in 0..r.u32()? {
            self.state.marks.remove(r.str()?);
        }
        for _ in 0..r.u32()? {
            let (tag, hour, n) = (r.str()?, r.u64()?, r.u64()?);
            self.state.received.set(tag, hour, n);
        }
        if !r.0.is_empty() {
            return Err(StateRecordError(format!(
                "{} bytes after the end",
                r.0.len()
            )));
        }
        // What a record brings is on disk already; the ledger takes all of it.
        for (tag, hour, _) in self.state.received.cells() {
            Changes::cell(&mut self.unexported, tag, hour);
        }
        Ok(at)
    }
}

fn encode<'a>(
    out: &mut Vec<u8>,
    kind: u8,
    at: Position,
    duplicates: u64,
    marks: impl Iterator<Item = (&'a str, Mark)>,
    removed: impl IntoIterator<Item = &'a str>,
    cells: impl Iterator<Item = (&'a str, u64, u64)>,
) {
    fn str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    fn u64(out: &mut Vec<u8>, v: u64) {
        out.extend_from_slice(&v.to_le_bytes());
    }
    /// Writes a placeholder count, returns where it is.
    fn count_at(out: &mut Vec<u8>) -> usize {
        out.extend_from_slice(&0u32.to_le_bytes());
        out.len() - 4
    }
    fn set_count(out: &mut [u8], at: usize, n: u32) {
        out[at..at + 4].copy_from_slice(&n.to_le_bytes());
    }
    out.push(RECORD_VERSION);
    out.push(kind);
    u64(out, at.segment);
    u64(out, at.offset);
    u64(out, duplicates);
    let (slot, mut n) = (count_at(out), 0u32);
    for (source, m) in marks {
        str(out, source);
        u64(out, m.high);
        u64(out, m.last_seen);
        u64(out, m.end.segment);
        u64(out, m.end.offset);
        n += 1;
    }
    set_count(out, slot, n);
    let (slot, mut n) = (count_at(out), 0u32);
    for source in removed {
        str(out, source);
        n += 1;
    }
    set_count(out, slot, n);
    let (slot, mut n) = (count_at(out), 0u32);
    for (tag, hour, events) in cells {
        str(out, tag);
        u64(out, hour);
        u64(out, events);
        n += 1;
    }
    set_count(out, slot, n);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StateRecordError> {
        if self.0.len() < n {
            return Err(StateRecordError(format!(
                "truncated: {n} bytes expected, {} left",
                self.0.len()
            )));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, StateRecordError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, StateRecordError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, StateRecordError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn position(&mut self) -> Result<Position, StateRecordError> {
        Ok(Position {
            segment: self.u64()?,
            offset: self.u64()?,
        })
    }
    fn str(&mut self) -> Result<&'a str, StateRecordError> {
        let n = self.u32()? as usize;
        std::str::from_utf8(self.take(n)?).map_err(|e| StateRecordError(format!("bad string: {e}")))
    }
}

#[cfg(test)]
mod tests {
    //! Model-based: senders that behave like the agent (pipelined chunks, in-order
    //! resends of everything unacknowledged) meet lost acks, failed appends, relay
    //! restarts (from the persisted records: a full one and the changes after it),
    //! pruning of idle sources and failovers to another relay and back; every event sent
    //! must be spooled here exactly once or taken by the other relay, and no sender may
    //! be left with chunks this relay refuses forever.

    use super::*;
    use proptest::prelude::*;

    const DAY: u64 = 86_400;

    fn pos(segment: u64, offset: u64) -> Position {
        Position { segment, offset }
    }

    fn seen(secs: u64, end: Position) -> Seen {
        Seen { secs, end }
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// A source sends its next chunk of `len` new events (pipelined: earlier chunks
        /// may still wait for their ack).
        New { source: usize, len: u64 },
        /// A source resends, in order, every chunk it has no ack for (after a timeout or
        /// a reconnect), as the agent does.
        ResendUnacked { source: usize },
        /// The ack of the next chunk of a source is lost on the way back (the chunk is
        /// spooled, the sender will resend it).
        LoseAck { source: usize },
        /// The next chunk of a source fails to spool (disk full).
        FailNext { source: usize },
        /// The writer persists what changed (a segment roll).
        Persist,
        /// The writer compacts: a full record replaces the log.
        Compact,
        /// The relay restarts from its records; chunks in flight are lost with the
        /// connection and resent later.
        Restart,
        /// A source gives up on this relay: it closes its connection, gets everything it
        /// had unacknowledged taken by another relay, and comes back later with new
        /// chunks only (issue 10's A → B → A).
        FailOver { source: usize },
        /// Time passes beyond the retention. Live senders got their acks long before
        /// (they resend within seconds); then every source, idle now and delivered by
        /// the sinks, is pruned.
        Idle,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..3usize, 1..20u64).prop_map(|(source, len)| Op::New { source, len }),
            2 => (0..3usize).prop_map(|source| Op::ResendUnacked { source }),
            1 => (0..3usize).prop_map(|source| Op::LoseAck { source }),
            1 => (0..3usize).prop_map(|source| Op::FailNext { source }),
            1 => Just(Op::Persist),
            1 => Just(Op::Compact),
            1 => Just(Op::Restart),
            1 => (0..3usize).prop_map(|source| Op::FailOver { source }),
            1 => Just(Op::Idle),
        ]
    }

    /// The relay: its dedup, the clock, the spool's end, and the persisted records.
    struct Relay {
        d: Dedup,
        now: u64,
        tail: u64,
        base: Vec<u8>,
        log: Vec<Vec<u8>>,
    }

    impl Relay {
        fn new() -> Relay {
            let d = Dedup::default();
            let mut base = Vec::new();
            d.encode_full(pos(0, 0), &mut base);
            Relay {
                d,
                now: 1_000_000,
                tail: 0,
                base,
                log: Vec::new(),
            }
        }

        fn persist(&mut self) {
            let mut rec = Vec::new();
            self.d.encode_changes(pos(0, self.tail), &mut rec);
            self.log.push(rec);
            self.d.changes_persisted();
        }

        fn compact(&mut self) {
            self.base.clear();
            self.d.encode_full(pos(0, self.tail), &mut self.base);
            self.log.clear();
            self.d.changes_persisted();
        }

        /// What recovery does (the model has no spool to replay, so it persists first).
        fn restart(&mut self) {
            self.persist();
            let mut d = Dedup::default();
            d.apply(&self.base).unwrap();
            for rec in &self.log {
                d.apply(rec).unwrap();
            }
            assert_eq!(d.state, self.d.state, "records rebuild the state");
            self.d = d;
        }

        /// The writer's sequence of calls for one chunk; returns the seqs spooled, or
        /// None when the chunk was refused or failed (no ack).
        fn offer(
            &mut self,
            source: &str,
            seqs: &[u64],
            fail: bool,
            connection: u64,
        ) -> Option<Vec<u64>> {
            let d = &mut self.d;
            d.admit(source, seqs[0], *seqs.last().unwrap()).ok()?;
            if fail {
                d.refuse(source, seqs[0], connection);
                return None;
            }
            let skip = d.duplicate_prefix(source, seqs);
            d.count_duplicates(skip as u64);
            if skip < seqs.len() {
                self.tail += 1;
                d.count_received("t", 1, (seqs.len() - skip) as u64);
            }
            d.accept(
                source,
                *seqs.last().unwrap(),
                seen(self.now, pos(0, self.tail)),
            );
            Some(seqs[skip..].to_vec())
        }
    }

    /// One sending source: its chunks (seq ranges) not yet acknowledged, in order.
    #[derive(Default)]
    struct Sender {
        next: u64,
        unacked: Vec<std::ops::Range<u64>>,
        fail_next: bool,
        lose_next_ack: bool,
        /// The relay restarted: the sender reconnects and resends what it has no ack
        /// for before anything new (its in-flight chunks died with the connection).
        reconnect: bool,
        /// Its current connection (unique across senders).
        connection: u64,
        spooled: HashMap<u64, u32>,
        /// Seqs another relay took when this sender failed over.
        elsewhere: std::collections::HashSet<u64>,
    }

    impl Sender {
        fn send(&mut self, r: &mut Relay, name: &str, range: std::ops::Range<u64>) {
            if std::mem::take(&mut self.reconnect) {
                self.resend_unacked(r, name);
            }
            let seqs: Vec<u64> = range.clone().collect();
            let fail = std::mem::take(&mut self.fail_next);
            if let Some(got) = r.offer(name, &seqs, fail, self.connection) {
                for q in got {
                    *self.spooled.entry(q).or_default() += 1;
                }
                if !std::mem::take(&mut self.lose_next_ack) {
                    self.unacked.retain(|x| x != &range);
                }
            }
        }

        fn fail_over(&mut self, r: &mut Relay) {
            r.d.connection_closed(self.connection);
            self.connection += 1;
            for range in std::mem::take(&mut self.unacked) {
                self.elsewhere.extend(range);
            }
            self.reconnect = false;
        }

        fn resend_unacked(&mut self, r: &mut Relay, name: &str) {
            self.reconnect = false;
            for range in self.unacked.clone() {
                self.send(r, name, range);
            }
        }

        /// Resends until everything is acknowledged, as a live agent does.
        fn settle(&mut self, r: &mut Relay, name: &str) {
            self.fail_next = false;
            self.lose_next_ack = false;
            self.resend_unacked(r, name);
        }
    }

    proptest! {
        #[test]
        fn every_event_sent_is_accepted_exactly_once(ops in proptest::collection::vec(op(), 1..80)) {
            let mut r = Relay::new();
            let mut senders: Vec<Sender> = (0..3u64)
                .map(|i| Sender { connection: i << 32, ..Sender::default() })
                .collect();
            let names = ["src-0", "src-1", "src-2"];
            for op in ops {
                r.now += 1;
                match op {
                    Op::New { source, len } => {
                        let s = &mut senders[source];
                        let range = s.next..s.next + len;
                        s.next += len;
                        if std::mem::take(&mut s.reconnect) {
                            s.resend_unacked(&mut r, names[source]);
                        }
                        s.unacked.push(range.clone());
                        s.send(&mut r, names[source], range);
                    }
                    Op::ResendUnacked { source } => senders[source].resend_unacked(&mut r, names[source]),
                    Op::LoseAck { source } => senders[source].lose_next_ack = true,
                    Op::FailNext { source } => senders[source].fail_next = true,
                    Op::FailOver { source } => senders[source].fail_over(&mut r),
                    Op::Persist => r.persist(),
                    Op::Compact => r.compact(),
                    Op::Restart => {
                        r.restart();
                        senders.iter_mut().for_each(|s| s.reconnect = true);
                    }
                    Op::Idle => {
                        for (i, s) in senders.iter_mut().enumerate() {
                            s.settle(&mut r, names[i]);
                        }
                        r.now += 7 * DAY + 1;
                        let tail = pos(0, r.tail);
                        r.d.prune(r.now, 7 * DAY, tail);
                        prop_assert!(r.d.sources() <= r.d.refused.len(), "every idle, delivered source is pruned but those under the guard");
                    }
                }
            }
            // In the end every sender gets its acks: resend until nothing is unacked.
            for (i, s) in senders.iter_mut().enumerate() {
                s.settle(&mut r, names[i]);
                prop_assert!(s.unacked.is_empty(), "source {} still has unacked chunks", i);
                // Nothing lost: every seq is here once, or was taken elsewhere; never
                // twice here.
                for q in 0..s.next {
                    let here = s.spooled.get(&q).copied().unwrap_or(0);
                    prop_assert!(here <= 1, "source {} seq {} spooled {} times", i, q, here);
                    prop_assert!(here == 1 || s.elsewhere.contains(&q), "source {} seq {} lost", i, q);
                }
            }
            r.restart();
        }
    }

    #[test]
    fn a_source_idle_past_retention_and_delivered_everywhere_is_pruned() {
        let mut d = Dedup::default();
        let t0 = 1_700_000_000;
        d.accept("rotated-away", 9, seen(t0, pos(1, 100)));
        d.accept("busy", 5, seen(t0 + 7 * DAY, pos(3, 0)));
        d.accept("not-yet-delivered", 3, seen(t0, pos(5, 0)));
        let now = t0 + 7 * DAY + 1;
        assert_eq!(d.prune(now, 7 * DAY, pos(4, 0)), 1);
        assert_eq!(d.sources(), 2);
        assert_eq!(d.duplicate_prefix("rotated-away", &[1, 2]), 0, "forgotten");
        assert_eq!(d.duplicate_prefix("busy", &[5, 6]), 1);
        assert_eq!(
            d.duplicate_prefix("not-yet-delivered", &[3]),
            1,
            "a sink still needs it"
        );
        // A resend (all duplicates) keeps a source alive.
        d.accept("busy", 5, seen(now + 7 * DAY, pos(3, 0)));
        assert_eq!(d.prune(now + 7 * DAY + 10, 7 * DAY, pos(9, 0)), 1);
        assert_eq!(d.sources(), 1);
        assert!(d.mark("busy").is_some());
    }

    #[test]
    fn a_source_under_the_ordering_guard_is_not_pruned() {
        let mut d = Dedup::default();
        d.accept("s", 9, seen(0, pos(0, 10)));
        d.refuse("s", 10, 1);
        assert_eq!(d.prune(100 * DAY, DAY, pos(9, 0)), 0);
    }

    #[test]
    fn received_hours_before_the_retention_are_pruned() {
        let mut d = Dedup::default();
        d.count_received("t", 10, 3);
        d.count_received("t", 20, 4);
        d.count_received("u", 5, 1);
        assert_eq!(d.prune_received_before(15), 2);
        assert_eq!(d.received().total(), 4);
        assert_eq!(d.received().0.len(), 1, "a tag without hours is gone");
    }

    /// With a million sources known, what a roll writes is what changed, not the table.
    #[test]
    fn a_change_record_is_proportional_to_the_change() {
        let mut d = Dedup::default();
        for i in 0..100_000u64 {
            d.accept(
                &format!("agent-1:/var/log/app.log:{i}"),
                i,
                seen(1, pos(1, i)),
            );
        }
        d.count_received("t", 1, 100_000);
        let mut full = Vec::new();
        d.encode_full(pos(2, 0), &mut full);
        d.changes_persisted();
        d.accept("agent-1:/var/log/app.log:7", 100, seen(2, pos(2, 50)));
        d.count_received("t", 1, 1);
        let mut delta = Vec::new();
        d.encode_changes(pos(2, 60), &mut delta);
        assert!(full.len() > 5_000_000, "{}", full.len());
        assert!(
            delta.len() < 200,
            "one changed source wrote {} bytes",
            delta.len()
        );
        let mut back = Dedup::default();
        assert_eq!(back.apply(&full).unwrap(), pos(2, 0));
        assert_eq!(back.apply(&delta).unwrap(), pos(2, 60));
        assert_eq!(back.state, d.state);
    }

    #[test]
    fn records_round_trip_with_removals() {
        let mut d = Dedup::default();
        d.accept("a", 7, seen(10, pos(1, 5)));
        d.accept("b", 3, seen(5, pos(1, 2)));
        d.count_received("t", 498_729, 3);
        d.count_duplicates(2);
        let mut base = Vec::new();
        d.encode_full(pos(1, 9), &mut base);
        d.changes_persisted();
        d.prune(5 + DAY, DAY - 3, pos(2, 0));
        d.prune_received_before(498_730);
        let mut delta = Vec::new();
        d.encode_changes(pos(2, 0), &mut delta);
        let mut back = Dedup::default();
        back.apply(&base).unwrap();
        back.apply(&delta).unwrap();
        assert_eq!(back.state, d.state);
        assert_eq!(back.sources(), 1);
        assert_eq!(back.received().total(), 0);
        assert_eq!(back.duplicates(), 2);
        assert!(
            back.apply(&delta[..delta.len() - 1]).is_err(),
            "a torn record is refused"
        );
    }

    /// Snapshots written by an older relay (version 1, JSON) are still read.
    #[test]
    fn a_v1_snapshot_is_read() {
        let v1 = br#"{"version":"1","dedup":{"a":7},"received":{"t":{"2026-11-23T09":3}},"duplicates":2}"#;
        let d = Dedup::from_v1_snapshot(v1, 1_000, pos(4, 0)).unwrap();
        assert_eq!(d.duplicate_prefix("a", &[5, 7, 8]), 2);
        assert_eq!(d.received().get("t", 498_729), 3);
        assert_eq!(d.duplicates(), 2);
        assert_eq!(d.mark("a").unwrap().last_seen, 1_000);
    }

    #[test]
    fn the_ledger_copy_gets_only_changed_cells() {
        let mut d = Dedup::default();
        let mut ledger = Counts::default();
        d.count_received("t", 1, 3);
        d.count_received("t", 2, 3);
        d.export_received(&mut ledger);
        assert_eq!(ledger, *d.received());
        d.count_received("t", 2, 1);
        d.prune_received_before(2);
        assert_eq!(d.unexported.values().map(HashSet::len).sum::<usize>(), 2);
        d.export_received(&mut ledger);
        assert_eq!(ledger, *d.received());
    }
}
