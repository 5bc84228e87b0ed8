//! The forward output: sends sealed chunks to the relays over TLS and reports each
//! acknowledgement back to the reading thread (which moves the checkpoint).
//!
//! One *lane* per configured relay keeps a connection, at most `in_flight` chunks
//! unacknowledged on it, and reconnects with exponential backoff and jitter. A
//! *dispatcher* hands each chunk to a lane:
//!
//! - A new source (one file) goes to the healthy relay with the fewest sources per unit
//!   of weight, among those that are not standbys (standbys only while none of those is
//!   healthy); ties are broken by rendezvous hashing of the source id, so agents with
//!   one file each do not all pick the same relay. The assignments are saved in
//!   `<data_dir>/relays.json`, so chunks re-read after a restart reach the relay that
//!   holds their source's dedup state.
//! - While a source has chunks on a relay, its next chunks go there too (in order, where
//!   its dedup state is). A source whose choice changed (a relay came back) waits until
//!   its chunks there are acknowledged, then moves: moving costs a pause, no duplicate.
//! - Commits go back in order per source, whatever relay acknowledged what.
//! - All unacknowledged chunks together hold at most `in_flight_bytes`.
//!
//! A lane whose relay is unusable *evacuates*: it gives its unacknowledged and queued
//! chunks back to the dispatcher, which sends them, in order, to the relays the sources
//! now map to. Unusable means: not reachable by TLS or refusing the handshake; not
//! answering a probe within `probe_timeout` (hung, or a half-open path); draining
//! (it answered every chunk it read, then said so); or refusing connections for
//! `failover_after` after it took chunks (a restart that takes too long). A connection
//! that merely broke is retried on the same relay first.
//!
//! Probes: when the relay has said nothing for `probe_interval` while it owes an ack (or
//! every `heartbeat_interval` on an idle connection), the lane sends an empty chunk that
//! the relay answers at once, ahead of acks still waiting for its spool. No new chunk is
//! sent until the relay is heard from again, so a relay that stopped answering has at most
//! about one `probe_interval` of data sent into the void: that is what a partition that
//! heals later can still duplicate (`reconcile` reports it). On a dead connection the lane
//! resets the socket (RST, `SO_LINGER` 0), so the kernel drops what it had not sent yet.
//! `TCP_USER_TIMEOUT` and keepalive end connections the kernel finds dead, probes or not.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures::StreamExt;
use rustls::pki_types::ServerName;
use sluice_forward::{
    encode_probe, ClientCodec, ClientFrame, ClientHandshake, ClientHandshakeError, DecodeError,
    Limits, ServerFrame, ALIVE_ACK, DRAINING_ACK,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tokio_util::codec::{Encoder, FramedRead};
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

use crate::config::{split_host_port, OutputConfig, RelaySpec};
use crate::metrics::AgentMetrics;
use crate::pipeline::{Chunk, Commit, Sent};
use crate::source::SourceId;

pub struct Output {
    pub config: OutputConfig,
    pub agent_id: String,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub metrics: Arc<AgentMetrics>,
    /// Where the source -> relay assignments are kept across restarts (None: not kept).
    pub assignments: Option<std::path::PathBuf>,
}

/// The file in `agent.data_dir` that keeps which relay each source goes to, so that
/// chunks re-read after a restart reach the relay holding their dedup state.
pub const ASSIGNMENTS_FILE: &str = "relays.json";

#[derive(serde::Serialize, serde::Deserialize)]
struct SavedAssignments {
    version: u32,
    /// (input, source id, relay address).
    sources: Vec<(usize, String, String)>,
}

struct InFlight {
    chunk: Chunk,
    sent_at: Option<Instant>,
}

/// Why a session with a relay ended.
enum End {
    /// Nothing left to send and the input is closed.
    Done,
    Failed {
        reason: Failure,
        message: String,
    },
}

/// What went wrong with a relay: the `relay_errors{reason}` label, and what decides
/// whether the agent stays on that relay or moves the relay's sources.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    /// No TCP connection.
    Connect,
    /// The TLS handshake failed or timed out.
    Tls,
    /// The HELO/PING/PONG handshake failed.
    Auth,
    /// A probe was not answered within `probe_timeout`: the relay is hung, or the path to
    /// it is cut.
    Unanswered,
    /// With probes off: a chunk was not acknowledged within `ack_timeout`.
    AckTimeout,
    /// The relay is draining: it answered every chunk it read and reads no more.
    Draining,
    /// Writing to the connection failed.
    Io,
    /// The relay sent something it should not have.
    Protocol,
    /// The relay closed the connection.
    Closed,
}

impl Failure {
    fn as_label(self) -> &'static str {
        match self {
            Failure::Connect => "connect",
            Failure::Tls => "tls",
            Failure::Auth => "auth",
            Failure::Unanswered => "unanswered",
            Failure::AckTimeout => "ack_timeout",
            Failure::Draining => "draining",
            Failure::Io => "io",
            Failure::Protocol => "protocol",
            Failure::Closed => "closed",
        }
    }
}

/// A connection to a relay: TCP, or TLS over TCP.
type RelayStream = Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;

fn failed(reason: Failure, message: impl Into<String>) -> End {
    End::Failed {
        reason,
        message: message.into(),
    }
}

/// What a lane shares with the dispatcher. `healthy` changes only under the lock, and a
/// lane that turns unhealthy takes its queue in the same step: so the dispatcher never
/// hands a chunk to a lane that has already given its chunks back.
struct LaneState {
    queue: VecDeque<Chunk>,
    /// Set by the dispatcher only, when it reads `Reachable` (after any evacuation
    /// before it): so it never hands a source's chunk to a lane ahead of the chunks
    /// that lane gave back.
    healthy: bool,
    closing: bool,
    /// Counts evacuations: a `Reachable` from before the last one is stale.
    generation: u64,
    /// The lane's first connection attempt has ended (either way): until then, sources
    /// saved as going to it wait for it rather than go elsewhere.
    tried: bool,
}

struct Lane {
    relay: RelaySpec,
    state: Mutex<LaneState>,
    wake: Notify,
}

