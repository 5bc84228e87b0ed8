//! Dedup: which events of a source the relay already has, so that resent chunks are
//! trimmed instead of spooled twice. Pure bookkeeping, no I/O: the spool writer calls it
//! and persists its [`Dedup::snapshot`] with the spool.
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
//! and the number of duplicates trimmed, which travel in the same snapshot so that
//! counts and marks always agree after a restart. Rebuilding replays the spool from the
//! snapshot on; taking the maximum is idempotent, so replaying a little too much is
//! harmless for the marks.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::ledger::Counts;
use crate::record::SpooledChunk;

#[derive(Default, Debug)]
pub struct Dedup {
    state: State,
    /// Sources whose chunk could not be spooled (not persisted: after a restart every
    /// unacknowledged chunk is resent anyway).
    refused: HashMap<String, Refusal>,
}

#[derive(Default, Debug, Clone, PartialEq, Serialize, Deserialize)]
struct State {
    dedup: HashMap<String, u64>,
    received: Counts,
    duplicates: u64,
}

/// The snapshot's on-disk format; versioned so a later format can be read beside it.
#[derive(Serialize, Deserialize)]
#[serde(tag = "version")]
enum StateFile {
    #[serde(rename = "1")]
    V1(State),
}

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
    pub fn from_snapshot(bytes: &[u8]) -> Result<Dedup, serde_json::Error> {
        let StateFile::V1(state) = serde_json::from_slice(bytes)?;
        Ok(Dedup {
            state,
            refused: HashMap::new(),
        })
    }

    pub fn snapshot(&self) -> Vec<u8> {
        // Serializing plain maps cannot fail.
        serde_json::to_vec(&StateFile::V1(self.state.clone())).unwrap_or_default()
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
        match self.state.dedup.get(source) {
            Some(&high) => seqs.partition_point(|&s| s <= high),
            None => 0,
        }
    }

    pub fn count_duplicates(&mut self, n: u64) {
        self.state.duplicates += n;
    }

    /// A chunk of `source` up to `last` is spooled.
    pub fn accept(&mut self, source: &str, last: u64) {
        match self.state.dedup.get_mut(source) {
            Some(high) => *high = (*high).max(last),
            None => {
                self.state.dedup.insert(source.to_string(), last);
            }
        }
    }

    pub fn count_received(&mut self, tag: &str, hour: u64, n: u64) {
        self.state.received.add(tag, hour, n);
    }

    /// Applies a spooled chunk (at recovery, or when the decoder did not count hours):
    /// its mark and its events per hour.
    pub fn replay(&mut self, chunk: &SpooledChunk<'_>) {
        if let (Some(key), Some(last)) = (chunk.dedup_key(), chunk.last_seq()) {
            self.accept(&key, last);
        }
        let tag = chunk.tag;
        chunk.count_hours(|hour, n| self.count_received(tag, hour, n));
    }

    pub fn sources(&self) -> usize {
        self.state.dedup.len()
    }

    pub fn received(&self) -> &Counts {
        &self.state.received
    }

    pub fn duplicates(&self) -> u64 {
        self.state.duplicates
    }
}

#[cfg(test)]
mod tests {
    //! Model-based: senders that behave like the agent (pipelined chunks, in-order
    //! resends of everything unacknowledged) meet lost acks, failed appends, relay
    //! restarts and failovers to another relay and back; every event sent must be
    //! spooled here exactly once or taken by the other relay, and no sender may be left
    //! with chunks this relay refuses forever.

