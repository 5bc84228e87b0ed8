//! The spool writer: the one thread that owns the [`Spool`].
//!
//! Connections hand it [`WriteRequest`]s through a bounded channel. It takes as many as
//! are waiting (group commit), trims what dedup has already seen, appends the rest,
//! commits once (one fsync for the whole group) and only then answers every request.
//! So an acknowledgement never precedes durability, and a busy relay pays one fsync per
//! group rather than per chunk.
//!
//! Dedup ([`crate::dedup`]) decides what of a chunk is new. What changed in its table
//! (and the received counts) since the last time is persisted after each segment roll
//! ([`crate::state_store`]: one record of the changes, now and then a compaction),
//! *after* a commit that made the spool durable up to the position the record names,
//! and the state is rebuilt at start by replaying the spool from that position. Were
//! the record written before that commit, a crash could leave it ahead of the data,
//! and a resend of the lost tail would be trimmed as a duplicate: lost.
//!
//! Housekeeping prunes what would otherwise grow for good: sources idle for
//! `spool.dedup_retention` whose data every sink has, counts of hours older than
//! `relay.ledger_retention`; and `server.max_tags_per_client` refuses a client's chunk
//! with one tag too many ([`crate::tag_limit`]).
//!
//! Backpressure: once the spool is at its size limit the writer stops taking requests —
//! at once, also in the middle of gathering a group — so the spool exceeds its limit by
//! at most the one chunk that crossed it; the channel fills, connections stop reading
//! their sockets, agents stop sending.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_core::metrics::Readiness;
use sluice_forward::{EventBatch, EventTime};
use sluice_spool::{Position, Spool, SpoolError};
use tokio::sync::{mpsc, oneshot, watch};

use crate::dedup::{Dedup, Seen};
use crate::ledger::{Ledger, SeqCells};
use crate::metrics::RelayMetrics;
use crate::record;
use crate::state_store::{Manifest, StateStore};
use crate::tag_limit::TagsPerClient;

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

/// Hours of received seqs the writer keeps, back from the clock's hour (the counts are
/// kept for `ledger_retention`): the ledger published to object storage keeps each
/// hour's for good ...
pub const SEQ_HOURS: u64 = 48;
/// ... and ahead of it: an event dated further ahead (a parsed time gone wrong) is
/// spooled and counted, its seq not kept.
pub const SEQ_FUTURE_HOURS: u64 = 2;

/// The file, in the relay state's directory, that holds `received_seqs`.
const SEQS_FILE: &str = "received-seqs.json";

/// Adds the seqs of `chunk`'s events to `cells`, per event-time hour, for hours within
/// [`SEQ_HOURS`] before and [`SEQ_FUTURE_HOURS`] after `now_hour`. Only for sources
/// numbered 0, 1, 2, ... (a sluice agent that sends byte offsets beside its seqs): an
/// older agent's seqs are byte offsets, one range per event.
fn note_seqs(cells: &mut SeqCells, chunk: &record::SpooledChunk<'_>, now_hour: u64) -> bool {
    let Some(source) = chunk.source else {
        return false;
    };
    if chunk.count == 0 || chunk.seq(0).is_none() || chunk.offset(0).is_none() {
        return false;
    }
    let hours = now_hour.saturating_sub(SEQ_HOURS)..=now_hour + SEQ_FUTURE_HOURS;
    let mut i = 0;
    chunk.count_hours(|hour, n| {
        if !hours.contains(&hour) {
            i += n as usize;
            return;
        }
        let cell = cells.cell(chunk.tag, hour, source);
        for _ in 0..n {
            if let Some(seq) = chunk.seq(i) {
                cell.insert(seq);
            }
            i += 1;
        }
    });
    true
}
const MAX_GROUP: usize = 1024;
/// How often housekeeping looks for sources and hours past their retention (a scan of
/// the whole table: about 10 ms per million sources).
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// How long the writer keeps what it learns, and how much a client may add.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// `spool.dedup_retention`.
    pub dedup: Duration,
    /// `relay.ledger_retention`.
    pub ledger: Duration,
    /// `server.max_tags_per_client`.
    pub max_tags_per_client: usize,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            dedup: Duration::from_secs(7 * 86_400),
            ledger: Duration::from_secs(31 * 86_400),
            max_tags_per_client: 1000,
        }
    }
}

