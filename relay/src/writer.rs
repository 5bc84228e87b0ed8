//! The spool writer: the one thread that owns the [`Spool`].
//!
//! Connections hand it [`WriteRequest`]s through a bounded channel. It takes as many as
//! are waiting (group commit), trims what dedup has already seen, appends the rest,
//! commits once (one fsync for the whole group) and only then answers every request.
//! So an acknowledgement never precedes durability, and a busy relay pays one fsync per
//! group rather than per chunk.
//!
//! Dedup ([`crate::dedup`]) decides what of a chunk is new. Its table (and the received
//! counts) is snapshotted into the spool at each segment roll, *after* the commit that
//! made the previous segment durable, and rebuilt at start by replaying the spool from
//! the snapshot. Were the snapshot written before that commit, a crash could leave it
//! ahead of the data, and a resend of the lost tail would be trimmed as a duplicate: lost.
//!
//! Backpressure: once the spool is at its size limit the writer stops taking requests —
//! at once, also in the middle of gathering a group — so the spool exceeds its limit by
//! at most the one chunk that crossed it; the channel fills, connections stop reading
//! their sockets, agents stop sending.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_core::metrics::Readiness;
use sluice_forward::{EventBatch, EventTime};
use sluice_spool::{Position, Spool, SpoolError};
use tokio::sync::{mpsc, oneshot, watch};

use crate::dedup::Dedup;
use crate::ledger::Ledger;
use crate::metrics::RelayMetrics;
use crate::record;

/// A chunk to spool; the reply says where it ended up (or why it could not be).
pub struct WriteRequest {
    pub batch: EventBatch,
    /// The connection it came on (for dedup's ordering guard).
    pub connection: u64,
    /// The name the client authenticated as, if it did: a source id that is not its
    /// own is kept apart in dedup ([`record::namespace`]).
    pub client: Option<std::sync::Arc<str>>,
    pub reply: oneshot::Sender<Result<Accepted, String>>,
}

#[derive(Debug, Clone, Copy)]
pub struct Accepted {
    /// The spool position right after this chunk: once a sink's cursor reaches it, the
    /// sink has the chunk.
    pub end: Position,
    pub accepted: usize,
    pub duplicates: usize,
}

// Nearly every message is a Write: boxing it would allocate per chunk to shrink the
// rare small ones.
#[allow(clippy::large_enum_variant)]
pub enum WriterMsg {
    Write(WriteRequest),
    /// Periodic housekeeping: persist sink cursors, collect garbage, export counts.
    Tick,
    /// A connection ended: every request it sent is ahead of this in the channel.
    Closed(u64),
    /// Finish the current group, persist, and stop.
    Shutdown,
}

const SNAPSHOT: &str = "relay-state";
const MAX_GROUP: usize = 1024;

pub struct SpoolWriter {
    spool: Spool,
    dedup: Dedup,
    pending_snapshot: Option<(Position, Vec<u8>)>,
    /// Where the snapshot on disk is: it keeps the segments after it from collection.
    snapshot_at: Position,
    ledger: Arc<Mutex<Ledger>>,
    metrics: Arc<RelayMetrics>,
    committed: watch::Sender<Position>,
    sink_cursors: Vec<(String, watch::Receiver<Position>)>,
    /// `/ready`: false while the spool refuses writes.
    ready: Arc<Readiness>,
    /// The last append or commit failed (a full disk, an I/O error); cleared by the next
    /// commit that made a chunk durable.
    failing: bool,
    /// Set by the shutdown before it sends [`WriterMsg::Shutdown`]: a writer parked on a
    /// full spool (which reads no messages) stops too, leaving queued chunks unanswered
    /// (their senders resend them), instead of holding shutdown forever.
    stopping: Arc<AtomicBool>,
    /// Tests: make the next spool append fail, as a full disk would.
    #[cfg(test)]
    fail_next_append: bool,
    buf: Vec<u8>,
}