impl Lane {
    fn new(relay: RelaySpec) -> Lane {
        Lane {
            relay,
            state: Mutex::new(LaneState {
                queue: VecDeque::new(),
                healthy: false,
                closing: false,
                generation: 0,
                tried: false,
            }),
            wake: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LaneState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn healthy(&self) -> bool {
        self.lock().healthy
    }

    /// Queues `chunk` unless the lane is unhealthy (then it is handed back).
    fn push(&self, chunk: Chunk) -> Result<(), Chunk> {
        let mut state = self.lock();
        if !state.healthy {
            return Err(chunk);
        }
        state.queue.push_back(chunk);
        drop(state);
        self.wake.notify_one();
        Ok(())
    }

    fn pop(&self) -> Option<Chunk> {
        self.lock().queue.pop_front()
    }

    fn closing(&self) -> bool {
        let state = self.lock();
        state.closing && state.queue.is_empty()
    }
}

/// What lanes tell the dispatcher.
enum Event {
    Acked {
        input: usize,
        source: SourceId,
        end: u64,
        count: usize,
        bytes: usize,
    },
    /// The lane connected and finished the handshake, in this generation.
    Reachable { lane: usize, generation: u64 },
    /// The lane's first connection attempt failed.
    FirstTryFailed,
    /// The lane's relay is unusable: its unacknowledged chunks, then its queue, in order.
    Evacuated { lane: usize, chunks: Vec<Chunk> },
}

/// The dispatcher's view of one source.
#[derive(Default)]
struct SourceState {
    /// Chunks not yet handed to a lane, in order.
    waiting: VecDeque<Chunk>,
    /// The lane holding this source's chunks, and how many.
    lane: Option<usize>,
    on_lane: usize,
    /// Chunk ends not yet committed, in order, whether each was acknowledged, and its
    /// seqs (what its commit tells the reading thread).
    outstanding: VecDeque<(u64, bool, Sent)>,
}

type SourceKey = (usize, SourceId);

/// A source not seen for this long loses its place in the assignment table.
const FORGET_AFTER: Duration = Duration::from_secs(600);

/// FNV-1a: a hash that stays the same across builds and restarts.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // FNV's low bits mix poorly for short keys: finish with a 64-bit mixer.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Weighted rendezvous hashing: the relay with the highest `-weight / ln(u)`, `u` uniform
/// in (0, 1) from the hash of (source, relay). Each relay's share is its weight's share.
fn rendezvous<'a>(
    source: &SourceId,
    relays: impl Iterator<Item = (usize, &'a RelaySpec)>,
) -> Option<usize> {
    relays
        .map(|(i, r)| {
            let h = fnv1a(&[source.0.as_bytes(), r.address.as_bytes()]);
            let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            (i, -f64::from(r.weight) / u.ln())
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(i, _)| i)
}

impl Output {
    pub async fn run(
        self,
        mut chunks: mpsc::Receiver<Chunk>,
        commits: Sender<Commit>,
        abort: CancellationToken,
    ) {
        let this = Arc::new(self);
        let lanes: Vec<Arc<Lane>> = this
            .config
            .relays
            .iter()
            .map(|r| Arc::new(Lane::new(r.spec())))
            .collect();
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let tasks: Vec<_> = lanes
            .iter()
            .enumerate()
            .map(|(i, lane)| tokio::spawn(this.clone().lane(i, lane.clone(), events_tx.clone())))
            .collect();
        drop(events_tx);
        let mut d = Dispatcher {
            out: &this,
            lanes: &lanes,
            sources: HashMap::new(),
            assigned: HashMap::new(),
            counts: vec![0; lanes.len()],
            recent: HashSet::new(),
            pruned: Instant::now(),
            dirty: false,
            chunks: 0,
            bytes: 0,
            commits,
        };
        d.load_assignments();
        let mut save = tokio::time::interval(Duration::from_secs(1));
        save.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let max_chunks = this.config.in_flight * lanes.len();
        let max_bytes = this.config.in_flight_bytes.as_usize();
        let mut input_open = true;
        loop {
            if !input_open && d.sources.is_empty() {
                d.save_assignments();
                for lane in &lanes {
                    lane.lock().closing = true;
                    lane.wake.notify_one();
                }
                for task in tasks {
                    let handle = task.abort_handle();
                    tokio::select! {
                        _ = abort.cancelled() => {
                            handle.abort();
                            continue;
                        }
                        _ = task => {}
                    }
                }
                return;
            }
            let room =
                input_open && (d.chunks == 0 || (d.chunks < max_chunks && d.bytes < max_bytes));
            tokio::select! {
                biased;
                _ = abort.cancelled() => {
                    if d.chunks > 0 {
                        tracing::warn!(unacknowledged = d.chunks, "shutdown timeout: unacknowledged chunks will be re-read from the files at the next start");
                    }
                    for task in &tasks {
                        task.abort();
                    }
                    return;
                }
                Some(event) = events.recv() => d.event(event),
                _ = save.tick(), if d.dirty => d.save_assignments(),
                chunk = chunks.recv(), if room => match chunk {
                    Some(chunk) => d.add(chunk),
                    None => input_open = false,
                },
            }
        }
    }
}

struct Dispatcher<'a> {
    out: &'a Output,
    lanes: &'a [Arc<Lane>],
    sources: HashMap<SourceKey, SourceState>,
    /// Which relay each source goes to, and how many sources each relay has.
    assigned: HashMap<SourceKey, usize>,
    counts: Vec<usize>,
    /// Sources seen since the last `forget_idle`, and when that ran.
    recent: HashSet<SourceKey>,
    pruned: Instant,
    /// The assignments changed since they were last saved.
    dirty: bool,
    /// Chunks not yet acknowledged, and their compressed bytes.
    chunks: usize,
    bytes: usize,
    commits: Sender<Commit>,
}

impl Dispatcher<'_> {
    fn add(&mut self, mut chunk: Chunk) {
        self.chunks += 1;
        self.bytes += chunk.frame.len();
        self.out.metrics.in_flight.set(self.chunks as i64);
        let key = (chunk.input, chunk.source.clone());
        self.forget_idle();
        self.recent.insert(key.clone());
        let state = self.sources.entry(key.clone()).or_default();
        state
            .outstanding
            .push_back((chunk.end, false, std::mem::take(&mut *chunk.sent)));
        state.waiting.push_back(chunk);
        self.pump(&key);
    }

    /// The lanes a source may go to now: the healthy relays that are not standbys, else
    /// the healthy standbys.
    fn candidates(&self) -> Vec<usize> {
        let healthy: Vec<usize> = (0..self.lanes.len())
            .filter(|i| self.lanes[*i].healthy())
            .collect();
        let primaries: Vec<usize> = healthy
            .iter()
            .copied()
            .filter(|i| !self.lanes[*i].relay.standby)
            .collect();
        match primaries.is_empty() {
            true => healthy,
            false => primaries,
        }
    }

    /// Sources assigned to `lane` per unit of its weight.
    fn load(&self, lane: usize) -> f64 {
        self.counts[lane] as f64 / f64::from(self.lanes[lane].relay.weight)
    }

    fn assign(&mut self, key: &SourceKey, lane: usize) {
        if let Some(old) = self.assigned.insert(key.clone(), lane) {
            self.counts[old] -= 1;
        }
        self.counts[lane] += 1;
        self.dirty = true;
    }

    /// The assignments of the last run, for relays still configured. A missing or
    /// unreadable file only costs placement (logged), never data.
    fn load_assignments(&mut self) {
        let Some(path) = &self.out.assignments else {
            return;
        };
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the saved relay assignments; sources are placed afresh");
                return;
            }
        };
        let saved: SavedAssignments = match serde_json::from_slice(&text) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "the saved relay assignments are damaged; sources are placed afresh");
                return;
            }
        };
        for (input, source, relay) in saved.sources {
            if let Some(lane) = self.lanes.iter().position(|l| l.relay.address == relay) {
                self.assign(&(input, SourceId(source)), lane);
            }
        }
        self.dirty = false;
    }

    /// Written atomically (temp file, rename); not fsynced: losing it costs placement.
    fn save_assignments(&mut self) {
        let Some(path) = &self.out.assignments else {
            return;
        };
        self.dirty = false;
        let saved = SavedAssignments {
            version: 1,
            sources: self
                .assigned
                .iter()
                .map(|((input, source), lane)| {
                    (
                        *input,
                        source.0.clone(),
                        self.lanes[*lane].relay.address.clone(),
                    )
                })
                .collect(),
        };
        let tmp = path.with_extension("json.tmp");
        let written = serde_json::to_vec(&saved)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "cannot save the relay assignments");
        }
    }

    /// The relay `source` belongs on: the one it is assigned to while that one is a
    /// candidate (sticky), else the least loaded candidate by weight, ties broken by
    /// rendezvous hashing of the source over the tied relays (so agents with few sources
    /// do not all start on the same relay).
    fn desired(&mut self, key: &SourceKey) -> Option<usize> {
        let candidates = self.candidates();
        if let Some(lane) = self.assigned.get(key) {
            if candidates.contains(lane) {
                return Some(*lane);
            }
            // Saved from the last run, and its relay not tried yet: wait for it.
            if !self.lanes[*lane].lock().tried {
                return None;
            }
        }
        let least = candidates
            .iter()
            .map(|l| self.load(*l))
            .min_by(f64::total_cmp)?;
        let tied = candidates
            .iter()
            .copied()
            .filter(|l| self.load(*l) <= least + 1e-9);
        let lanes = self.lanes;
        let lane = rendezvous(&key.1, tied.map(|l| (l, &lanes[l].relay)))?;
        self.assign(key, lane);
        Some(lane)
    }

    /// A relay became healthy: sources on standbys come back to it if it is not one,
    /// and it takes sources from the most loaded relays until it has its share. A moved
    /// source waits for its chunks on the old relay to be acknowledged, then goes.
    fn rebalance(&mut self, lane: usize) {
        let candidates = self.candidates();
        if !candidates.contains(&lane) {
            return;
        }
        // Sources on standbys come back once a relay that is not one is healthy. Sources
        // of relays that are down stay assigned: `desired` moves each when it next has
        // a chunk (and waits for a relay not tried yet since the start).
        let stray: Vec<SourceKey> = match self.lanes[lane].relay.standby {
            true => Vec::new(),
            false => self
                .assigned
                .iter()
                .filter(|(_, l)| self.lanes[**l].relay.standby)
                .map(|(k, _)| k.clone())
                .collect(),
        };
        for key in stray {
            if let Some(l) = self.assigned.remove(&key) {
                self.counts[l] -= 1;
            }
            self.desired(&key);
        }
        let total: usize = candidates.iter().map(|l| self.counts[*l]).sum();
        let weights: u32 = candidates.iter().map(|l| self.lanes[*l].relay.weight).sum();
        let share = total * self.lanes[lane].relay.weight as usize / weights.max(1) as usize;
        while self.counts[lane] < share {
            let Some(from) = candidates
                .iter()
                .copied()
                .filter(|l| *l != lane)
                .max_by(|a, b| self.load(*a).total_cmp(&self.load(*b)))
            else {
                break;
            };
            if self.load(from) <= self.load(lane) + 1.0 / f64::from(self.lanes[lane].relay.weight) {
                break;
            }
            let Some(key) = self
                .assigned
                .iter()
                .find(|(_, l)| **l == from)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            self.assign(&key, lane);
        }
    }

    /// Forgets sources that have been idle for a while (rotated-away files), so the
    /// table stays the size of what the agent reads.
    fn forget_idle(&mut self) {
        if self.pruned.elapsed() < FORGET_AFTER {
            return;
        }
        self.pruned = Instant::now();
        let idle: Vec<SourceKey> = self
            .assigned
            .keys()
            .filter(|k| !self.sources.contains_key(*k) && !self.recent.contains(*k))
            .cloned()
            .collect();
        for key in idle {
            if let Some(l) = self.assigned.remove(&key) {
                self.counts[l] -= 1;
                self.dirty = true;
            }
        }
        self.recent.clear();
    }

    /// Hands the source's waiting chunks to its lane, as far as the rules allow.
    fn pump(&mut self, key: &SourceKey) {
        let desired = self.desired(key);
        let Some(state) = self.sources.get_mut(key) else {
            return;
        };
        while let Some(chunk) = state.waiting.pop_front() {
            let target = match (state.on_lane, state.lane) {
                // Chunks on a lane: the next ones follow them, unless the source should
                // move (they wait until those are acknowledged) or the lane failed
                // (its evacuation is on its way).
                (n, Some(lane)) if n > 0 => match desired == Some(lane) {
                    true => lane,
                    false => {
                        state.waiting.push_front(chunk);
                        return;
                    }
                },
                _ => match desired {
                    Some(lane) => lane,
                    None => {
                        state.waiting.push_front(chunk);
                        return;
                    }
                },
            };
            match self.lanes[target].push(chunk) {
                Ok(()) => {
                    state.lane = Some(target);
                    state.on_lane += 1;
                }
                Err(chunk) => {
                    state.waiting.push_front(chunk);
                    return;
                }
            }
        }
    }

    fn pump_all(&mut self) {
        let stalled: Vec<SourceKey> = self
            .sources
            .iter()
            .filter(|(_, s)| !s.waiting.is_empty())
            .map(|(k, _)| k.clone())
            .collect();
        for key in stalled {
            self.pump(&key);
        }
    }

    fn event(&mut self, event: Event) {
        match event {
            Event::Acked {
                input,
                source,
                end,
                count,
                bytes,
            } => {
                self.chunks -= 1;
                self.bytes -= bytes;
                self.out.metrics.in_flight.set(self.chunks as i64);
                self.out.metrics.chunks_acked.inc();
                self.out.metrics.events_acked.inc_by(count as u64);
                let key = (input, source);
                let Some(state) = self.sources.get_mut(&key) else {
                    return;
                };
                state.on_lane = state.on_lane.saturating_sub(1);
                if let Some(entry) = state.outstanding.iter_mut().find(|(e, ..)| *e == end) {
                    entry.1 = true;
                }
                // Commit in order: the checkpoint never passes an unacknowledged chunk.
                let mut committed: Option<(u64, Sent)> = None;
                while state.outstanding.front().is_some_and(|o| o.1) {
                    let Some((e, _, sent)) = state.outstanding.pop_front() else {
                        break;
                    };
                    match &mut committed {
                        Some((end, all)) => {
                            *end = e;
                            all.extend(&sent);
                        }
                        None => committed = Some((e, sent)),
                    }
                }
                if let Some((end, sent)) = committed {
                    let _ = self.commits.send(Commit {
                        input: key.0,
                        source: key.1.clone(),
                        end,
                        sent,
                    });
                }
                if state.outstanding.is_empty() && state.waiting.is_empty() {
                    self.sources.remove(&key);
                } else {
                    self.pump(&key);
                }
            }
            Event::FirstTryFailed => self.pump_all(),
            Event::Reachable { lane, generation } => {
                let mut state = self.lanes[lane].lock();
                state.tried = true;
                if state.healthy || state.generation != generation {
                    return;
                }
                state.healthy = true;
                drop(state);
                self.out.metrics.relays_healthy.inc();
                tracing::info!(relay = %self.lanes[lane].relay.address, "relay is healthy: sources go to it");
                self.rebalance(lane);
                self.pump_all();
            }
            Event::Evacuated { lane, chunks } => {
                let relay = &self.lanes[lane].relay.address;
                let events: usize = chunks.iter().map(|c| c.count).sum();
                if !chunks.is_empty() {
                    tracing::info!(relay = %relay, chunks = chunks.len(), events, "moving the relay's unacknowledged chunks to the other relays");
                }
                self.out.metrics.chunks_moved.inc_by(chunks.len() as u64);
                self.out.metrics.events_moved.inc_by(events as u64);
                // Back to the front of each source's queue, oldest first.
                for chunk in chunks.into_iter().rev() {
                    let key = (chunk.input, chunk.source.clone());
                    let state = self.sources.entry(key).or_default();
                    state.on_lane = state.on_lane.saturating_sub(1);
                    state.waiting.push_front(chunk);
                }
                // The lane holds none of any source's chunks now.
                for state in self.sources.values_mut() {
                    if state.lane == Some(lane) {
                        state.lane = None;
                        state.on_lane = 0;
                    }
                }
                self.pump_all();
            }
        }
    }
}

