//! The sink driver: every sink reads the spool on its own cursor, in its own task.
//!
//! The driver ([`run_sink`]) gathers spooled chunks, hands them to the sink's
//! [`Deliver`] implementation, retries with exponential backoff and jitter until the
//! sink takes them, and only then advances the cursor. A failing sink retries forever
//! without blocking any other sink; its data stays in the spool (and the spool's size
//! limit turns into backpressure towards the agents).
//!
//! The cursor and the sink's ledger counts are saved together after every delivery
//! (one appended record, [`super::state`]), so after a crash they agree; a chunk
//! delivered but not yet recorded is delivered again, and must not duplicate: object keys
//! are deterministic and create-only, so the repeat finds its objects written; the Kafka
//! sink saves its partitions' marks before it produces and, after a crash, reads back
//! what the lost delivery had already written and skips it (see `kafka/writer.rs`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_spool::{Damage, Position, SpoolError, SpoolReader};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::common::SinkCommon;
use super::spec::{Deliver, DeliverError, Gathered};
use super::state::SinkStateFile;
use crate::ledger::{Ledger, SinkCounts};
use crate::metrics::RelayMetrics;

/// Positions a sink publishes: `delivered` (for end-to-end acks) and `persisted` (the
/// cursor on disk, which bounds spool garbage collection).
pub struct SinkProgress {
    pub delivered: watch::Sender<Position>,
    pub persisted: watch::Sender<Position>,
}

pub struct SinkRun {
    pub config: SinkCommon,
    pub deliver: Box<dyn Deliver>,
    pub reader: SpoolReader,
    pub state: SinkStateFile,
    pub committed: watch::Receiver<Position>,
    /// The spool's segment size, to turn two positions into a byte distance.
    pub segment_size: u64,
    /// The most spool a gathering may span (bytes) before it is delivered, whatever the
    /// sink's limits: a gathering holds its spool segments, and a sink that rolls large
    /// objects must not fill the spool by waiting (half the spool's `max_size`).
    pub hold_limit: u64,
    pub progress: SinkProgress,
    pub ledger: Arc<Mutex<Ledger>>,
    pub metrics: Arc<RelayMetrics>,
    /// For a required sink in `end_to_end` mode: the furthest spool position an
    /// acknowledgement waits for (`ServerState::ack_demand`). While it is past the
    /// cursor, what is gathered is delivered as soon as nothing more is readable: acks
    /// wait for this sink, so holding a gathering until `gather_limits` (an object sink's
    /// `max_object_age`) would hold the senders just as long. Under load deliveries
    /// still grow, with whatever arrives while the previous one runs.
    pub ack_demand: Option<watch::Receiver<Position>>,
    /// Stop gathering new data.
    pub stop: CancellationToken,
    /// Give up on the current delivery (shutdown timeout passed).
    pub abort: CancellationToken,
    /// False while the sink fails with an error someone must fix.
    pub ready: Arc<sluice_core::metrics::Readiness>,
}

/// Reads the spool and delivers until `stop`, then flushes what was gathered.
pub async fn run_sink(mut s: SinkRun) {
    drive(&mut s).await;
    s.deliver.finish().await;
}