impl SpoolWriter {
    /// Rebuilds the dedup table and received counts from the snapshot and the spool.
    pub fn recover(
        spool: Spool,
        ledger: Arc<Mutex<Ledger>>,
        metrics: Arc<RelayMetrics>,
    ) -> Result<(SpoolWriter, watch::Receiver<Position>), SpoolError> {
        let (mut dedup, from) = match spool.read_snapshot(SNAPSHOT)? {
            Some((at, bytes)) => match Dedup::from_snapshot(&bytes) {
                Ok(d) => (d, at),
                Err(e) => {
                    tracing::warn!(error = %e, "relay state snapshot unreadable; rebuilding from the whole spool");
                    (Dedup::default(), spool.head())
                }
            },
            None => (Dedup::default(), spool.head()),
        };
        let from = from.max(spool.head());
        let mut reader = spool.reader(from)?;
        let mut buf = Vec::new();
        let mut replayed = 0u64;
        loop {
            match reader.next(&mut buf) {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(SpoolError::Damaged {
                    damage,
                    first_report,
                }) => {
                    if first_report {
                        metrics.spool_damage(&damage);
                    }
                    // Its events are unreadable: the received counts cannot include
                    // them, so reconcile cannot show them as missing. Dedup knows less,
                    // which can duplicate, never lose.
                    tracing::error!(error = %damage, "spool damage after the relay state snapshot: the received counts rebuilt from the spool do not include these batches");
                    continue;
                }
                Err(e) => {
                    // Open() checked every segment, so this is damage since then. Starting
                    // matters more: dedup then knows less, which can duplicate, never lose.
                    tracing::error!(error = %e, "spool damaged while rebuilding the dedup table; continuing with what was read (resent chunks past this point may be duplicated)");
                    metrics.spool_errors.inc();
                    break;
                }
            }
            match record::decode(&buf) {
                Ok(chunk) => {
                    dedup.replay(&chunk);
                    replayed += 1;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable spool record skipped during dedup rebuild")
                }
            }
        }
        tracing::info!(
            replayed,
            sources = dedup.sources(),
            "dedup table rebuilt from spool"
        );
        let tail = spool.tail();
        let (committed, rx) = watch::channel(tail);
        let mut writer = SpoolWriter {
            spool,
            dedup,
            pending_snapshot: None,
            snapshot_at: tail,
            ledger,
            metrics,
            committed,
            sink_cursors: Vec::new(),
            ready: Arc::new(Readiness::default()),
            failing: false,
            stopping: Arc::new(AtomicBool::new(false)),
            #[cfg(test)]
            fail_next_append: false,
            buf: Vec::with_capacity(1 << 20),
        };
        // A snapshot at the tail right away: it bounds garbage collection from now on
        // and makes the next recovery short.
        let snap = writer.snapshot_bytes();
        writer.spool.write_snapshot(SNAPSHOT, tail, &snap)?;
        writer.export();
        Ok((writer, rx))
    }

    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    pub fn spool_mut(&mut self) -> &mut Spool {
        &mut self.spool
    }

    /// Where to report that the spool refuses writes (`/ready`).
    pub fn report_readiness(&mut self, ready: Arc<Readiness>) {
        self.ready = ready;
    }

    /// The flag the shutdown sets before it sends [`WriterMsg::Shutdown`].
    pub fn stopping(&self) -> Arc<AtomicBool> {
        self.stopping.clone()
    }

    /// Registers a sink's persisted cursor, which bounds garbage collection.
    pub fn watch_cursor(&mut self, sink: String, cursor: watch::Receiver<Position>) {
        self.sink_cursors.push((sink, cursor));
    }

    fn snapshot_bytes(&self) -> Vec<u8> {
        self.dedup.snapshot()
    }