impl Output {
    /// One relay's connection, reconnected for as long as the agent runs.
    async fn lane(
        self: Arc<Self>,
        index: usize,
        lane: Arc<Lane>,
        events: mpsc::UnboundedSender<Event>,
    ) {
        let relay = lane.relay.address.clone();
        let mut window: VecDeque<InFlight> = VecDeque::new();
        let mut backoff = self.config.retry_min.get();
        // Whether the last session ended without a single ack.
        let mut fruitless = false;
        // When the relay began refusing connections while it held chunks of ours.
        let mut refused_since: Option<Instant> = None;
        // Whether this run of failures was logged as a warning already.
        let mut reported = false;
        loop {
            if window.is_empty() && lane.closing() {
                return;
            }
            let started = Instant::now();
            let mut acks = 0u64;
            let end = match self.connect(&relay).await {
                Ok((stream, socket)) => {
                    refused_since = None;
                    reported = false;
                    self.exchange(
                        stream,
                        socket,
                        index,
                        &lane,
                        &mut window,
                        &events,
                        &mut acks,
                    )
                    .await
                }
                Err(end) => end,
            };
            let End::Failed { reason, message } = end else {
                return;
            };
            {
                let mut state = lane.lock();
                if !state.tried {
                    state.tried = true;
                    let _ = events.send(Event::FirstTryFailed);
                }
            }
            self.metrics.relay_error(reason.as_label());
            // A relay that stays down is reported once, then at debug level.
            if !reported || !window.is_empty() {
                tracing::warn!(relay = %relay, reason = reason.as_label(), unacknowledged = window.len(), "{message}");
                reported = true;
            } else {
                tracing::debug!(relay = %relay, reason = reason.as_label(), "{message}");
            }
            if started.elapsed() > Duration::from_secs(10) {
                backoff = self.config.retry_min.get();
            }
            let leave = match reason {
                Failure::Tls
                | Failure::Auth
                | Failure::Unanswered
                | Failure::AckTimeout
                | Failure::Draining => true,
                // Nothing of ours there: nothing to deduplicate, so move at once. Else
                // give a restarting relay `failover_after` to come back.
                Failure::Connect => {
                    window.is_empty()
                        || refused_since.get_or_insert_with(Instant::now).elapsed()
                            >= self.config.failover_after.get()
                }
                // A connection that merely broke is retried on the same relay, once.
                // With nothing in flight there is nothing to keep there: reconnect, and
                // let a refused connection decide.
                Failure::Io | Failure::Protocol | Failure::Closed => {
                    fruitless && acks == 0 && !window.is_empty()
                }
            };
            fruitless = acks == 0;
            if leave {
                self.evacuate(index, &lane, &mut window, &events);
                refused_since = None;
            }
            for f in window.iter_mut() {
                f.sent_at = None;
            }
            // A draining relay is not back before it restarts: wait as long as for any
            // other failure.
            let jitter = rand::random::<f64>() * 0.5 + 0.75;
            tokio::select! {
                _ = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
                // Shutting down with nothing of ours here: no reason to wait.
                _ = lane.wake.notified(), if window.is_empty() => {}
            }
            backoff = (backoff * 2).min(self.config.retry_max.get());
        }
    }