pub struct SpoolWriter {
    spool: Spool,
    dedup: Dedup,
    /// A segment rolled since the state was last persisted.
    persist_due: bool,
    /// The relay state's files; None until one could be created.
    store: Option<StateStore>,
    /// The generation a new store gets when there is none.
    next_generation: u64,
    /// Where the snapshot on disk is: it keeps the segments after it from collection.
    snapshot_at: Position,
    retention: Retention,
    /// Distinct tags per client: the name it authenticated as, or, for an anonymous
    /// client, its connection (forgotten when it closes).
    tags: TagsPerClient<TagClient>,
    /// None until the first housekeeping, which prunes at once.
    last_prune: Option<Instant>,
    state_buf: Vec<u8>,
    /// Per (tag, hour, source), the seqs received: the ledger's `received_seqs`, for the
    /// last [`SEQ_HOURS`] hours. Saved beside each state record (before it), and rebuilt
    /// at start from that file and the spool after the state: ranges are a set, so what
    /// both hold counts once.
    received_seqs: SeqCells,
    /// `received_seqs` changed since the ledger, or the file, last took it.
    seqs_exported: bool,
    seqs_saved: bool,
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
    /// Tests: make the next spool commit fail, as a failed fdatasync does.
    #[cfg(test)]
    fail_next_commit: bool,
    buf: Vec<u8>,
}