    /// Runs until every sender of `rx` is gone.
    pub fn run(mut self, mut rx: mpsc::Receiver<WriterMsg>) {
        let mut group: Vec<(WriteRequest, Result<Accepted, String>)> =
            Vec::with_capacity(MAX_GROUP);
        while let Some(first) = rx.blocking_recv() {
            let mut tick = false;
            let mut shutdown = false;
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                match msg {
                    WriterMsg::Tick => tick = true,
                    WriterMsg::Closed(connection) => self.dedup.connection_closed(connection),
                    WriterMsg::Shutdown => {
                        shutdown = true;
                        break;
                    }
                    WriterMsg::Write(req) => {
                        let result = self.append(&req.batch, req.client.as_deref(), req.connection);
                        group.push((req, result));
                    }
                }
                // A full spool ends the group: the requests still queued wait in the
                // channel until the sinks made room, so the spool overshoots its limit
                // by at most the one chunk that crossed it, and no chunk is taken (nor
                // acknowledged) after the writer has seen the spool full.
                if group.len() < MAX_GROUP && !self.spool.is_full() {
                    next = rx.try_recv().ok();
                }
            }
            if !group.is_empty() {
                self.commit(&mut group);
            }
            if shutdown {
                break;
            }
            if tick || self.spool.is_full() {
                self.housekeeping();
            }
            // Backpressure: take no more chunks until the sinks made room.
            let mut parked_at_shutdown = false;
            while self.spool.is_full() {
                self.metrics.spool_full.set(1);
                self.ready.set_refusing(true);
                if self.stopping.load(Ordering::Relaxed) {
                    parked_at_shutdown = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
                self.housekeeping();
            }
            if parked_at_shutdown {
                tracing::warn!("stopping with a full spool: chunks still queued are not acknowledged; their senders resend them to the next relay or after the restart");
                break;
            }
            self.metrics.spool_full.set(0);
            self.ready.set_refusing(self.failing);
        }
        self.housekeeping();
        if let Err(e) = self.spool.close() {
            tracing::warn!(error = %e, "closing the spool failed (the next start recovers it)");
        }
        tracing::info!("spool writer stopped");
    }

    fn append(
        &mut self,
        batch: &EventBatch,
        client: Option<&str>,
        connection: u64,
    ) -> Result<Accepted, String> {
        let provenance = batch.options.provenance.as_ref();
        let namespace = provenance.and_then(|p| record::namespace(client, &p.source));
        let key = provenance.map(|p| record::dedup_key(namespace, &p.source));
        let range = provenance.and_then(|p| Some((*p.seqs.first()?, *p.seqs.last()?)));
        if let (Some(key), Some((first, last))) = (&key, range) {
            if let Err(e) = self.dedup.admit(key, first, last) {
                let source = provenance.map_or("", |p| p.source.as_str());
                return Err(format!("an earlier chunk of source {source} (from seq {}) could not be spooled; later chunks are refused until it is resent, to keep the order", e.failed));
            }
        }
        let result = self.append_in_order(batch, namespace, key.as_deref());
        if let (Err(_), Some(key), Some((first, _))) = (&result, &key, range) {
            self.dedup.refuse(key, first, connection);
        }
        result
    }

    /// `key` is the chunk's source in the dedup table ([`record::dedup_key`]).
    fn append_in_order(
        &mut self,
        batch: &EventBatch,
        namespace: Option<&str>,
        key: Option<&str>,
    ) -> Result<Accepted, String> {
        #[cfg(test)]
        if std::mem::take(&mut self.fail_next_append) {
            self.failing = true; // as a failed spool append does
            return Err("injected append failure".into());
        }
        let (skip, from) = match batch.options.provenance.as_ref() {
            Some(p) if p.seqs.len() == batch.count => {
                let skip = self
                    .dedup
                    .duplicate_prefix(key.unwrap_or(&p.source), &p.seqs);
                (skip, entry_offset(batch, skip)?)
            }
            Some(p) => {
                return Err(format!(
                    "chunk has {} entries but its provenance lists {} seqs",
                    batch.count,
                    p.seqs.len()
                ))
            }
            None => (0, 0),
        };
        if skip > 0 {
            self.dedup.count_duplicates(skip as u64);
            self.metrics.events_duplicate.inc_by(skip as u64);
        }
        if skip == batch.count {
            return Ok(Accepted {
                end: self.spool.tail(),
                accepted: 0,
                duplicates: skip,
            });
        }
        self.buf.clear();
        record::encode(
            &mut self.buf,
            EventTime::now(),
            batch,
            namespace,
            skip,
            from,
        )
        .map_err(|e| e.to_string())?;
        let segment_before = self.spool.active_segment();
        let pos = self.spool.append(&self.buf).map_err(|e| {
            self.failing = true;
            self.metrics.spool_errors.inc();
            tracing::warn!(error = %e, "spool append failed; the chunk is not acknowledged");
            e.to_string()
        })?;
        if pos.segment != segment_before {
            // The state before this chunk is the state at the start of its segment.
            let at = Position {
                segment: pos.segment,
                offset: 0,
            };
            self.pending_snapshot = Some((at, self.snapshot_bytes()));
        }
        let chunk = record::decode(&self.buf).map_err(|e| e.to_string())?;
        // The decoder counted events per hour while validating them; use that unless it
        // is missing (then parse the entries again, as recovery does).
        let known: u64 = batch.hours.iter().map(|&(_, n)| n as u64).sum();
        if known == batch.count as u64 {
            if let (Some(key), Some(last)) = (chunk.dedup_key(), chunk.last_seq()) {
                self.dedup.accept(&key, last);
            }
            let mut skip = skip as u64;
            for &(hour, n) in &batch.hours {
                let n = n as u64;
                let taken = n.min(skip);
                skip -= taken;
                self.dedup.count_received(chunk.tag, hour, n - taken);
            }
        } else {
            self.dedup.replay(&chunk);
        }
        self.metrics.chunks_received.inc();
        self.metrics.events_received.inc_by(chunk.count as u64);
        self.metrics
            .bytes_received
            .inc_by(chunk.entries.len() as u64);
        Ok(Accepted {
            end: self.spool.tail(),
            accepted: batch.count - skip,
            duplicates: skip,
        })
    }