    /// Marks the lane unhealthy and gives its chunks back to the dispatcher.
    fn evacuate(
        &self,
        index: usize,
        lane: &Lane,
        window: &mut VecDeque<InFlight>,
        events: &mpsc::UnboundedSender<Event>,
    ) {
        let mut state = lane.lock();
        state.generation += 1;
        let was_healthy = std::mem::replace(&mut state.healthy, false);
        if !was_healthy && window.is_empty() && state.queue.is_empty() {
            return;
        }
        let mut chunks: Vec<Chunk> = window.drain(..).map(|f| f.chunk).collect();
        chunks.extend(state.queue.drain(..));
        // Sent while the lock is held: the dispatcher sees the lane unhealthy only
        // with the evacuation already in its channel.
        let _ = events.send(Event::Evacuated {
            lane: index,
            chunks,
        });
        drop(state);
        if was_healthy {
            self.metrics.relays_healthy.dec();
            tracing::warn!(relay = %lane.relay.address, "relay unusable: its sources go to the other relays");
        }
    }

    /// TCP, then TLS unless `insecure`, then the Forward handshake if there is a key.
    /// Also gives a second handle on the socket, to reset it.
    async fn connect(&self, relay: &str) -> Result<(RelayStream, OwnedFd), End> {
        let connect_timeout = self.config.connect_timeout.get();
        let tcp = match tokio::time::timeout(connect_timeout, TcpStream::connect(relay)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(failed(Failure::Connect, format!("cannot connect: {e}"))),
            Err(_) => {
                return Err(failed(
                    Failure::Connect,
                    format!("no connection within {connect_timeout:?}"),
                ))
            }
        };
        let _ = tcp.set_nodelay(true);
        let socket = tcp.as_fd().try_clone_to_owned().map_err(|e| {
            failed(
                Failure::Connect,
                format!("cannot duplicate the socket: {e}"),
            )
        })?;
        tune(&socket);
        let Some(config) = &self.tls else {
            return Ok((Either::Left(tcp), socket));
        };
        let name = match &self.config.tls.server_name {
            Some(n) => n.clone(),
            None => split_host_port(relay).map(|(h, _)| h).unwrap_or_default(),
        };
        let Ok(server_name) = ServerName::try_from(name.clone()) else {
            return Err(failed(
                Failure::Tls,
                format!("{name:?} is not a valid TLS server name"),
            ));
        };
        let connector = tokio_rustls::TlsConnector::from(config.clone());
        match tokio::time::timeout(connect_timeout, connector.connect(server_name, tcp)).await {
            Ok(Ok(tls)) => Ok((Either::Right(tls), socket)),
            Ok(Err(e)) => Err(failed(Failure::Tls, format!("TLS handshake with the relay failed: {e} (check output.tls.ca and output.tls.server_name)"))),
            Err(_) => Err(failed(Failure::Tls, format!("TLS handshake not finished within {connect_timeout:?}"))),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn exchange<S>(
        &self,
        stream: S,
        socket: OwnedFd,
        index: usize,
        lane: &Lane,
        window: &mut VecDeque<InFlight>,
        events: &mpsc::UnboundedSender<Event>,
        acks: &mut u64,
    ) -> End
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let relay = lane.relay.address.as_str();
        let (read, mut write) = tokio::io::split(stream);
        let mut frames = FramedRead::new(read, ClientCodec::new(Limits::default()));
        if let Some(key) = &self.config.shared_key {
            if let Err(end) = self.authenticate(key, &mut frames, &mut write).await {
                return end;
            }
        }
        {
            let state = lane.lock();
            if !state.healthy {
                let _ = events.send(Event::Reachable {
                    lane: index,
                    generation: state.generation,
                });
            }
        }
        let ack_timeout = self.config.ack_timeout.get();
        let heartbeat = self.config.heartbeat_interval.get();
        let probe_interval = self.config.probe_interval.get();
        let probe_timeout = self.config.probe_timeout.get();
        let probes = !probe_timeout.is_zero();
        let far = || Instant::now() + Duration::from_secs(3600);
        let mut last_write = Instant::now();
        let mut last_heard = Instant::now();
        let mut probe: Option<(String, Instant)> = None;
        let mut probe_seq = 0u64;
        // The oldest chunk is overdue while the relay answers probes: waited for.
        let mut waiting_since: Option<Instant> = None;
        let mut out = BytesMut::new();
        // A first probe at once: the relay learns this client probes (so it will say
        // when it is alive but holding us up, and when it drains), and we learn it
        // answers.
        if probes {
            probe_seq += 1;
            let id = format!("probe-{index}-{probe_seq}");
            encode_probe(&id, &mut out);
            if let Err(e) = write.write_all(&out).await {
                return failed(Failure::Io, format!("probing the relay failed: {e}"));
            }
            self.metrics.probes.inc();
            probe = Some((id, Instant::now()));
        }
        // Then everything unacknowledged, in order.
        for f in window.iter_mut() {
            if let Err(e) = write.write_all(&f.chunk.frame).await {
                return failed(Failure::Io, format!("resending failed: {e}"));
            }
            f.sent_at = Some(Instant::now());
            self.metrics.chunks_resent.inc();
        }
        loop {
            if window.is_empty() && lane.closing() {
                let _ = write.shutdown().await;
                return End::Done;
            }
            // New chunks go only to a relay heard from lately.
            let heard = !probes || window.is_empty() || last_heard.elapsed() < probe_interval;
            let room = window.len() < self.config.in_flight && heard;
            if room {
                if let Some(chunk) = lane.pop() {
                    if let Err(e) = write.write_all(&chunk.frame).await {
                        window.push_back(InFlight {
                            chunk,
                            sent_at: None,
                        });
                        return failed(Failure::Io, format!("sending failed: {e}"));
                    }
                    self.metrics.chunks_sent.inc();
                    last_write = Instant::now();
                    window.push_back(InFlight {
                        chunk,
                        sent_at: Some(last_write),
                    });
                    continue;
                }
            }
            let oldest = window.front().and_then(|f| f.sent_at);
            let probe_at = match (probes, &probe, oldest) {
                (false, _, _) | (true, Some(_), _) => None,
                (true, None, Some(_)) => Some(last_heard + probe_interval),
                (true, None, None) if !heartbeat.is_zero() => {
                    Some(last_write.max(last_heard) + heartbeat)
                }
                (true, None, None) => None,
            };
            // Anything heard from the relay (an ack, ALIVE_ACK) counts as an answer.
            let dead_at = probe
                .as_ref()
                .map(|(_, at)| (*at).max(last_heard) + probe_timeout);
            let overdue_at = match (waiting_since, oldest) {
                (None, Some(t)) => Some(t + ack_timeout),
                _ => None,
            };
            let beat_at = (!probes && !heartbeat.is_zero()).then(|| last_write + heartbeat);
            tokio::select! {
                _ = lane.wake.notified(), if room => {}
                frame = frames.next() => match frame {
                    Some(Ok(ServerFrame::Ack(id))) => {
                        last_heard = Instant::now();
                        if probe.as_ref().is_some_and(|(p, _)| *p == id) {
                            probe = None;
                            continue;
                        }
                        if id == ALIVE_ACK {
                            continue; // the relay holds us up, and says it is alive
                        }
                        if id == DRAINING_ACK {
                            return failed(Failure::Draining, format!("the relay is draining: it answered every chunk it read; {} unacknowledged chunks go to the other relays", window.len()));
                        }
                        let Some(at) = window.iter().position(|f| f.chunk.id == id) else {
                            if !id.starts_with("probe-") {
                                tracing::warn!(ack = %id, "relay acknowledged a chunk that is not in flight; ignored");
                            }
                            continue;
                        };
                        if let Some(f) = window.remove(at) {
                            *acks += 1;
                            let c = f.chunk;
                            let _ = events.send(Event::Acked { input: c.input, source: c.source, end: c.end, count: c.count, bytes: c.frame.len() });
                        }
                        let overdue = window.front().and_then(|f| f.sent_at).is_some_and(|t| t.elapsed() >= ack_timeout);
                        if !overdue {
                            if let Some(since) = waiting_since.take() {
                                tracing::info!(relay = %relay, waited = ?since.elapsed(), "acknowledgements resumed");
                            }
                        }
                    }
                    Some(Ok(other)) => return failed(Failure::Protocol, format!("unexpected frame from the relay: {}", frame_name(&other))),
                    Some(Err(e)) => return failed(Failure::Protocol, format!("bad response from the relay: {e}")),
                    None => return failed(Failure::Closed, "the relay closed the connection"),
                },
                _ = tokio::time::sleep_until(probe_at.unwrap_or_else(far).into()), if probe_at.is_some() => {
                    probe_seq += 1;
                    let id = format!("probe-{index}-{probe_seq}");
                    out.clear();
                    encode_probe(&id, &mut out);
                    if let Err(e) = write.write_all(&out).await {
                        return failed(Failure::Io, format!("probing the relay failed: {e}"));
                    }
                    self.metrics.probes.inc();
                    if window.is_empty() {
                        self.metrics.heartbeats.inc();
                    }
                    last_write = Instant::now();
                    probe = Some((id, last_write));
                }
                _ = tokio::time::sleep_until(dead_at.unwrap_or_else(far).into()), if dead_at.is_some() => {
                    reset(&socket);
                    return failed(Failure::Unanswered, format!(
                        "the relay answered nothing for {:?}, not even a probe (probe_timeout {probe_timeout:?}): it is hung or the path to it is cut; connection reset, {} unacknowledged chunks go to the other relays",
                        last_heard.elapsed(), window.len()
                    ));
                }
                _ = tokio::time::sleep_until(overdue_at.unwrap_or_else(far).into()), if overdue_at.is_some() => {
                    let age = oldest.map(|t| t.elapsed()).unwrap_or_default();
                    if !probes {
                        reset(&socket);
                        return failed(Failure::AckTimeout, format!("no acknowledgement for {age:?} (ack_timeout {ack_timeout:?}; probes are off); resending to the other relays"));
                    }
                    self.metrics.ack_waits.inc();
                    tracing::warn!(relay = %relay, oldest_chunk_age = ?age, unacknowledged = window.len(), "no acknowledgement within ack_timeout ({ack_timeout:?}), but the relay answers probes: waiting on it instead of moving (in end_to_end mode its sinks may be slow; another relay would only spool a second copy)");
                    waiting_since = Some(oldest.unwrap_or_else(Instant::now));
                }
                _ = tokio::time::sleep_until(beat_at.unwrap_or_else(far).into()), if beat_at.is_some() => {
                    // Forward's heartbeat: a msgpack nil, skipped by servers.
                    if let Err(e) = write.write_all(&[0xc0]).await {
                        return failed(Failure::Io, format!("heartbeat to an idle relay failed: {e}"));
                    }
                    self.metrics.heartbeats.inc();
                    last_write = Instant::now();
                }
            }
        }
    }

    async fn authenticate<R, W>(
        &self,
        key: &str,
        frames: &mut FramedRead<R, ClientCodec>,
        write: &mut W,
    ) -> Result<(), End>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let timeout = self.config.connect_timeout.get();
        let helo = match tokio::time::timeout(timeout, frames.next()).await {
            Ok(Some(Ok(ServerFrame::Helo(h)))) => h,
            Ok(Some(Ok(other))) => {
                return Err(failed(
                    Failure::Auth,
                    format!("expected HELO, got {}", frame_name(&other)),
                ))
            }
            Ok(Some(Err(e))) => return Err(failed(Failure::Auth, format!("bad HELO: {e}"))),
            Ok(None) => {
                return Err(failed(
                    Failure::Auth,
                    "the relay closed the connection before HELO",
                ))
            }
            Err(_) => {
                return Err(failed(
                    Failure::Auth,
                    format!("no HELO within {timeout:?}; does the relay have a shared_key?"),
                ))
            }
        };
        let user = match (&self.config.username, &self.config.password) {
            (Some(user), Some(password)) => Some((user.as_str(), password.as_str())),
            _ => None,
        };
        // An auth salt in HELO is no reason to give up without a user: Fluent Bit sends
        // one to everybody. The PING then has an empty user and the PONG decides.
        let (ping, awaiting) = ClientHandshake::new(helo).ping(&self.agent_id, key, user);
        let mut out = BytesMut::new();
        ClientCodec::new(Limits::default())
            .encode(ClientFrame::Ping(ping), &mut out)
            .map_err(|e| failed(Failure::Auth, format!("encoding PING: {e}")))?;
        write
            .write_all(&out)
            .await
            .map_err(|e| failed(Failure::Io, format!("sending PING: {e}")))?;
        let pong = match tokio::time::timeout(timeout, frames.next()).await {
            Ok(Some(Ok(ServerFrame::Pong(p)))) => p,
            Ok(Some(Ok(other))) => {
                return Err(failed(
                    Failure::Auth,
                    format!("expected PONG, got {}", frame_name(&other)),
                ))
            }
            // A TLS peer that closes without close_notify shows as an unexpected EOF.
            Ok(Some(Err(DecodeError::Io(e)))) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(failed(Failure::Auth, CLOSED_WITHOUT_PONG))
            }
            Ok(Some(Err(e))) => return Err(failed(Failure::Auth, format!("bad PONG: {e}"))),
            Ok(None) => return Err(failed(Failure::Auth, CLOSED_WITHOUT_PONG)),
            Err(_) => return Err(failed(Failure::Auth, format!("no PONG within {timeout:?}"))),
        };
        awaiting
            .receive_pong(pong)
            .map(|_authenticated| ())
            .map_err(|e| failed(Failure::Auth, handshake_message(&e)))
    }
}