impl SpoolWriter {
    /// Rebuilds the dedup table and received counts from the snapshot and the spool.
    pub fn recover(
        spool: Spool,
        ledger: Arc<Mutex<Ledger>>,
        metrics: Arc<RelayMetrics>,
    ) -> Result<(SpoolWriter, watch::Receiver<Position>), SpoolError> {
        let state_dir = StateStore::dir_in(spool.dir());
        let mut store = None;
        let mut next_generation = 1;
        let (mut dedup, from) = match spool.read_snapshot(SNAPSHOT)? {
            Some((at, bytes)) => match Manifest::decode(&bytes) {
                Some(Manifest::V2 { generation }) => {
                    next_generation = generation + 1;
                    match load_state(&state_dir, generation) {
                        Ok((d, last, s)) => {
                            store = s;
                            (d, last)
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "relay state unreadable; rebuilding from the whole spool");
                            (Dedup::default(), spool.head())
                        }
                    }
                }
                // The upgrade path: a version 1 snapshot holds the whole state.
                None => match Dedup::from_v1_snapshot(&bytes, unix_now(), at) {
                    Ok(d) => {
                        tracing::info!(sources = d.sources(), "relay state snapshot of version 1 read; it is rewritten in the current format");
                        (d, at)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "relay state snapshot unreadable; rebuilding from the whole spool");
                        (Dedup::default(), spool.head())
                    }
                },
            },
            None => (Dedup::default(), spool.head()),
        };
        let from = from.max(spool.head());
        let seqs_path = state_dir.join(SEQS_FILE);
        let mut received_seqs = match std::fs::read(&seqs_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(file = %seqs_path.display(), error = %e, "received seqs unreadable; the ledger's received ranges start again from the spool");
                SeqCells::default()
            }),
            Err(_) => SeqCells::default(),
        };
        let mut reader = spool.reader(from)?;
        let mut buf = Vec::new();
        let mut replayed = 0u64;
        loop {
            let end = match reader.next(&mut buf) {
                Ok(Some((_, end))) => end,
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
            };
            match record::decode(&buf) {
                Ok(chunk) => {
                    dedup.replay(&chunk, end);
                    note_seqs(&mut received_seqs, &chunk, unix_now() / 3600);
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
            persist_due: false,
            store,
            next_generation,
            snapshot_at: tail,
            retention: Retention::default(),
            tags: TagsPerClient::new(Retention::default().max_tags_per_client),
            last_prune: None,
            state_buf: Vec::new(),
            received_seqs,
            seqs_exported: true,
            seqs_saved: true,
            ledger,
            metrics,
            committed,
            sink_cursors: Vec::new(),
            ready: Arc::new(Readiness::default()),
            failing: false,
            stopping: Arc::new(AtomicBool::new(false)),
            #[cfg(test)]
            fail_next_append: false,
            #[cfg(test)]
            fail_next_commit: false,
            buf: Vec::with_capacity(1 << 20),
        };
        // The state at the tail right away (what the replay changed, or a first base):
        // it bounds garbage collection from now on and makes the next recovery short.
        if let Err(e) = writer.persist_state(tail) {
            tracing::warn!(error = %e, "cannot persist the relay state; will retry at the next segment roll");
        }
        writer.export();
        Ok((writer, rx))
    }

    /// Sets the retentions and the tag limit (from the config).
    pub fn set_retention(&mut self, retention: Retention) {
        self.retention = retention;
        self.tags.set_max(retention.max_tags_per_client);
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

    /// Persists what changed in the relay state, as of spool position `at`, which must
    /// be durable (see the crate docs on ordering): one change record, or a compaction
    /// when the log has grown past twice the base; then the manifest, which moves the
    /// spool's garbage-collection bound to `at`.
    fn persist_state(&mut self, at: Position) -> Result<(), String> {
        let mut rec = std::mem::take(&mut self.state_buf);
        rec.clear();
        let result = self.write_state(at, &mut rec);
        self.state_buf = rec;
        result
    }

    fn write_state(&mut self, at: Position, rec: &mut Vec<u8>) -> Result<(), String> {
        let dir = StateStore::dir_in(self.spool.dir());
        if self.seqs_saved {
            // Before the record: the file then holds at least what the spool before `at`
            // holds, and recovery adds what came after.
            let path = dir.join(SEQS_FILE);
            let bytes = serde_json::to_vec(&self.received_seqs).map_err(|e| e.to_string())?;
            std::fs::create_dir_all(&dir)
                .and_then(|()| sluice_core::durable::write_atomic(&path, &bytes))
                .map_err(|e| format!("writing {}: {e}", path.display()))?;
            self.seqs_saved = false;
        }
        let compact = self.store.as_ref().is_none_or(StateStore::should_compact);
        let (generation, fresh) = if compact {
            let generation = self
                .store
                .as_ref()
                .map_or(self.next_generation, |s| s.generation() + 1);
            self.dedup.encode_full(at, rec);
            let fresh = StateStore::create(&dir, generation, rec)
                .map_err(|e| format!("compacting the relay state into {}: {e}", dir.display()))?;
            (generation, Some(fresh))
        } else {
            let store = self.store.as_mut().expect("a store unless compacting");
            self.dedup.encode_changes(at, rec);
            store
                .append(rec)
                .map_err(|e| format!("appending to the relay state in {}: {e}", dir.display()))?;
            (store.generation(), None)
        };
        // The record is durable: recovery reads it whether or not the manifest below is
        // written, so these changes need not be written again.
        self.dedup.changes_persisted();
        self.metrics.state_bytes_written.inc_by(rec.len() as u64);
        let manifest = Manifest::V2 { generation }.encode();
        self.spool
            .write_snapshot(SNAPSHOT, at, &manifest)
            .map_err(|e| e.to_string())?;
        self.metrics
            .state_bytes_written
            .inc_by(manifest.len() as u64);
        if let Some(fresh) = fresh {
            fresh.remove_others();
            self.store = Some(fresh);
        }
        self.snapshot_at = at;
        self.persist_due = false;
        Ok(())
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
                    WriterMsg::Closed(connection) => {
                        self.dedup.connection_closed(connection);
                        self.tags.forget_client(&TagClient::Connection(connection));
                    }
                    WriterMsg::Shutdown => {
                        shutdown = true;
                        break;
                    }
                    WriterMsg::Write(req) => {
                        let result = self.append(&req.batch, req.client.as_ref(), req.connection);
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
        // Persist what changed since the last roll, so the next start replays nothing.
        match self.spool.sync() {
            Ok(_) => {
                let tail = self.spool.tail();
                if let Err(e) = self.persist_state(tail) {
                    tracing::warn!(error = %e, "persisting the relay state at shutdown failed; the next start replays the spool from the last record");
                }
            }
            Err(e) => tracing::warn!(error = %e, "spool sync at shutdown failed"),
        }
        if let Err(e) = self.spool.close() {
            tracing::warn!(error = %e, "closing the spool failed (the next start recovers it)");
        }
        tracing::info!("spool writer stopped");
    }

    fn append(
        &mut self,
        batch: &EventBatch,
        client: Option<&std::sync::Arc<str>>,
        connection: u64,
    ) -> Result<Accepted, String> {
        let now = unix_now();
        let provenance = batch.options.provenance.as_ref();
        let namespace = provenance.and_then(|p| record::namespace(client.map(|c| &**c), &p.source));
        let key = provenance.map(|p| record::dedup_key(namespace, &p.source));
        let range = provenance.and_then(|p| {
            let marks = p.dedup_marks();
            Some((*marks.first()?, *marks.last()?))
        });
        if let (Some(key), Some((first, last))) = (&key, range) {
            if let Err(e) = self.dedup.admit(key, first, last) {
                let source = provenance.map_or("", |p| p.source.as_str());
                return Err(format!("an earlier chunk of source {source} (from seq {}) could not be spooled; later chunks are refused until it is resent, to keep the order", e.failed));
            }
        }
        let result = self
            .check_tag(batch, client, connection, now)
            .and_then(|()| self.append_in_order(batch, namespace, key.as_deref(), now));
        if let (Err(_), Some(key), Some((first, _))) = (&result, &key, range) {
            self.dedup.refuse(key, first, connection);
        }
        result
    }

    /// `server.max_tags_per_client`.
    fn check_tag(
        &mut self,
        batch: &EventBatch,
        client: Option<&std::sync::Arc<str>>,
        connection: u64,
        now: u64,
    ) -> Result<(), String> {
        let key = client.map_or(TagClient::Connection(connection), |c| {
            TagClient::Named(c.clone())
        });
        match self.tags.admit(&key, &batch.tag, now) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.metrics.refuse_chunk("max_tags_per_client");
                tracing::warn!(client = %key, tag = %batch.tag, limit = e.max, "chunk refused: the client already sent server.max_tags_per_client distinct tags");
                Err(format!(
                    "tag {:?} refused: this client already sent {} distinct tags (server.max_tags_per_client)",
                    batch.tag, e.max
                ))
            }
        }
    }

    /// `key` is the chunk's source in the dedup table ([`record::dedup_key`]).
    fn append_in_order(
        &mut self,
        batch: &EventBatch,
        namespace: Option<&str>,
        key: Option<&str>,
        now: u64,
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
                    .duplicate_prefix(key.unwrap_or(&p.source), p.dedup_marks());
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
            // A source that resends is alive: keep it from being pruned.
            if let Some(p) = &batch.options.provenance {
                if let Some(&last) = p.dedup_marks().last() {
                    let end = self.spool.tail();
                    self.dedup.accept(&p.source, last, Seen { secs: now, end });
                }
            }
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
            self.persist_due = true;
        }
        let chunk = record::decode(&self.buf).map_err(|e| e.to_string())?;
        let seen = Seen {
            secs: now,
            end: self.spool.tail(),
        };
        if let (Some(key), Some(last)) = (chunk.dedup_key(), chunk.last_mark()) {
            self.dedup.accept(&key, last, seen);
        }
        // The record keeps the hour runs the decoder counted (less what dedup trimmed),
        // or, when they were not counted, the entries are parsed for them.
        chunk.count_hours(|hour, n| self.dedup.count_received(chunk.tag, hour, n));
        if note_seqs(&mut self.received_seqs, &chunk, now / 3600) {
            self.seqs_exported = true;
            self.seqs_saved = true;
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
        #[cfg(test)]
        let committed = if std::mem::take(&mut self.fail_next_commit) {
            Err(SpoolError::Io {
                op: "fdatasync segment",
                path: self.spool.dir().to_owned(),
                source: std::io::Error::other("injected fsync failure"),
            })
        } else {
            self.spool.commit()
        };
        #[cfg(not(test))]
        let committed = self.spool.commit();
        self.metrics.spool_commits.inc();
        match committed {
            Ok(synced) => {
                if synced && self.persist_due {
                    // Everything appended is durable now: the state as it stands is the
                    // state at the tail.
                    let tail = self.spool.tail();
                    if let Err(e) = self.persist_state(tail) {
                        tracing::warn!(error = %e, "persisting the relay state failed; will retry at the next commit");
                    }
                }
                self.committed.send_replace(self.spool.tail());
                if group.iter().any(|(_, result)| result.is_ok()) {
                    self.failing = false;
                }
                for (req, result) in group.drain(..) {
                    let _ = req.reply.send(result);
                    // Spooled (or refused): the inflated entries' buffer serves the next
                    // frame.
                    sluice_forward::recycle(req.batch.entries);
                }
            }
            Err(e) => {
                self.metrics.spool_errors.inc();
                self.failing = true;
                self.ready.set_refusing(true);
                tracing::warn!(error = %e, "spool commit failed; chunks of this group are not acknowledged");
                for (req, _) in group.drain(..) {
                    let _ = req.reply.send(Err(format!("spool commit failed: {e}")));
                    sluice_forward::recycle(req.batch.entries);
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
        if self.last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
            self.last_prune = Some(Instant::now());
            self.prune(unix_now());
        }
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
        match self.persist_state(tail) {
            Ok(()) => {
                self.committed.send_replace(tail);
            }
            Err(e) => {
                tracing::warn!(error = %e, "moving the relay state snapshot forward failed; will retry")
            }
        }
    }

    /// Forgets sources silent for `dedup_retention` whose data every sink has (by the
    /// persisted cursors), counts of hours that ended `ledger_retention` ago, and tags
    /// no client sent for that long. The removals are persisted with the next record.
    fn prune(&mut self, now: u64) {
        let delivered = self
            .spool
            .cursors()
            .values()
            .min()
            .copied()
            .unwrap_or_else(|| self.spool.tail());
        let sources = self
            .dedup
            .prune(now, self.retention.dedup.as_secs(), delivered);
        let ledger_secs = self.retention.ledger.as_secs();
        let before_hour = now.saturating_sub(ledger_secs) / 3600;
        let hours = self.dedup.prune_received_before(before_hour);
        let seq_hours_before = (now / 3600).saturating_sub(SEQ_HOURS).max(before_hour);
        if self.received_seqs.prune_before(seq_hours_before) > 0 {
            self.seqs_exported = true;
            self.seqs_saved = true;
        }
        self.tags.forget_idle(now, ledger_secs);
        if sources > 0 || hours > 0 {
            tracing::info!(
                sources,
                hours,
                left = self.dedup.sources(),
                "forgot sources and ledger hours past their retention"
            );
        }
        self.metrics.dedup_sources_pruned.inc_by(sources as u64);
        self.metrics.ledger_hours_pruned.inc_by(hours as u64);
        let mut ledger = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
        ledger.forget_before(before_hour);
    }

    #[cfg(test)]
    fn unpin_or_persist_for_test(&mut self) {
        self.spool.sync().unwrap();
        let tail = self.spool.tail();
        self.persist_state(tail).unwrap();
    }

    fn export(&mut self) {
        self.metrics.dedup_sources.set(self.dedup.sources() as i64);
        let mut ledger = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
        let before = ledger.duplicates;
        let mut received = std::mem::take(&mut ledger.received);
        let changed = self.dedup.export_received(&mut received);
        ledger.received = received;
        ledger.duplicates = self.dedup.duplicates();
        let seqs = std::mem::take(&mut self.seqs_exported);
        if seqs {
            ledger.received_seqs.clone_from(&self.received_seqs);
        }
        if changed || seqs || before != ledger.duplicates {
            ledger.revision += 1;
        }
    }
}

/// The relay's clock, in unix seconds (what retention is measured in).
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Reads generation `generation` of the relay state: its records applied in order.
/// Returns the state, the spool position the last record was taken at, and the store to
/// append to.
fn load_state(
    dir: &std::path::Path,
    generation: u64,
) -> Result<(Dedup, Position, Option<StateStore>), String> {
    let loaded = StateStore::open(dir, generation)?;
    if loaded.torn {
        tracing::warn!(generation, "the relay state log ended in a torn record (a crash while appending); it was cut off, and the spool is replayed from the record before it");
    }
    let mut records = loaded.records.iter();
    let mut dedup = Dedup::default();
    let base = records.next().ok_or("the relay state has no base")?;
    let mut at = dedup.apply(base).map_err(|e| e.to_string())?;
    for rec in records {
        match dedup.apply(rec) {
            Ok(next) => at = next,
            Err(e) => {
                // A checksummed record that does not decode: stop here; the replay from
                // `at` on rebuilds the rest (marks only ever rise, so nothing is lost).
                // Appending after it would hide the new records behind it: no store, so
                // the next persist compacts into a new generation.
                tracing::warn!(error = %e, "a relay state record is unreadable; replaying the spool from the one before");
                return Ok((dedup, at, None));
            }
        }
    }
    Ok((dedup, at, Some(loaded.store)))
}

/// Who the tag limit counts for: the name a client authenticated as, or, for an
/// anonymous one, its connection. Cheap to make per chunk (no allocation).
#[derive(Clone, PartialEq, Eq, Hash)]
enum TagClient {
    Named(std::sync::Arc<str>),
    Connection(u64),
}

impl std::fmt::Display for TagClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TagClient::Named(name) => f.write_str(name),
            TagClient::Connection(id) => write!(f, "connection {id}"),
        }
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
                    offsets: Vec::new(),
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

    /// The writer's appends of one group and its commit (what `run` does).
    fn offer_group(
        w: &mut SpoolWriter,
        batches: Vec<EventBatch>,
        connection: u64,
    ) -> Vec<Result<Accepted, String>> {
        let mut group = Vec::new();
        let mut answers = Vec::new();
        for b in batches {
            let result = w.append(&b, None, connection);
            let (reply, answer) = oneshot::channel();
            group.push((
                WriteRequest {
                    batch: b,
                    connection,
                    client: None,
                    reply,
                },
                result,
            ));
            answers.push(answer);
        }
        w.commit(&mut group);
        answers
            .into_iter()
            .map(|mut a| a.try_recv().unwrap())
            .collect()
    }

    fn reopen(dir: &std::path::Path, segment_bytes: u64) -> SpoolWriter {
        let cfg = SpoolConfig {
            segment_bytes,
            max_bytes: 1 << 30,
            fsync: FsyncPolicy::Always,
        };
        let (spool, _) = sluice_spool::Spool::open(dir, cfg).unwrap();
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        SpoolWriter::recover(spool, ledger, Arc::new(RelayMetrics::new()))
            .unwrap()
            .0
    }

    /// With many sources known, a segment roll persists what changed since the last one,
    /// not the whole table; and a restart still knows every source.
    #[test]
    fn a_segment_roll_writes_what_changed_not_the_whole_table() {
        const SOURCES: usize = 20_000;
        let dir = tempfile::tempdir().unwrap();
        let mut w = reopen(dir.path(), 256 << 10);
        for chunk in (0..SOURCES).collect::<Vec<_>>().chunks(1000) {
            let batches = chunk
                .iter()
                .map(|i| batch(&format!("agent-7:/var/log/app-{i}.log"), 0..1))
                .collect();
            offer_group(&mut w, batches, 1);
        }
        // Compact now (as happens once the log outgrows twice the base), so that the roll
        // below is an ordinary one.
        w.store = None;
        w.unpin_or_persist_for_test();
        // A big chunk of one source rolls the segment (maybe twice): what is written now
        // follows that one source, not the 20,000 known.
        let before = w.metrics.state_bytes_written.get();
        let segment = w.spool.active_segment();
        let mut next = 1;
        while w.spool.active_segment() == segment {
            offer_group(
                &mut w,
                vec![batch("agent-7:/var/log/app-1.log", next..next + 2000)],
                1,
            );
            next += 2000;
        }
        let written = w.metrics.state_bytes_written.get() - before;
        assert!(written > 0, "the roll persisted nothing");
        assert!(
            written < 2_000,
            "one changed source cost {written} bytes at a roll"
        );
        drop(w);
        let mut w = reopen(dir.path(), 256 << 10);
        assert_eq!(w.dedup.sources(), SOURCES);
        let again = w
            .append(&batch("agent-7:/var/log/app-9.log", 0..1), None, 1)
            .unwrap();
        assert_eq!(again.duplicates, 1, "a resend after the restart is trimmed");
    }

    /// A source idle past `dedup_retention` whose data the sinks have is forgotten, and
    /// stays forgotten across a restart; one a sink still needs is kept.
    #[test]
    fn an_idle_delivered_source_is_pruned_and_stays_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = reopen(dir.path(), 1 << 20);
        offer_group(&mut w, vec![batch("old", 0..5)], 1);
        let delivered = w.spool.tail();
        w.spool.set_cursor("sink", delivered).unwrap();
        offer_group(&mut w, vec![batch("undelivered", 0..5)], 1);
        let week = 7 * 86_400;
        w.prune(unix_now() + week + 10);
        assert_eq!(w.dedup.sources(), 1);
        assert!(w.dedup.mark("old").is_none());
        assert_eq!(w.metrics.dedup_sources_pruned.get(), 1);
        w.unpin_or_persist_for_test();
        drop(w);
        let w = reopen(dir.path(), 1 << 20);
        assert_eq!(
            w.dedup.sources(),
            1,
            "the pruned source came back after a restart"
        );
    }

    /// `server.max_tags_per_client`: the chunk with one tag too many is refused, counted
    /// and logged; the client's known tags and other clients go on.
    #[test]
    fn a_client_past_max_tags_is_refused_and_others_are_not() {
        let (mut w, metrics, _dir) = test_writer(1 << 20, 1 << 30);
        w.set_retention(Retention {
            max_tags_per_client: 3,
            ..Retention::default()
        });
        let tagged = |tag: &str, source: &str| {
            let mut b = batch(source, 0..2);
            b.tag = tag.into();
            b
        };
        for t in ["a", "b", "c"] {
            assert!(w.append(&tagged(t, t), None, 1).is_ok());
        }
        let refused = w.append(&tagged("d", "d"), None, 1).unwrap_err();
        assert!(
            refused.contains("\"d\"") && refused.contains("max_tags_per_client"),
            "{refused}"
        );
        let label = crate::metrics::Reason {
            reason: "max_tags_per_client".into(),
        };
        assert_eq!(metrics.chunks_refused.get_or_create(&label).get(), 1);
        assert!(
            w.append(&tagged("a", "a2"), None, 1).is_ok(),
            "a known tag goes on"
        );
        assert!(
            w.append(&tagged("d", "d"), None, 2).is_ok(),
            "another client is not affected"
        );
        assert_eq!(w.dedup.received().0.len(), 4);
        // An authenticated client is one client over all its connections.
        for (t, conn) in [("p", 5), ("q", 6), ("r", 7)] {
            assert!(w
                .append(&tagged(t, t), Some(&"host-x".into()), conn)
                .is_ok());
        }
        assert!(w
            .append(&tagged("s", "s"), Some(&"host-x".into()), 8)
            .is_err());
    }

    /// Received counts per hour are what was spooled: from the decoder's hour runs less
    /// the entries dedup trimmed, and the same again when recovery reads the records.
    #[test]
    fn received_counts_per_hour_leave_out_what_dedup_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let hour = 1_700_000_000 / 3600;
        // Seqs 0..6, the first three in one hour and the rest in the next, with the
        // hour runs the codec counts.
        let counted = |seqs: std::ops::Range<u64>| {
            let mut b = batch("h:app", seqs.clone());
            b.entries.clear();
            for s in seqs {
                let time = EventTime {
                    secs: (hour * 3600 + 3597 + s) as u32,
                    nanos: 0,
                };
                write_entry(&mut b.entries, time, &[("n", s.to_string().as_bytes())]);
                sluice_forward::push_hour(&mut b.hours, time);
            }
            b
        };
        {
            let mut w = reopen(dir.path(), 1 << 20);
            assert!(w.append(&counted(0..4), None, 1).is_ok());
            // 2 and 3 again: trimmed; 4 and 5 are new, in the second hour.
            assert!(w.append(&counted(2..6), None, 1).is_ok());
            let r = w.dedup.received();
            assert_eq!((r.get("t", hour), r.get("t", hour + 1)), (3, 3));
        }
        // Recovery counts from the records (the runs they keep).
        let w = reopen(dir.path(), 1 << 20);
        let r = w.dedup.received();
        assert_eq!((r.get("t", hour), r.get("t", hour + 1)), (3, 3));
    }

    /// A spool written by a relay with the version 1 snapshot (the whole table as JSON)
    /// is read, and rewritten in the current format.
    #[test]
    fn a_version_1_snapshot_is_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut spool, _) =
                sluice_spool::Spool::open(dir.path(), SpoolConfig::default()).unwrap();
            let v1 = br#"{"version":"1","dedup":{"a":7},"received":{"t":{"2026-11-23T09":3}},"duplicates":2}"#;
            let at = spool.tail();
            spool.write_snapshot(SNAPSHOT, at, v1).unwrap();
        }
        let mut w = reopen(dir.path(), 1 << 20);
        assert_eq!(w.dedup.duplicate_prefix("a", &[6, 7, 8]), 2);
        assert_eq!(w.dedup.received().total(), 3);
        let (_, manifest) = w.spool.read_snapshot(SNAPSHOT).unwrap().unwrap();
        assert!(Manifest::decode(&manifest).is_some());
        assert_eq!(w.append(&batch("a", 0..9), None, 1).unwrap().accepted, 1);
        drop(w);
        let w = reopen(dir.path(), 1 << 20);
        assert_eq!(
            w.dedup.duplicate_prefix("a", &[7, 8, 9]),
            2,
            "the mark survives the second start"
        );
    }

    /// An agent that reads the same bytes again after a crash may cut them into events
    /// differently (a multiline event closed by its timeout before, whole now) and so
    /// number them differently: dedup compares byte offsets when a chunk has them, so the
    /// new event after the resent ones is kept (by seqs it would be trimmed: lost), also
    /// after the relay restarts and rebuilds its marks from the spool.
    #[test]
    fn resent_events_numbered_differently_are_trimmed_by_offset_and_new_ones_kept() {
        let with_offsets = |seqs: std::ops::Range<u64>, offsets: &[u64]| {
            let mut b = batch("f", seqs);
            if let Some(p) = b.options.provenance.as_mut() {
                p.offsets = offsets.to_vec();
            }
            b
        };
        let (mut w, _, dir) = test_writer(1 << 20, 1 << 30);
        // Before the crash: three events at 0, 10 and 20 (the last two halves of one
        // multiline event, split by its timeout), seqs 0..3.
        assert_eq!(
            w.append(&with_offsets(0..3, &[0, 10, 20]), None, 1)
                .unwrap()
                .accepted,
            3
        );
        // After: the halves are one event (seq 1, offset 10), then a new one at 30 (seq 2).
        let again = with_offsets(0..3, &[0, 10, 30]);
        assert_eq!(
            w.append(&again, None, 1).unwrap().accepted,
            1,
            "the event at 30 is new"
        );
        drop(w);
        let mut w = reopen(dir.path(), 1 << 20);
        assert_eq!(
            w.append(&with_offsets(0..4, &[0, 10, 30, 40]), None, 1)
                .unwrap()
                .accepted,
            1,
            "after a restart the mark is the offset 30"
        );
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
                Some(&"mallory".into()),
                1,
            )
            .unwrap();
        assert_eq!(forged.accepted, 1, "spooled, under mallory's namespace");
        let own = w
            .append(&batch("agent-a:f", 0..10), Some(&"agent-a".into()), 2)
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
            .append(&batch("agent-a:f", 0..12), Some(&"agent-a".into()), 4)
            .unwrap();
        assert_eq!((resent.duplicates, resent.accepted), (10, 2));
        let claim_again = w
            .append(
                &batch("agent-a:f", u64::MAX - 1..u64::MAX),
                Some(&"mallory".into()),
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

    /// `/ready` through the real run loop: a group whose commit (fdatasync) fails is not
    /// acknowledged and turns readiness false; the next group that commits turns it true.
    #[test]
    fn readiness_follows_a_failing_commit_in_the_run_loop() {
        let (mut w, metrics, _dir) = test_writer(1 << 20, 1 << 30);
        let ready = Arc::new(Readiness::default());
        ready.set(true);
        w.report_readiness(ready.clone());
        w.fail_next_commit = true;
        let (tx, rx) = mpsc::channel(8);
        let writer = std::thread::spawn(move || w.run(rx));
        let send = |b: EventBatch| {
            let (reply, answer) = oneshot::channel();
            tx.blocking_send(WriterMsg::Write(WriteRequest {
                batch: b,
                connection: 1,
                client: None,
                reply,
            }))
            .unwrap();
            answer.blocking_recv().expect("the writer answers")
        };
        let wait_for = |want: bool, what: &str| {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while ready.get() != want {
                assert!(std::time::Instant::now() < deadline, "{what}");
                std::thread::sleep(Duration::from_millis(5));
            }
        };

        let refused = send(batch("a", 0..10)).unwrap_err();
        assert!(refused.contains("spool commit failed"), "{refused}");
        assert_eq!(metrics.spool_errors.get(), 1);
        wait_for(false, "still ready after a commit failed");

        let accepted = send(batch("b", 0..10)).expect("acknowledged once commits succeed");
        assert_eq!(accepted.accepted, 10);
        wait_for(true, "not ready again after a commit made a chunk durable");

        drop(tx);
        writer.join().unwrap();
    }
}