    fn commit(&mut self, group: &mut Vec<(WriteRequest, Result<Accepted, String>)>) {
        let committed = self.spool.commit();
        self.metrics.spool_commits.inc();
        match committed {
            Ok(synced) => {
                if synced {
                    if let Some((at, bytes)) = self.pending_snapshot.take() {
                        match self.spool.write_snapshot(SNAPSHOT, at, &bytes) {
                            Ok(()) => self.snapshot_at = at,
                            Err(e) => {
                                tracing::warn!(error = %e, "writing the relay state snapshot failed; will retry at the next roll")
                            }
                        }
                    }
                }
                self.committed.send_replace(self.spool.tail());
                if group.iter().any(|(_, result)| result.is_ok()) {
                    self.failing = false;
                }
                for (req, result) in group.drain(..) {
                    let _ = req.reply.send(result);
                }
            }
            Err(e) => {
                self.metrics.spool_errors.inc();
                self.failing = true;
                self.ready.set_refusing(true);
                tracing::warn!(error = %e, "spool commit failed; chunks of this group are not acknowledged");
                for (req, _) in group.drain(..) {
                    let _ = req.reply.send(Err(format!("spool commit failed: {e}")));
                }
            }
        }
    }

    fn housekeeping(&mut self) {
        for (sink, cursor) in &mut self.sink_cursors {
            if cursor.has_changed().unwrap_or(false) {
                let pos = *cursor.borrow_and_update();
                if let Err(e) = self.spool.set_cursor(sink, pos) {
                    tracing::warn!(sink = %sink, error = %e, "persisting the sink cursor failed");
                }
            }
        }
        self.unpin_snapshot();
        match self.spool.gc() {
            Ok(0) => {}
            Ok(freed) => tracing::debug!(freed, "spool segments collected"),
            Err(e) => tracing::warn!(error = %e, "spool garbage collection failed"),
        }
        self.metrics.spool_bytes.set(self.spool.used_bytes() as i64);
        self.export();
    }

    /// A snapshot older than every sink's cursor keeps segments nobody needs. Normally
    /// the snapshot taken at the next roll replaces it, but that one is written only with
    /// a successful commit: on a full disk no append succeeds, nothing is collected, and
    /// the relay would stay stuck even after the sinks drained. So move it up to the tail
    /// here, after an fsync, so that it never covers data that is not on disk.
    fn unpin_snapshot(&mut self) {
        let Some(oldest) = self.spool.cursors().values().min().copied() else {
            return;
        };
        if self.snapshot_at.segment >= oldest.segment.min(self.spool.active_segment()) {
            return;
        }
        if let Err(e) = self.spool.sync() {
            tracing::warn!(error = %e, "spool sync before moving the snapshot failed");
            return;
        }
        let tail = self.spool.tail();
        let bytes = self.snapshot_bytes();
        match self.spool.write_snapshot(SNAPSHOT, tail, &bytes) {
            Ok(()) => {
                self.snapshot_at = tail;
                self.pending_snapshot = None;
                self.committed.send_replace(tail);
            }
            Err(e) => {
                tracing::warn!(error = %e, "moving the relay state snapshot forward failed; will retry")
            }
        }
    }