/// Keepalive and `TCP_USER_TIMEOUT`: the kernel ends a connection whose peer stopped
/// acknowledging bytes, probes or not.
fn tune(socket: &OwnedFd) {
    let sock = socket2::SockRef::from(socket);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(5))
        .with_retries(3);
    let _ = sock.set_tcp_keepalive(&keepalive);
    let _ = sock.set_tcp_user_timeout(Some(Duration::from_secs(20)));
}

/// Closing with `SO_LINGER` 0 sends RST and drops what the kernel had not sent: bytes
/// that would otherwise reach the relay when a partition heals, as duplicates.
fn reset(socket: &OwnedFd) {
    let _ = socket2::SockRef::from(socket).set_linger(Some(Duration::ZERO));
}

const CLOSED_WITHOUT_PONG: &str = "the relay closed the connection during authentication, \
     without a PONG (Fluent Bit's in_forward does that when the shared key is wrong: check output.shared_key)";

/// A failed handshake in the agent operator's words, naming the config keys involved.
fn handshake_message(e: &ClientHandshakeError) -> String {
    match e {
        ClientHandshakeError::Refused {
            reason,
            without_user: false,
        } => format!("the relay refused the handshake; its PONG says: {reason:?}"),
        ClientHandshakeError::Refused {
            reason,
            without_user: true,
        } => format!(
            "the relay refused the handshake; its PONG says: {reason:?} (its HELO offered user \
             authentication and output.username is not set: if the relay has users, set \
             output.username and output.password; otherwise check output.shared_key)"
        ),
        ClientHandshakeError::WrongDigest => {
            "the relay's PONG digest is wrong: it does not know our shared key".into()
        }
        ClientHandshakeError::SameHostname => {
            "the relay's PONG claims this agent's own hostname (output.shared_key is not proven by an echoed digest): refused; give the relay a server.hostname of its own".into()
        }
    }
}