async fn drive(s: &mut SinkRun) {
    let name = s.config.name.clone();
    let label = s.metrics.sink(&name);
    let (max_bytes, max_wait) = s.deliver.gather_limits();
    let mut gathered = Gathered::new(s.reader.position());
    let mut scratch = Vec::new();
    let mut first_at: Option<Instant> = None;
    {
        let mut ledger = s.ledger.lock().unwrap_or_else(|e| e.into_inner());
        s.state.forget_before(ledger.forgotten_before);
        ledger
            .sinks
            .insert(name.clone(), s.state.state().counts.clone());
        ledger.revision += 1;
    }
    // A delivery a crash cut short, to be repeated with the same events (see
    // `Deliver::replays_exactly`): gather up to where it ended, whatever the limits.
    let mut replay_to = s
        .state
        .state()
        .delivering
        .filter(|end| *end > gathered.start);
    if let Some(end) = replay_to {
        if end > *s.committed.borrow() {
            // The spool lost its unsynced tail in the crash: what was delivered from
            // there cannot be read again, so no gathering can equal it. The sink's
            // create-only keys keep the old object (a repeated key with other content is
            // written beside it).
            tracing::warn!(sink = %name, segment = end.segment, offset = end.offset,
                "the delivery cut short by the crash ended past the recovered spool; it is not repeated exactly");
            replay_to = None;
        } else {
            tracing::info!(sink = %name, segment = end.segment, offset = end.offset,
                "repeating the delivery a crash cut short, with the same events");
        }
    }
    let absorbs = s.deliver.absorbs();
    // The sink asked for the gathering to be delivered (a partition is full).
    let mut cut = false;
    // The gathering whose events the shared ledger shows as offered already.
    let mut offered_for = None;
    let mut reread_wait = s.config.retry_min.get();
    'gather: loop {
        // Gather what is committed, up to the limit (or up to the delivery to repeat).
        let mut read_any = false;
        while replay_to.map_or(
            gathered.bytes() < max_bytes && !cut && !holds_too_much(s, &gathered),
            |end| gathered.end < end,
        ) {
            match s.reader.next(&mut scratch) {
                Ok(Some((_, next))) => {
                    read_any = true;
                    gathered.push(&scratch, next);
                    first_at.get_or_insert_with(Instant::now);
                    if absorbs {
                        match s.deliver.absorb(&gathered) {
                            Ok(c) => {
                                cut |= c;
                                gathered.absorbed();
                            }
                            Err(e) => {
                                // The sink dropped what it had: read the gathering again.
                                s.metrics.sink_retries.get_or_create(&label).inc();
                                if e.is_permanent() {
                                    s.metrics.sink_permanent_errors.get_or_create(&label).inc();
                                    reread_wait = s.config.retry_max.get();
                                    tracing::error!(sink = %name, error = %e, retry_in = ?reread_wait, "the sink cannot take the events it was given and will not until the cause is fixed (data stays in the spool)");
                                } else {
                                    tracing::warn!(sink = %name, error = %e, retry_in = ?reread_wait, "the sink could not take the events it was given; reading them again from the spool");
                                }
                                if !rewind(s, &mut gathered, &mut reread_wait).await {
                                    return;
                                }
                                first_at = None;
                                cut = false;
                                continue 'gather;
                            }
                        }
                    }
                }
                Ok(None) => break,
                Err(SpoolError::Damaged {
                    damage,
                    first_report,
                }) => {
                    // The reader is past the damage already: count it, say it, go on.
                    read_any = true;
                    report_damage(s, &name, &damage, first_report);
                    if gathered.is_empty() {
                        // Nothing gathered before it: record the loss with the cursor now,
                        // and let end-to-end acks waiting on it go.
                        s.state.count(|c| c.spool_lost.add(&damage));
                        gathered.clear(damage.to);
                        s.progress.delivered.send_replace(damage.to);
                        persist(s, damage.to, &name);
                        publish_ledger(s, &name, |c| c.spool_lost.add(&damage));
                    } else {
                        gathered.pass_over(&damage);
                    }
                }
                Err(e) => {
                    // An I/O error, or damage in a version 1 segment (which cannot be
                    // resynchronised past): never skip silently.
                    tracing::error!(sink = %name, error = %e, "cannot read the spool; sink stalls until the spool is repaired");
                    s.metrics.sink_retries.get_or_create(&label).inc();
                    tokio::select! {
                        _ = s.stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    }
                    break;
                }
            }
        }
        if replay_to.is_some_and(|end| gathered.end >= end && gathered.is_empty()) {
            replay_to = None; // all of it was spool damage, passed over above
        }
        let lag = lag_bytes(gathered.start, *s.committed.borrow(), s.segment_size);
        s.metrics
            .sink_lag_bytes
            .get_or_create(&label)
            .set(lag as i64);
        let stopping = s.stop.is_cancelled();
        // An ack waits for something at or after the cursor, i.e. in this gathering or
        // not yet readable (then the wait below ends when it is committed).
        let demanded = s
            .ack_demand
            .as_ref()
            .is_some_and(|d| *d.borrow() > gathered.start);
        // The sink's own deadline (an hour to close) delivers even an empty gathering.
        let sink_due = s.deliver.due_by();
        let due = match replay_to {
            // A delivery being repeated is due where it ended, never shorter or longer.
            Some(end) => gathered.end >= end && !gathered.is_empty(),
            None => {
                gathered.bytes() >= max_bytes
                    || first_at.is_some_and(|t| t.elapsed() >= max_wait)
                    || ((stopping || demanded || cut || holds_too_much(s, &gathered))
                        && !gathered.is_empty())
                    // Only once everything committed is read: that is when it can act.
                    || (!stopping
                        && sink_due.is_some_and(|t| Instant::now() >= t)
                        && s.reader.position() >= *s.committed.borrow())
            }
        };
        if due {
            // The time first, then the spool's end: everything committed before that
            // moment is in this gathering or delivered before it, when it is caught up.
            // (The reader's position, not the gathering's end: after the last record of
            // a segment the reader stands at the next one's start.)
            gathered.cut_at = Some(Instant::now());
            gathered.caught_up = s.reader.position() >= *s.committed.borrow();
            let offered = offered_for == Some((gathered.start, gathered.end));
            offered_for = Some((gathered.start, gathered.end));
            match deliver_with_retry(s, &gathered, &name, offered).await {
                Outcome::Delivered => reread_wait = s.config.retry_min.get(),
                // Aborted: the cursor stays where it was; the data stays in the spool.
                Outcome::Aborted => return,
                Outcome::Reread => {
                    // The same events again, up to where this gathering ended.
                    replay_to = Some(gathered.end);
                    if !rewind(s, &mut gathered, &mut reread_wait).await {
                        return;
                    }
                    first_at = None;
                    cut = false;
                    continue;
                }
            }
            gathered.clear(gathered.end);
            first_at = None;
            replay_to = None;
            cut = false;
            s.progress.delivered.send_replace(gathered.start);
            // Persist before gathering again: a gathering must start where the last
            // recorded one ended, or a crash could re-gather across two deliveries and
            // write the same events under two object keys.
            persist(s, gathered.start, &name);
            continue;
        }
        if stopping {
            persist(s, gathered.start, &name);
            return;
        }
        if read_any {
            continue;
        }
        // Caught up: wait for new data, the gather deadline or shutdown.
        let mut wait = match first_at {
            Some(t) => max_wait.saturating_sub(t.elapsed()),
            None => Duration::from_millis(500),
        };
        if let Some(t) = sink_due {
            wait = wait.min(t.saturating_duration_since(Instant::now()));
        }
        let demand_gone = tokio::select! {
            _ = s.stop.cancelled() => false,
            _ = s.committed.changed() => false,
            changed = demand_changed(&mut s.ack_demand) => changed.is_err(),
            _ = tokio::time::sleep(wait) => false,
        };
        if demand_gone {
            s.ack_demand = None; // the server is gone: nobody waits any more
        }
    }
}