    fn export(&self) {
        let mut ledger = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
        ledger.received = self.dedup.received().clone();
        ledger.duplicates = self.dedup.duplicates();
    }
}

/// Byte offset of entry `index` in the batch's entries.
fn entry_offset(batch: &EventBatch, index: usize) -> Result<usize, String> {
    if index == 0 {
        return Ok(0);
    }
    if index >= batch.count {
        return Ok(batch.entries.len());
    }
    let base = batch.entries.as_ptr() as usize;
    let mut end = 0;
    for (i, entry) in batch.iter().enumerate() {
        let entry = entry.map_err(|e| format!("entry {i}: {e}"))?;
        end = entry.record.as_ptr() as usize - base + entry.record.len();
        if i + 1 == index {
            break;
        }
    }
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_forward::{write_entry, Options, Provenance};
    use sluice_spool::{FsyncPolicy, SpoolConfig};

    fn batch(source: &str, seqs: std::ops::Range<u64>) -> EventBatch {
        let mut entries = Vec::new();
        let seqs: Vec<u64> = seqs.collect();
        for s in &seqs {
            write_entry(
                &mut entries,
                EventTime {
                    secs: 1_700_000_000,
                    nanos: 0,
                },
                &[("n", s.to_string().as_bytes())],
            );
        }
        EventBatch {
            tag: "t".into(),
            count: seqs.len(),
            entries,
            options: Options {
                provenance: Some(Provenance {
                    source: source.into(),
                    seqs,
                }),
                ..Options::default()
            },
            hours: Vec::new(),
        }
    }

    /// A writer on a fresh spool in a temp dir (kept alive by the returned guard).
    fn test_writer(
        segment_bytes: u64,
        max_bytes: u64,
    ) -> (SpoolWriter, Arc<RelayMetrics>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SpoolConfig {
            segment_bytes,
            max_bytes,
            fsync: FsyncPolicy::Never,
        };
        let (spool, _) = sluice_spool::Spool::open(dir.path(), cfg).unwrap();
        let metrics = Arc::new(RelayMetrics::new());
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let (w, _) = SpoolWriter::recover(spool, ledger, metrics.clone()).unwrap();
        (w, metrics, dir)
    }

    /// A chunk that failed to spool must not be overtaken by the next chunk of its
    /// source: that would raise the dedup mark past it and trim its resend as a duplicate.
    #[test]
    fn a_failed_chunk_is_not_overtaken_by_the_next_one_of_its_source() {
        let (mut w, _, _dir) = test_writer(1 << 20, 1 << 30);

        w.fail_next_append = true;
        assert!(
            w.append(&batch("s", 0..10), None, 1).is_err(),
            "injected failure"
        );
        let refused = w.append(&batch("s", 10..20), None, 1).unwrap_err();
        assert!(refused.contains("earlier chunk of source s"), "{refused}");
        assert_eq!(
            w.append(&batch("other", 0..5), None, 1).unwrap().accepted,
            5,
            "other sources go on"
        );
        // The resend, in order: all of it is new.
        assert_eq!(w.append(&batch("s", 0..10), None, 1).unwrap().accepted, 10);
        assert_eq!(w.append(&batch("s", 10..20), None, 1).unwrap().accepted, 10);
        // A real resend is still trimmed.
        let again = w.append(&batch("s", 0..20), None, 1).unwrap();
        assert_eq!((again.accepted, again.duplicates), (0, 20));
        assert_eq!(
            w.dedup.received().total(),
            25,
            "ledger counts from the hours fallback path"
        );
    }

    /// A client that sends a source id not its own (bind_sources off) cannot touch that
    /// source's mark: its claim is kept under its own namespace, after recovery too.
    #[test]
    fn a_claimed_source_is_kept_apart_from_its_owner() {
        let (mut w, _, dir) = test_writer(1 << 20, 1 << 30);
        let forged = w
            .append(
                &batch("agent-a:f", u64::MAX - 1..u64::MAX),
                Some("mallory"),
                1,
            )
            .unwrap();
        assert_eq!(forged.accepted, 1, "spooled, under mallory's namespace");
        let own = w
            .append(&batch("agent-a:f", 0..10), Some("agent-a"), 2)
            .unwrap();
        assert_eq!(
            own.accepted, 10,
            "agent-a's events are not trimmed by the claim"
        );
        let anonymous = w.append(&batch("agent-a:f", 0..10), None, 3).unwrap();
        assert_eq!(
            anonymous.duplicates, 10,
            "one key for the owner and the anonymous"
        );
        w.spool_mut().sync().unwrap();
        drop(w);
        let cfg = SpoolConfig {
            segment_bytes: 1 << 20,
            max_bytes: 1 << 30,
            fsync: FsyncPolicy::Never,
        };
        let (spool, _) = sluice_spool::Spool::open(dir.path(), cfg).unwrap();
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let (mut w, _) =
            SpoolWriter::recover(spool, ledger, Arc::new(RelayMetrics::new())).unwrap();
        let resent = w
            .append(&batch("agent-a:f", 0..12), Some("agent-a"), 4)
            .unwrap();
        assert_eq!((resent.duplicates, resent.accepted), (10, 2));
        let claim_again = w
            .append(
                &batch("agent-a:f", u64::MAX - 1..u64::MAX),
                Some("mallory"),
                5,
            )
            .unwrap();
        assert_eq!(claim_again.duplicates, 1, "mallory's own mark survived too");
    }

    /// Requests queued behind the chunk that fills the spool are not taken in the same
    /// group: they wait, unanswered, and the spool overshoots by at most that one chunk.
    #[test]
    fn a_full_spool_ends_the_group_at_once() {
        let (w, metrics, _dir) = test_writer(256 << 10, 1 << 20);
        let (tx, rx) = mpsc::channel(64);
        let mut replies = Vec::new();
        let mut record_bytes = 0;
        for i in 0..12u64 {
            let b = batch(&format!("s{i}"), 0..20_000);
            record_bytes = b.entries.len() + 20_000 * 8;
            let (reply, answer) = oneshot::channel();
            tx.try_send(WriterMsg::Write(WriteRequest {
                batch: b,
                connection: 1,
                client: None,
                reply,
            }))
            .unwrap();
            replies.push(answer);
        }
        // Every request is queued before the writer starts: one group could take all.
        std::thread::spawn(move || w.run(rx));
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while metrics.spool_full.get() != 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "the spool never filled"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let answered = replies
            .iter_mut()
            .map(|r| r.try_recv())
            .filter(|r| matches!(r, Ok(Ok(_))))
            .count();
        let needed = (1usize << 20).div_ceil(record_bytes);
        assert!(
            answered <= needed,
            "{answered} chunks taken, but the spool was full after {needed}"
        );
        assert!(answered >= 1);
        let used = metrics.spool_bytes.get() as usize;
        assert!(
            used <= (1 << 20) + record_bytes + 4096,
            "spool at {used} bytes, over its limit by more than one chunk ({record_bytes})"
        );
        drop(tx); // the writer stays parked on the full spool; the test process ends it
    }

    /// `/ready` answers 503 while appends fail (a full disk) and 200 again once a chunk
    /// is durable.
    #[test]
    fn readiness_follows_failing_appends() {
        let (mut w, _, _dir) = test_writer(1 << 20, 1 << 30);
        let ready = Arc::new(Readiness::default());
        ready.set(true);
        w.report_readiness(ready.clone());
        let offer = |w: &mut SpoolWriter, b: EventBatch| {
            let result = w.append(&b, None, 1);
            let (reply, _answer) = oneshot::channel();
            let mut group = vec![(
                WriteRequest {
                    batch: b,
                    connection: 1,
                    client: None,
                    reply,
                },
                result,
            )];
            w.commit(&mut group);
        };
        w.fail_next_append = true;
        offer(&mut w, batch("s", 0..10));
        assert!(w.failing);
        // What run() does after every group.
        w.ready.set_refusing(w.failing);
        assert!(!ready.get(), "ready while appends fail");
        offer(&mut w, batch("s", 0..10));
        w.ready.set_refusing(w.failing);
        assert!(ready.get(), "not ready after a chunk was durable again");
    }
}