fn frame_name(f: &ServerFrame) -> &'static str {
    match f {
        ServerFrame::Helo(_) => "HELO",
        ServerFrame::Pong(_) => "PONG",
        ServerFrame::Ack(_) => "ack",
    }
}

#[cfg(test)]
mod tests {
    //! The output against fake relays on loopback (plain TCP, no key).

    use super::*;
    use crate::config::RelayEntry;
    use sluice_forward::{encode_ack, encode_compressed_packed_forward, gzip_entries, write_entry};
    use sluice_forward::{ClientFrame, EventTime, ServerCodec};
    use tokio::net::TcpListener;

    fn chunk_of(source: &str, id: &str, end: u64) -> Chunk {
        let mut entries = Vec::new();
        write_entry(&mut entries, EventTime::now(), &[("message", b"hi")]);
        let mut frame = BytesMut::new();
        encode_compressed_packed_forward("app", &gzip_entries(&entries), 1, id, None, &mut frame);
        Chunk {
            id: id.into(),
            input: 0,
            source: SourceId(source.into()),
            end,
            count: 1,
            frame: frame.freeze(),
            sent: Box::default(),
        }
    }

    fn chunk(id: &str) -> Chunk {
        let end = id.trim_start_matches('c').parse().unwrap_or(1);
        chunk_of("s", id, end)
    }

    fn output(relays: Vec<RelayEntry>) -> Output {
        let config: OutputConfig = serde_json::from_value(serde_json::json!({
            "relays": relays,
            "insecure": true,
            "ack_timeout": "200ms",
            "probe_interval": "50ms",
            "probe_timeout": "300ms",
            "connect_timeout": "500ms",
            "retry_min": "10ms",
            "retry_max": "50ms",
        }))
        .unwrap();
        Output {
            config,
            agent_id: "agent".into(),
            tls: None,
            metrics: Arc::new(AgentMetrics::default()),
            assignments: None,
        }
    }

    fn addresses(relays: &[&FakeRelay]) -> Vec<RelayEntry> {
        relays
            .iter()
            .map(|r| RelayEntry::Address(r.addr.to_string()))
            .collect()
    }

    #[derive(Clone, Debug)]
    enum Command {
        Ack(String),
        Drain,
    }

    /// A relay that reads chunks and acks each one when told (or at once with
    /// `auto_ack`), answers probes unless `mute`.
    struct FakeRelay {
        addr: std::net::SocketAddr,
        received: Arc<Mutex<Vec<String>>>,
        auto_ack: Arc<std::sync::atomic::AtomicBool>,
        mute: Arc<std::sync::atomic::AtomicBool>,
        commands: tokio::sync::broadcast::Sender<Command>,
        tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
        accept: Mutex<Option<tokio::task::AbortHandle>>,
    }

    impl FakeRelay {
        async fn start() -> FakeRelay {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            Self::serve(listener)
        }

        fn serve(listener: TcpListener) -> FakeRelay {
            let addr = listener.local_addr().unwrap();
            let (commands, _) = tokio::sync::broadcast::channel::<Command>(64);
            let relay = FakeRelay {
                addr,
                received: Arc::default(),
                auto_ack: Arc::default(),
                mute: Arc::default(),
                commands,
                tasks: Arc::default(),
                accept: Mutex::new(None),
            };
            let (received, auto_ack, mute, commands, tasks) = (
                relay.received.clone(),
                relay.auto_ack.clone(),
                relay.mute.clone(),
                relay.commands.clone(),
                relay.tasks.clone(),
            );
            let accept = tokio::spawn({
                let tasks = tasks.clone();
                async move {
                    while let Ok((stream, _)) = listener.accept().await {
                        let (received, auto_ack, mute) =
                            (received.clone(), auto_ack.clone(), mute.clone());
                        let mut commands = commands.subscribe();
                        let conn = tokio::spawn(async move {
                            let (read, mut write) = tokio::io::split(stream);
                            let mut frames =
                                FramedRead::new(read, ServerCodec::new(Limits::default()));
                            let mut mine = Vec::new();
                            let quiet = || mute.load(std::sync::atomic::Ordering::SeqCst);
                            loop {
                                let mut out = BytesMut::new();
                                tokio::select! {
                                    frame = frames.next() => match frame {
                                        Some(Ok(ClientFrame::Events(b))) => {
                                            let id = b.options.chunk.clone().unwrap();
                                            if b.count == 0 {
                                                if !quiet() {
                                                    encode_ack(&id, &mut out);
                                                }
                                            } else {
                                                received.lock().unwrap().push(id.clone());
                                                if auto_ack.load(std::sync::atomic::Ordering::SeqCst) && !quiet() {
                                                    encode_ack(&id, &mut out);
                                                }
                                                mine.push(id);
                                            }
                                        }
                                        _ => return,
                                    },
                                    Ok(command) = commands.recv() => match command {
                                        Command::Ack(id) => if mine.contains(&id) {
                                            encode_ack(&id, &mut out);
                                        },
                                        Command::Drain => {
                                            encode_ack(DRAINING_ACK, &mut out);
                                            let _ = write.write_all(&out).await;
                                            let _ = write.shutdown().await;
                                            return;
                                        }
                                    },
                                }
                                if !out.is_empty() && write.write_all(&out).await.is_err() {
                                    return;
                                }
                            }
                        });
                        tasks.lock().unwrap().push(conn.abort_handle());
                    }
                }
            });
            tasks.lock().unwrap().push(accept.abort_handle());
            *relay.accept.lock().unwrap() = Some(accept.abort_handle());
            relay
        }