    use super::*;
    use proptest::prelude::*;

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
        /// The relay restarts from its snapshot; chunks in flight are lost with the
        /// connection and resent later.
        Restart,
        /// A source gives up on this relay: it closes its connection, gets everything it
        /// had unacknowledged taken by another relay, and comes back later with new
        /// chunks only (issue 10's A → B → A).
        FailOver { source: usize },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..3usize, 1..20u64).prop_map(|(source, len)| Op::New { source, len }),
            2 => (0..3usize).prop_map(|source| Op::ResendUnacked { source }),
            1 => (0..3usize).prop_map(|source| Op::LoseAck { source }),
            1 => (0..3usize).prop_map(|source| Op::FailNext { source }),
            1 => Just(Op::Restart),
            1 => (0..3usize).prop_map(|source| Op::FailOver { source }),
        ]
    }

    /// The writer's sequence of calls for one chunk; returns the seqs spooled, or None
    /// when the chunk was refused or failed (no ack).
    fn offer(
        d: &mut Dedup,
        source: &str,
        seqs: &[u64],
        fail: bool,
        connection: u64,
    ) -> Option<Vec<u64>> {
        d.admit(source, seqs[0], *seqs.last().unwrap()).ok()?;
        if fail {
            d.refuse(source, seqs[0], connection);
            return None;
        }
        let skip = d.duplicate_prefix(source, seqs);
        d.count_duplicates(skip as u64);
        if skip < seqs.len() {
            d.accept(source, *seqs.last().unwrap());
        }
        Some(seqs[skip..].to_vec())
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
        fn send(&mut self, d: &mut Dedup, name: &str, range: std::ops::Range<u64>) {
            if std::mem::take(&mut self.reconnect) {
                self.resend_unacked(d, name);
            }
            let seqs: Vec<u64> = range.clone().collect();
            let fail = std::mem::take(&mut self.fail_next);
            if let Some(got) = offer(d, name, &seqs, fail, self.connection) {
                for q in got {
                    *self.spooled.entry(q).or_default() += 1;
                }
                if !std::mem::take(&mut self.lose_next_ack) {
                    self.unacked.retain(|r| r != &range);
                }
            }
        }

        fn fail_over(&mut self, d: &mut Dedup) {
            d.connection_closed(self.connection);
            self.connection += 1;
            for range in std::mem::take(&mut self.unacked) {
                self.elsewhere.extend(range);
            }
            self.reconnect = false;
        }

        fn resend_unacked(&mut self, d: &mut Dedup, name: &str) {
            self.reconnect = false;
            for range in self.unacked.clone() {
                self.send(d, name, range);
            }
        }
    }

    proptest! {
        #[test]
        fn every_event_sent_is_accepted_exactly_once(ops in proptest::collection::vec(op(), 1..80)) {
            let mut d = Dedup::default();
            let mut senders: Vec<Sender> = (0..3u64)
                .map(|i| Sender { connection: i << 32, ..Sender::default() })
                .collect();
            let names = ["src-0", "src-1", "src-2"];
            for op in ops {
                match op {
                    Op::New { source, len } => {
                        let s = &mut senders[source];
                        let range = s.next..s.next + len;
                        s.next += len;
                        if std::mem::take(&mut s.reconnect) {
                            s.resend_unacked(&mut d, names[source]);
                        }
                        s.unacked.push(range.clone());
                        s.send(&mut d, names[source], range);
                    }
                    Op::ResendUnacked { source } => senders[source].resend_unacked(&mut d, names[source]),
                    Op::LoseAck { source } => senders[source].lose_next_ack = true,
                    Op::FailNext { source } => senders[source].fail_next = true,
                    Op::FailOver { source } => senders[source].fail_over(&mut d),
                    Op::Restart => {
                        d = Dedup::from_snapshot(&d.snapshot()).unwrap();
                        senders.iter_mut().for_each(|s| s.reconnect = true);
                    }
                }
            }
            // In the end every sender gets its acks: resend until nothing is unacked.
            for (i, s) in senders.iter_mut().enumerate() {
                s.fail_next = false;
                s.lose_next_ack = false;
                s.resend_unacked(&mut d, names[i]);
                prop_assert!(s.unacked.is_empty(), "source {} still has unacked chunks", i);
                // Nothing lost: every seq is here once, or was taken elsewhere; never
                // twice here.
                for q in 0..s.next {
                    let here = s.spooled.get(&q).copied().unwrap_or(0);
                    prop_assert!(here <= 1, "source {} seq {} spooled {} times", i, q, here);
                    prop_assert!(here == 1 || s.elsewhere.contains(&q), "source {} seq {} lost", i, q);
                }
            }
        }
    }

    #[test]
    fn snapshot_round_trips() {
        let mut d = Dedup::default();
        d.accept("a", 7);
        d.count_received("t", 498_729, 3);
        d.count_duplicates(2);
        let back = Dedup::from_snapshot(&d.snapshot()).unwrap();
        assert_eq!(back.state, d.state);
        assert_eq!(back.duplicate_prefix("a", &[5, 7, 8]), 2);
    }
}