/// Resolves when the ack demand moves; never without one.
async fn demand_changed(
    demand: &mut Option<watch::Receiver<Position>>,
) -> Result<(), watch::error::RecvError> {
    match demand {
        Some(d) => d.changed().await,
        None => std::future::pending().await,
    }
}

/// After `wait` (doubled for next time, up to `retry_max`), moves the reader back to the
/// start of the gathering and empties it, to read the same events again. False when the
/// sink is stopped meanwhile.
async fn rewind(s: &mut SinkRun, gathered: &mut Gathered, wait: &mut Duration) -> bool {
    tokio::select! {
        _ = s.stop.cancelled() => return false,
        _ = tokio::time::sleep(*wait) => {}
    }
    *wait = (*wait * 2).min(s.config.retry_max.get());
    s.reader.seek(gathered.start);
    gathered.clear(gathered.start);
    true
}

/// Whether the gathering spans more of the spool than a gathering may hold.
fn holds_too_much(s: &SinkRun, gathered: &Gathered) -> bool {
    s.hold_limit > 0 && lag_bytes(gathered.start, gathered.end, s.segment_size) >= s.hold_limit
}

/// How a delivery ended.
enum Outcome {
    Delivered,
    /// Given up at shutdown (the shutdown timeout passed).
    Aborted,
    /// The sink lost what it absorbed: read the same gathering again.
    Reread,
}