        fn received(&self) -> Vec<String> {
            self.received.lock().unwrap().clone()
        }

        fn ack(&self, id: &str) {
            let _ = self.commands.send(Command::Ack(id.into()));
        }

        fn set(&self, flag: &std::sync::atomic::AtomicBool, on: bool) {
            flag.store(on, std::sync::atomic::Ordering::SeqCst);
        }

        /// SIGTERM: no new connections; open ones get DRAINING_ACK and are closed.
        fn kill_listener_and_drain(&self) {
            if let Some(accept) = self.accept.lock().unwrap().take() {
                accept.abort();
            }
            let _ = self.commands.send(Command::Drain);
        }

        /// The process is gone: listener and connections closed.
        fn kill(&self) {
            for t in self.tasks.lock().unwrap().drain(..) {
                t.abort();
            }
        }
    }

    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits for a chunk to reach one of the two relays: (the one it chose, the other).
    async fn chosen<'r>(a: &'r FakeRelay, b: &'r FakeRelay) -> (&'r FakeRelay, &'r FakeRelay) {
        until("the chunk to reach a relay", || {
            !a.received().is_empty() || !b.received().is_empty()
        })
        .await;
        match a.received().is_empty() {
            true => (b, a),
            false => (a, b),
        }
    }

    fn errors(metrics: &AgentMetrics, reason: &str) -> u64 {
        metrics
            .relay_errors
            .get_or_create(&crate::metrics::Reason {
                reason: reason.into(),
            })
            .get()
    }

    struct Running {
        chunks: mpsc::Sender<Chunk>,
        commits: std::sync::mpsc::Receiver<Commit>,
        metrics: Arc<AgentMetrics>,
        task: tokio::task::JoinHandle<()>,
    }

    fn start(out: Output) -> Running {
        let metrics = out.metrics.clone();
        let (chunk_tx, chunk_rx) = mpsc::channel(4);
        let (commit_tx, commits) = std::sync::mpsc::channel();
        let task = tokio::spawn(out.run(chunk_rx, commit_tx, CancellationToken::new()));
        Running {
            chunks: chunk_tx,
            commits,
            metrics,
            task,
        }
    }

    /// The next commit (a blocking recv would stall the test's single-threaded runtime).
    async fn next_commit(run: &Running) -> u64 {
        let mut got = None;
        until("a commit", || {
            got = run.commits.try_recv().ok();
            got.is_some()
        })
        .await;
        got.unwrap().end
    }

    async fn healthy(metrics: &AgentMetrics, n: i64) {
        until("the relays to be healthy", || {
            metrics.relays_healthy.get() == n
        })
        .await;
    }

    #[tokio::test]
    async fn a_late_ack_from_a_relay_that_answers_probes_is_waited_for() {
        let (a, b) = (FakeRelay::start().await, FakeRelay::start().await);
        let run = start(output(addresses(&[&a, &b])));
        let metrics = run.metrics.clone();
        healthy(&metrics, 2).await;
        run.chunks.send(chunk("c1")).await.unwrap();
        let (active, other) = chosen(&a, &b).await;
        // The ack is late: one episode, then probes answered for many probe intervals,
        // and still no move and no resend.
        until("the late ack to be noticed", || {
            metrics.ack_waits.get() == 1
        })
        .await;
        let probes = metrics.probes.get();
        until("ten more answered probes", || {
            metrics.probes.get() >= probes + 10
        })
        .await;
        assert_eq!(metrics.ack_waits.get(), 1);
        assert_eq!(metrics.chunks_resent.get(), 0);
        assert_eq!(metrics.chunks_moved.get(), 0);
        assert!(other.received().is_empty(), "moved to the other relay");
        assert_eq!(active.received(), ["c1"]);
        active.ack("c1");
        until("the ack", || metrics.chunks_acked.get() == 1).await;
        assert_eq!(next_commit(&run).await, 1);
        drop(run.chunks);
        run.task.await.unwrap();
        assert_eq!(errors(&metrics, "unanswered"), 0);
    }

    #[tokio::test]
    async fn a_relay_that_stops_answering_is_left_after_one_unanswered_probe() {
        let (a, b) = (FakeRelay::start().await, FakeRelay::start().await);
        let run = start(output(addresses(&[&a, &b])));
        let metrics = run.metrics.clone();
        healthy(&metrics, 2).await;
        run.chunks.send(chunk("c1")).await.unwrap();
        let (active, other) = chosen(&a, &b).await;
        // Hung: the connection stays open, nothing is answered.
        active.set(&active.mute, true);
        let muted = Instant::now();
        until("the chunk to be resent to the other relay", || {
            other.received() == ["c1"]
        })
        .await;
        // probe_interval + probe_timeout, with room for a loaded machine.
        assert!(
            muted.elapsed() < Duration::from_secs(5),
            "{:?}",
            muted.elapsed()
        );
        assert_eq!(errors(&metrics, "unanswered"), 1);
        assert_eq!(metrics.chunks_moved.get(), 1);
        other.ack("c1");
        until("the ack", || metrics.chunks_acked.get() == 1).await;
        assert_eq!(next_commit(&run).await, 1);
    }

    #[tokio::test]
    async fn sources_spread_by_weight_and_each_stays_on_one_relay() {
        let relays = [
            FakeRelay::start().await,
            FakeRelay::start().await,
            FakeRelay::start().await,
        ];
        for r in &relays {
            r.set(&r.auto_ack, true);
        }
        let mut entries = addresses(&[&relays[0], &relays[1]]);
        entries.push(RelayEntry::Relay(RelaySpec {
            address: relays[2].addr.to_string(),
            weight: 2,
            standby: false,
        }));
        let run = start(output(entries));
        let metrics = run.metrics.clone();
        healthy(&metrics, 3).await;
        const SOURCES: u64 = 400;
        for round in 1..=3u64 {
            for s in 0..SOURCES {
                let c = chunk_of(
                    &format!("app:1:{s}:cafe:0"),
                    &format!("s{s}-{round}"),
                    round,
                );
                run.chunks.send(c).await.unwrap();
            }
        }
        until("every ack", || metrics.chunks_acked.get() == 3 * SOURCES).await;
        let got: Vec<Vec<String>> = relays.iter().map(|r| r.received()).collect();
        for s in 0..SOURCES {
            let holders: Vec<usize> = (0..3)
                .filter(|i| got[*i].iter().any(|id| id.starts_with(&format!("s{s}-"))))
                .collect();
            assert_eq!(holders.len(), 1, "source {s} went to relays {holders:?}");
        }
        let shares: Vec<f64> = got
            .iter()
            .map(|g| g.len() as f64 / (3 * SOURCES) as f64)
            .collect();
        // Weights 1:1:2; 400 sources hash to within a few percent of that.
        for (share, want) in shares.iter().zip([0.25, 0.25, 0.5]) {
            assert!((share - want).abs() < 0.07, "shares {shares:?}");
        }
        // Every source's commits arrive, in order, ending at its last chunk.
        let mut last: HashMap<String, u64> = HashMap::new();
        while let Ok(c) = run.commits.try_recv() {
            let prev = last.insert(c.source.0.clone(), c.end).unwrap_or(0);
            assert!(c.end > prev, "commit went back for {}", c.source);
        }
        assert_eq!(last.len() as u64, SOURCES);
        assert!(last.values().all(|e| *e == 3));
    }

    #[tokio::test]
    async fn commits_never_pass_an_unacknowledged_chunk() {
        let a = FakeRelay::start().await;
        let run = start(output(addresses(&[&a])));
        healthy(&run.metrics, 1).await;
        for id in ["c1", "c2", "c3"] {
            run.chunks.send(chunk(id)).await.unwrap();
        }
        until("three chunks", || a.received().len() == 3).await;
        a.ack("c2");
        a.ack("c3");
        until("two acks", || run.metrics.chunks_acked.get() == 2).await;
        assert!(run.commits.try_recv().is_err(), "committed past c1");
        a.ack("c1");
        assert_eq!(next_commit(&run).await, 3);
    }

    /// Two relays, `failover_after` too long to matter (only a drain or a dead relay
    /// may move a chunk), and chunk c1 sent.
    async fn one_chunk_out_without_failover(
        a: &FakeRelay,
        b: &FakeRelay,
    ) -> (Running, Arc<AgentMetrics>) {
        let mut out = output(addresses(&[a, b]));
        out.config.failover_after = sluice_core::units::Span::secs(600);
        let run = start(out);
        let metrics = run.metrics.clone();
        healthy(&metrics, 2).await;
        run.chunks.send(chunk("c1")).await.unwrap();
        (run, metrics)
    }

    #[tokio::test]
    async fn a_draining_relay_hands_its_sources_over_at_once() {
        let (a, b) = (FakeRelay::start().await, FakeRelay::start().await);
        let (run, metrics) = one_chunk_out_without_failover(&a, &b).await;
        let (active, other) = chosen(&a, &b).await;
        // Drains without acking c1 (it read it: a real relay would have acked it first;
        // here it stands for a chunk the relay never read).
        active.kill_listener_and_drain();
        until("the chunk to reach the other relay", || {
            other.received() == ["c1"]
        })
        .await;
        assert_eq!(errors(&metrics, "draining"), 1);
        other.ack("c1");
        assert_eq!(next_commit(&run).await, 1);
    }

    #[tokio::test]
    async fn a_relay_that_restarts_within_failover_after_gets_its_chunks_back() {
        let (a, b) = (FakeRelay::start().await, FakeRelay::start().await);
        let (run, metrics) = one_chunk_out_without_failover(&a, &b).await;
        let (active, other) = chosen(&a, &b).await;
        active.kill();
        until("refused connections", || errors(&metrics, "connect") >= 2).await;
        let back = FakeRelay::serve(TcpListener::bind(active.addr).await.unwrap());
        back.set(&back.auto_ack, true);
        until("the chunk resent to the restarted relay", || {
            back.received() == ["c1"]
        })
        .await;
        assert_eq!(next_commit(&run).await, 1);
        assert!(other.received().is_empty(), "moved to the other relay");
        assert_eq!(metrics.chunks_moved.get(), 0);
    }

    #[tokio::test]
    async fn a_relay_that_comes_back_takes_its_share_of_the_sources() {
        let b = FakeRelay::start().await;
        b.set(&b.auto_ack, true);
        let down = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a_addr = down.local_addr().unwrap();
        drop(down);
        let run = start(output(vec![
            RelayEntry::Address(a_addr.to_string()),
            RelayEntry::Address(b.addr.to_string()),
        ]));
        let metrics = run.metrics.clone();
        healthy(&metrics, 1).await;
        for s in 0..10 {
            run.chunks
                .send(chunk_of(&format!("src-{s}"), &format!("s{s}-1"), 1))
                .await
                .unwrap();
        }
        until("ten acks", || metrics.chunks_acked.get() == 10).await;
        let a = FakeRelay::serve(TcpListener::bind(a_addr).await.unwrap());
        a.set(&a.auto_ack, true);
        healthy(&metrics, 2).await;
        for s in 0..10 {
            run.chunks
                .send(chunk_of(&format!("src-{s}"), &format!("s{s}-2"), 2))
                .await
                .unwrap();
        }
        until("twenty acks", || metrics.chunks_acked.get() == 20).await;
        assert_eq!(a.received().len(), 5, "a got {:?}", a.received());
        assert_eq!(b.received().len(), 15);
    }

    /// A lane that gave its chunks back and reconnected before the dispatcher read the
    /// evacuation must not get the source's next chunk ahead of them (the relay's dedup
    /// would then trim the older ones as duplicates: lost).
    #[tokio::test]
    async fn a_reconnect_before_the_evacuation_is_read_keeps_the_source_in_order() {
        let out = output(vec![
            RelayEntry::Address("127.0.0.1:1".into()),
            RelayEntry::Address("127.0.0.1:2".into()),
        ]);
        let lanes: Vec<Arc<Lane>> = out
            .config
            .relays
            .iter()
            .map(|r| {
                let lane = Lane::new(r.spec());
                let mut state = lane.lock();
                (state.healthy, state.tried) = (true, true);
                drop(state);
                Arc::new(lane)
            })
            .collect();
        let (commits, _rx) = std::sync::mpsc::channel();
        let mut d = Dispatcher {
            out: &out,
            lanes: &lanes,
            sources: HashMap::new(),
            assigned: HashMap::new(),
            counts: vec![0; 2],
            recent: HashSet::new(),
            pruned: Instant::now(),
            dirty: false,
            chunks: 0,
            bytes: 0,
            commits,
        };
        d.add(chunk_of("s", "c1", 1));
        d.add(chunk_of("s", "c2", 2));
        let key = (0, SourceId("s".into()));
        let lane = d.sources[&key].lane.unwrap();
        let mut window: VecDeque<InFlight> = std::iter::from_fn(|| lanes[lane].pop())
            .map(|chunk| InFlight {
                chunk,
                sent_at: None,
            })
            .collect();
        let (tx, mut rx) = mpsc::unbounded_channel();
        out.evacuate(lane, &lanes[lane], &mut window, &tx);
        // The lane reconnects at once and says so, behind its evacuation.
        let generation = lanes[lane].lock().generation;
        tx.send(Event::Reachable { lane, generation }).unwrap();
        d.add(chunk_of("s", "c3", 3));
        while let Ok(event) = rx.try_recv() {
            d.event(event);
        }
        let queued = |l: usize| -> Vec<String> {
            lanes[l].lock().queue.iter().map(|c| c.id.clone()).collect()
        };
        assert_eq!(queued(1 - lane), ["c1", "c2", "c3"]);
        assert!(queued(lane).is_empty());
        assert!(lanes[lane].healthy(), "the reconnect was not taken");
    }

    /// Chunks re-read after a restart go to the relay that had their source before:
    /// the one holding its dedup state, however the sources arrive this time.
    #[tokio::test]
    async fn sources_keep_their_relay_across_a_restart() {
        let (a, b) = (FakeRelay::start().await, FakeRelay::start().await);
        for r in [&a, &b] {
            r.set(&r.auto_ack, true);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ASSIGNMENTS_FILE);
        let life = |n: u64, sources: Vec<usize>| {
            let mut out = output(addresses(&[&a, &b]));
            out.assignments = Some(path.clone());
            async move {
                let run = start(out);
                healthy(&run.metrics, 2).await;
                for s in &sources {
                    let c = chunk_of(&format!("src-{s}"), &format!("s{s}-{n}"), n);
                    run.chunks.send(c).await.unwrap();
                }
                let metrics = run.metrics.clone();
                until("the acks", || {
                    metrics.chunks_acked.get() == sources.len() as u64
                })
                .await;
                drop(run.chunks);
                run.task.await.unwrap();
            }
        };
        life(1, (0..8).collect()).await;
        let on_b: Vec<usize> = (0..8)
            .filter(|s| b.received().contains(&format!("s{s}-1")))
            .collect();
        assert_eq!(on_b.len(), 4, "b got {:?}", b.received());
        // Only b's sources this time: placed afresh, half of them would go to a.
        life(2, on_b.clone()).await;
        for s in &on_b {
            assert!(
                b.received().contains(&format!("s{s}-2")),
                "src-{s} moved: a {:?}",
                a.received()
            );
        }
    }
}