/// `offered`: the shared ledger shows this gathering as offered already (an earlier
/// attempt that had to be read again).
async fn deliver_with_retry(
    s: &mut SinkRun,
    gathered: &Gathered,
    name: &str,
    offered: bool,
) -> Outcome {
    let label = s.metrics.sink(name);
    // What the sink must know before anything of this gathering is written (the Kafka
    // sink's routes and partition marks), then saved in the intent below.
    let mut backoff = s.config.retry_min.get();
    loop {
        let prepared = tokio::select! {
            _ = s.abort.cancelled() => return Outcome::Aborted,
            r = s.deliver.prepare(gathered) => r,
        };
        let Err(e) = prepared else { break };
        if !wait_to_retry(s, name, &label, &e, &mut backoff, gathered.events).await {
            return Outcome::Aborted;
        }
    }
    let intent = s.deliver.intent_state();
    let exact = s.deliver.replays_exactly();
    if intent.is_some() || exact {
        if intent.is_some() {
            s.state.set_resume(intent);
        }
        if exact {
            s.state.set_delivering(Some(gathered.end));
        }
        // Without this record a crash mid-delivery could go unnoticed: retry until saved.
        let cursor = gathered.start;
        loop {
            let e = match s.state.persist(cursor) {
                Ok(written) => {
                    s.metrics
                        .sink_state_bytes_written
                        .get_or_create(&label)
                        .inc_by(written);
                    break;
                }
                Err(e) => e,
            };
            tracing::warn!(sink = %name, error = %e, path = %s.state.path().display(), "cannot save the sink state before delivering; retrying");
            tokio::select! {
                _ = s.abort.cancelled() => return Outcome::Aborted,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
    // The ledger shows this delivery's events as offered and not yet delivered (pending)
    // while it runs; the state file gets them only with the delivery's success.
    if !offered {
        publish_ledger(s, name, |c| c.offered.merge(&gathered.offered));
    }
    let mut backoff = s.config.retry_min.get();
    let started = Instant::now();
    loop {
        let attempt = tokio::select! {
            _ = s.abort.cancelled() => return Outcome::Aborted,
            r = s.deliver.deliver(gathered) => r,
        };
        match attempt {
            Ok(done) => {
                s.metrics
                    .sink_events
                    .get_or_create(&label)
                    .inc_by(done.counts.delivered.total());
                s.metrics
                    .sink_bytes
                    .get_or_create(&label)
                    .inc_by(done.bytes);
                for (tag, hour) in done.counts.dropped.keys() {
                    let n = done.counts.dropped.get(tag, hour);
                    s.metrics
                        .sink_dropped
                        .get_or_create(&crate::metrics::SinkReason {
                            sink: name.to_string(),
                            reason: "too_large".into(),
                        })
                        .inc_by(n);
                }
                if let Some(received) = gathered.oldest_received {
                    let now = sluice_forward::EventTime::now().as_unix_nanos();
                    let secs = now.saturating_sub(received) as f64 / 1e9;
                    s.metrics.sink_latency.get_or_create(&label).observe(secs);
                }
                s.state.count(|c| {
                    c.offered.merge(&gathered.offered);
                    c.spool_lost.merge(&gathered.lost);
                    c.delivered.merge(&done.counts.delivered);
                    c.dropped.merge(&done.counts.dropped);
                });
                s.state.set_resume(s.deliver.recovery_state());
                s.state.set_delivering(None);
                publish_ledger(s, name, |c| {
                    c.spool_lost.merge(&gathered.lost);
                    c.delivered.merge(&done.counts.delivered);
                    c.dropped.merge(&done.counts.dropped);
                });
                if started.elapsed() > Duration::from_secs(5) {
                    tracing::info!(sink = %name, after = ?started.elapsed(), "sink recovered; delivery succeeded");
                }
                s.metrics.sink_failing.get_or_create(&label).set(0);
                s.ready.set_failing(&format!("sink {name:?}"), None);
                return Outcome::Delivered;
            }
            Err(DeliverError::Reread(e)) => {
                s.metrics.sink_retries.get_or_create(&label).inc();
                tracing::warn!(sink = %name, error = %e, events = gathered.events, "delivery failed; its events are read again from the spool");
                return Outcome::Reread;
            }
            Err(e) => {
                if !wait_to_retry(s, name, &label, &e, &mut backoff, gathered.events).await {
                    return Outcome::Aborted;
                }
            }
        }
    }
}

/// After a failed attempt: counts it, says it, and waits with exponential backoff and
/// jitter (a permanent error waits `retry_max` and makes the relay not ready until the
/// sink delivers again). False when the wait was aborted.
async fn wait_to_retry(
    s: &mut SinkRun,
    name: &str,
    label: &crate::metrics::SinkLabel,
    e: &DeliverError,
    backoff: &mut Duration,
    events: u64,
) -> bool {
    s.metrics.sink_retries.get_or_create(label).inc();
    if e.is_permanent() {
        // Retrying soon will not help; retry slowly, in case someone fixes it.
        s.metrics.sink_permanent_errors.get_or_create(label).inc();
        s.metrics.sink_failing.get_or_create(label).set(1);
        s.ready
            .set_failing(&format!("sink {name:?}"), Some(&e.to_string()));
        *backoff = s.config.retry_max.get();
    }
    // Jitter keeps many relays from hammering a recovering broker in step.
    let jitter = rand::random::<f64>() * 0.5 + 0.75;
    let wait = backoff.mul_f64(jitter);
    if e.is_permanent() {
        tracing::error!(sink = %name, error = %e, retry_in = ?wait, events, "delivery failed and will fail again until the cause is fixed (data stays in the spool; /ready is false)");
    } else {
        tracing::warn!(sink = %name, error = %e, retry_in = ?wait, events, "delivery failed; will retry (data stays in the spool)");
    }
    tokio::select! {
        _ = s.abort.cancelled() => return false,
        _ = tokio::time::sleep(wait) => {}
    }
    *backoff = (*backoff * 2).min(s.config.retry_max.get());
    true
}

/// A damaged spool stretch this sink passes over: counted in the metrics by whoever
/// reports it first, logged by every sink it costs.
fn report_damage(s: &SinkRun, name: &str, d: &Damage, first_report: bool) {
    if first_report {
        s.metrics.spool_damage(d);
    }
    tracing::error!(sink = %name, path = %d.path.display(), segment = d.from.segment,
        offset = d.from.offset, end = d.to.offset, bytes = d.bytes(), batches = d.batches,
        acknowledged = %d.acknowledged, reason = d.reason,
        "spool damage: the sink passes over batches it had not delivered; their events are lost to it (reconcile reports them), the batches after them are delivered");
}

fn persist(s: &mut SinkRun, cursor: Position, name: &str) {
    // Hours past relay.ledger_retention (the writer moves the bound).
    let forgotten_before = s
        .ledger
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .forgotten_before;
    s.state.forget_before(forgotten_before);
    match s.state.persist(cursor) {
        Ok(written) => {
            s.metrics
                .sink_state_bytes_written
                .get_or_create(&s.metrics.sink(name))
                .inc_by(written);
            s.progress.persisted.send_replace(cursor);
        }
        Err(e) => {
            tracing::warn!(sink = %name, error = %e, path = %s.state.path().display(), "cannot save the sink cursor; will retry")
        }
    }
}

/// Applies a delivery's counts to the sink's copy in the shared ledger: only what the
/// delivery changed, not the sink's whole history. Its events are counted as offered
/// when the delivery starts, and as delivered or dropped when it succeeded.
fn publish_ledger(s: &SinkRun, name: &str, change: impl FnOnce(&mut SinkCounts)) {
    let mut ledger = s.ledger.lock().unwrap_or_else(|e| e.into_inner());
    change(ledger.sinks.entry(name.to_string()).or_default());
    ledger.revision += 1;
}

/// Bytes between a sink's cursor and the spool's committed end. Segments are cut at about
/// `segment_size`, so across segments this is an estimate within one record per segment.
pub fn lag_bytes(cursor: Position, committed: Position, segment_size: u64) -> u64 {
    if committed.segment <= cursor.segment {
        committed.offset.saturating_sub(cursor.offset)
    } else {
        let whole = committed.segment - cursor.segment - 1;
        segment_size.saturating_sub(cursor.offset) + whole * segment_size + committed.offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::common::SinkCommon;
    use sluice_forward::{write_entry, EventBatch, EventTime, Options, Provenance};
    use sluice_spool::{FsyncPolicy, Spool, SpoolConfig, BATCH_HEADER_LEN};

    fn chunk(seqs: std::ops::Range<u64>) -> Vec<u8> {
        let mut entries = Vec::new();
        let seqs: Vec<u64> = seqs.collect();
        for s in &seqs {
            let time = EventTime {
                secs: 1_700_000_000,
                nanos: 0,
            };
            write_entry(&mut entries, time, &[("n", s.to_string().as_bytes())]);
        }
        let batch = EventBatch {
            tag: "t".into(),
            count: seqs.len(),
            entries,
            options: Options {
                provenance: Some(Provenance {
                    source: "s".into(),
                    seqs,
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

    fn test_spool(dir: &std::path::Path) -> Spool {
        let cfg = SpoolConfig {
            segment_bytes: 1 << 20,
            max_bytes: 1 << 30,
            fsync: FsyncPolicy::Never,
        };
        Spool::open(&dir.join("spool"), cfg).unwrap().0
    }

    /// A sink run from the spool's head, its common keys from `common` (TOML), and the
    /// sender of its committed position (dropped, the driver's wait would not wait).
    fn test_run(
        spool: &Spool,
        dir: &std::path::Path,
        common: &str,
        deliver: Box<dyn Deliver>,
        ledger: Arc<Mutex<Ledger>>,
        metrics: Arc<RelayMetrics>,
        stop: CancellationToken,
    ) -> (SinkRun, watch::Sender<Position>) {
        let config: SinkCommon = toml::from_str(common).unwrap();
        let (delivered, _) = watch::channel(spool.head());
        let (persisted, _) = watch::channel(spool.head());
        let (committed_tx, committed) = watch::channel(spool.tail());
        let run = SinkRun {
            state: SinkStateFile::open(dir, &config.name).unwrap(),
            config,
            deliver,
            reader: spool.reader(spool.head()).unwrap(),
            ack_demand: None,
            committed,
            segment_size: 1 << 20,
            hold_limit: 0,
            progress: SinkProgress {
                delivered,
                persisted,
            },
            ledger,
            metrics,
            stop,
            abort: CancellationToken::new(),
            ready: Default::default(),
        };
        (run, committed_tx)
    }

    /// A running sink that meets a batch damaged on disk passes over it, counts and
    /// records it, and delivers everything after it without a restart.
    #[tokio::test]
    async fn a_running_sink_passes_over_a_damaged_batch_and_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = test_spool(dir.path());
        let mut at = Vec::new();
        for i in 0..5u64 {
            at.push(spool.append(&chunk(i * 10..i * 10 + 10)).unwrap());
            spool.commit().unwrap();
        }
        // Bit rot in the third batch's payload after it was committed (and acknowledged).
        let seg = dir
            .path()
            .join("spool")
            .join(format!("{:020}.seg", at[2].segment));
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes[(at[2].offset + BATCH_HEADER_LEN + 20) as usize] ^= 0x01;
        std::fs::write(&seg, bytes).unwrap();

        let metrics = Arc::new(RelayMetrics::new());
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let stop = CancellationToken::new();
        let (run, _committed) = test_run(
            &spool,
            dir.path(),
            "name = \"d\"",
            Box::new(crate::sinks::discard::Discarder),
            ledger.clone(),
            metrics.clone(),
            stop.clone(),
        );
        let task = tokio::spawn(run_sink(run));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let done = {
                let l = ledger.lock().unwrap();
                l.sinks.get("d").map(|c| c.delivered.total()) == Some(40)
            };
            if done {
                break;
            }
            assert!(Instant::now() < deadline, "the sink stalled");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.cancel();
        task.await.unwrap();

        assert_eq!(metrics.spool_corrupt_batches.get(), 1);
        assert_eq!(
            metrics.spool_corrupt_bytes.get(),
            at[3].offset - at[2].offset
        );
        let file = SinkStateFile::open(dir.path(), "d").unwrap();
        let state = file.state();
        assert_eq!(state.cursor, Some(spool.tail()));
        let lost = &state.counts.spool_lost;
        assert_eq!((lost.batches, lost.bytes), (1, at[3].offset - at[2].offset));
        assert_eq!(
            (
                lost.ranges[0].segment,
                lost.ranges[0].from,
                lost.ranges[0].to
            ),
            (at[2].segment, at[2].offset, at[3].offset)
        );
        assert!(lost.ranges[0].acknowledged);
        assert_eq!(state.counts.offered.total(), 40);
    }

    /// A sink that takes chunks as they are read, fails once while taking them and once
    /// more when delivering (losing what it took both times): the driver reads the same
    /// events again each time, and every event is delivered exactly once.
    #[tokio::test]
    async fn an_absorbing_sink_that_loses_its_events_gets_them_again() {
        use crate::sinks::spec::{DeliverFuture, Delivered};

        #[derive(Default)]
        struct Flaky {
            held: Vec<u64>,
            absorbs: usize,
            delivers: usize,
            delivered: Arc<Mutex<Vec<u64>>>,
        }
        impl Deliver for Flaky {
            fn absorbs(&self) -> bool {
                true
            }
            fn absorb(&mut self, batch: &Gathered) -> Result<bool, DeliverError> {
                self.absorbs += 1;
                if self.absorbs == 3 {
                    self.held.clear();
                    return Err(DeliverError::Transient("disk full".into()));
                }
                for c in batch.chunks() {
                    let c = c.unwrap();
                    for e in c.events() {
                        self.held.push(e.unwrap().1.seq.unwrap());
                    }
                }
                Ok(self.held.len() >= 20)
            }
            fn deliver<'a>(&'a mut self, batch: &'a Gathered) -> DeliverFuture<'a> {
                Box::pin(async move {
                    assert_eq!(batch.chunks().count(), 0, "every chunk was absorbed");
                    self.delivers += 1;
                    if self.delivers == 2 {
                        self.held.clear();
                        return Err(DeliverError::Reread("stage lost".into()));
                    }
                    let mut done = Delivered::default();
                    done.counts.delivered = batch.offered.clone();
                    self.delivered.lock().unwrap().append(&mut self.held);
                    Ok(done)
                })
            }
            fn gather_limits(&self) -> (usize, Duration) {
                (usize::MAX, Duration::from_millis(50))
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let mut spool = test_spool(dir.path());
        for i in 0..10u64 {
            spool.append(&chunk(i * 10..i * 10 + 10)).unwrap();
            spool.commit().unwrap();
        }
        let delivered_seqs = Arc::new(Mutex::new(Vec::new()));
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let stop = CancellationToken::new();
        let flaky = Flaky {
            delivered: delivered_seqs.clone(),
            ..Flaky::default()
        };
        let (run, _committed) = test_run(
            &spool,
            dir.path(),
            "name = \"f\"\nretry_min = \"10ms\"",
            Box::new(flaky),
            ledger.clone(),
            Arc::new(RelayMetrics::new()),
            stop.clone(),
        );
        let task = tokio::spawn(run_sink(run));
        let deadline = Instant::now() + Duration::from_secs(30);
        while delivered_seqs.lock().unwrap().len() < 100 {
            assert!(Instant::now() < deadline, "the sink stalled");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.cancel();
        task.await.unwrap();
        let mut seqs = delivered_seqs.lock().unwrap().clone();
        seqs.sort_unstable();
        assert_eq!(seqs, (0..100).collect::<Vec<u64>>(), "each event once");
        let state = SinkStateFile::open(dir.path(), "f").unwrap();
        assert_eq!(state.state().counts.delivered.total(), 100);
        assert_eq!(state.state().counts.offered.total(), 100);
        assert_eq!(
            ledger.lock().unwrap().sinks["f"].offered.total(),
            100,
            "offered once in the shared ledger"
        );
    }
}
