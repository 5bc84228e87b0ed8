//! What a sink is, as the driver and the dispatch see it: the [`SinkSpec`] a sink type's
//! config implements, the running [`Deliver`], and what they exchange ([`Gathered`],
//! [`Delivered`], [`DeliverError`]). A leaf: the sink folders and the driver build on it.

use std::time::Duration;

use futures::future::BoxFuture;
use sluice_spool::Position;

use crate::envelope::hour_of;
use crate::ledger::{Counts, SinkCounts, SpoolLoss};
use crate::readback::Found;
use crate::record::{self, SpooledChunk};

/// What a sink type declares about itself; implemented by each type's config struct.
pub trait SinkSpec {
    /// Checks what serde cannot (values that parse but make no sense). `name` is the
    /// sink's name, for the message.
    fn validate(&self, name: &str) -> Result<(), String> {
        let _ = name;
        Ok(())
    }

    /// What `--check-config` prints for this sink after its name, e.g. "kafka topic t at b".
    fn describe(&self) -> String;

    /// The running destination.
    fn build(&self, ctx: &SinkContext<'_>) -> Result<Box<dyn Deliver>, String>;

    /// What is really in the destination, read back independently of the ledger, for
    /// `reconcile`; `None` for a sink that keeps nothing (discard).
    fn read_back<'a>(
        &'a self,
        ctx: &'a ReadBackContext<'a>,
    ) -> BoxFuture<'a, Result<Option<Found>, String>>;
}

/// What building a sink may need beyond its own config.
pub struct SinkContext<'a> {
    /// The sink's name (`[[sink]] name`).
    pub name: &'a str,
    /// This relay's id (`relay.id`), part of object keys.
    pub relay: &'a str,
    /// The spool's incarnation ([`crate::incarnation`]), part of object keys.
    pub incarnation: &'a str,
    /// The relay's data directory: a sink's own files go in
    /// [`crate::sinks::state::state_dir`] under it.
    pub data_dir: &'a std::path::Path,
    pub metrics: std::sync::Arc<crate::metrics::RelayMetrics>,
    /// The clock hours close by ([`crate::clock`]).
    pub clock: crate::clock::Clock,
}

/// What reading a sink back may need beyond its own config.
pub struct ReadBackContext<'a> {
    pub relay: &'a str,
    /// The spool's incarnation, when it has one: object keys of other incarnations (an
    /// earlier spool of this relay id) are not this ledger's.
    pub incarnation: Option<&'a str>,
    /// How long reading Kafka may take before giving up.
    pub kafka_timeout: Duration,
}

/// Spooled chunks gathered for one delivery: raw spool payloads back to back.
pub struct Gathered {
    buf: Vec<u8>,
    bounds: Vec<(usize, usize)>,
    /// Where this gathering started (part of object keys) and the cursor after it.
    pub start: Position,
    pub end: Position,
    pub events: u64,
    /// Bytes of the gathered chunks' entries (msgpack), as the sinks count `bytes`.
    pub entry_bytes: u64,
    /// Spool records that did not decode (counted in nothing above); a sink that reads
    /// the chunks meets them as errors, one that does not must refuse the batch.
    pub undecodable: usize,
    pub oldest_received: Option<u64>,
    /// What the sink is given, per tag and hour, counted once here by the driver (the
    /// ledger's "offered"), so that a sink taking everything need not count again.
    pub offered: Counts,
    /// Damaged spool stretches passed over inside this gathering: recorded in the
    /// sink's counts with the delivery, like `offered`, so a crash cannot count them twice.
    pub(crate) lost: SpoolLoss,
    /// Records a sink that [`Deliver::absorbs`] has taken (no longer in `chunks`), and
    /// their bytes.
    absorbed: usize,
    absorbed_bytes: usize,
    /// Set by the driver when the delivery is cut: the gathering reached the spool's
    /// committed end then (everything acknowledged by then is in it or delivered before).
    pub caught_up: bool,
    /// When the driver cut it (taken before it looked at the spool's end).
    pub cut_at: Option<std::time::Instant>,
}

impl Gathered {
    pub(crate) fn new(start: Position) -> Self {
        Gathered {
            buf: Vec::new(),
            bounds: Vec::new(),
            start,
            end: start,
            events: 0,
            entry_bytes: 0,
            undecodable: 0,
            oldest_received: None,
            offered: Counts::default(),
            lost: SpoolLoss::default(),
            absorbed: 0,
            absorbed_bytes: 0,
            caught_up: false,
            cut_at: None,
        }
    }

    pub(crate) fn clear(&mut self, start: Position) {
        self.buf.clear();
        self.bounds.clear();
        self.start = start;
        self.end = start;
        self.events = 0;
        self.entry_bytes = 0;
        self.undecodable = 0;
        self.oldest_received = None;
        self.offered = Counts::default();
        self.lost = SpoolLoss::default();
        self.absorbed = 0;
        self.absorbed_bytes = 0;
        self.caught_up = false;
        self.cut_at = None;
    }

    /// Drops the chunks a sink has absorbed; the counts and positions stay.
    pub(crate) fn absorbed(&mut self) {
        self.absorbed += self.bounds.len();
        self.absorbed_bytes += self.buf.len();
        self.buf.clear();
        self.bounds.clear();
    }

    /// Passes over a damaged spool stretch: the gathering ends after it.
    pub(crate) fn pass_over(&mut self, damage: &sluice_spool::Damage) {
        self.lost.add(damage);
        self.end = damage.to;
    }

    /// Adds one spool record; `next` is the spool position after it.
    pub(crate) fn push(&mut self, record: &[u8], next: Position) {
        let a = self.buf.len();
        self.buf.extend_from_slice(record);
        self.bounds.push((a, self.buf.len()));
        self.end = next;
        match record::decode(record) {
            Ok(chunk) => {
                self.events += chunk.count as u64;
                self.entry_bytes += chunk.entries.len() as u64;
                self.oldest_received.get_or_insert(chunk.received_at);
                self.count_offered(&chunk);
            }
            Err(_) => self.undecodable += 1,
        }
    }

    /// Counts a spooled chunk's events per tag and event-time hour into `offered`.
    fn count_offered(&mut self, chunk: &SpooledChunk<'_>) {
        let offered = &mut self.offered;
        chunk.count_hours(|hour, n| offered.add(chunk.tag, hour, n));
    }

    /// Bytes of spool records gathered (absorbed ones included).
    pub fn bytes(&self) -> usize {
        self.buf.len() + self.absorbed_bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bounds.is_empty() && self.absorbed == 0
    }

    /// The gathered chunks, decoded (borrowing the buffer).
    pub fn chunks(&self) -> impl Iterator<Item = Result<SpooledChunk<'_>, record::RecordError>> {
        self.bounds
            .iter()
            .map(|&(a, b)| record::decode(&self.buf[a..b]))
    }
}

/// What one delivery did.
#[derive(Default)]
pub struct Delivered {
    /// Events the destination took, and events it could never take (skipped, counted).
    pub counts: SinkCounts,
    pub bytes: u64,
}

impl Delivered {
    pub fn delivered(&mut self, tag: &str, time: sluice_forward::EventTime) {
        self.counts.delivered.add(tag, hour_of(time), 1);
    }
    pub fn dropped(&mut self, tag: &str, time: sluice_forward::EventTime) {
        self.counts.dropped.add(tag, hour_of(time), 1);
    }
}

/// Why a delivery failed, as far as retrying is concerned. Either way the data stays in
/// the spool and the delivery is tried again; the kind decides how soon and how loudly.
#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    /// Worth retrying soon: a timeout, a destination that is down or overloaded.
    #[error("{0}")]
    Transient(String),
    /// Will fail again until someone acts: refused credentials or permissions, a
    /// destination that does not exist, a spool record that cannot be decoded. Logged at
    /// error level, counted in `sluice_relay_sink_permanent_errors_total`, retried only
    /// every `retry_max`.
    #[error("{0}")]
    Permanent(String),
    /// A sink that [`Deliver::absorbs`] lost what it absorbed (a local write failed):
    /// the driver reads the same gathering again from the spool and retries.
    #[error("{0}")]
    Reread(String),
}

impl DeliverError {
    pub fn is_permanent(&self) -> bool {
        matches!(self, DeliverError::Permanent(_))
    }
}

/// An event that cannot be written as JSON will not become writable by retrying.
impl From<sluice_forward::DecodeError> for DeliverError {
    fn from(e: sluice_forward::DecodeError) -> Self {
        DeliverError::Permanent(e.to_string())
    }
}

impl From<crate::record::RecordError> for DeliverError {
    fn from(e: crate::record::RecordError) -> Self {
        DeliverError::Permanent(e.to_string())
    }
}

/// What [`Deliver::deliver`] returns.
pub type DeliverFuture<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Delivered, DeliverError>> + Send + 'a>,
>;

/// A destination.
pub trait Deliver: Send {
    /// Delivers every event of `batch`, or fails as a whole (and is called again with the
    /// same batch). An event the destination can never take (e.g. larger than Kafka's
    /// message limit) is skipped, counted in `dropped` and logged, not retried forever.
    fn deliver<'a>(&'a mut self, batch: &'a Gathered) -> DeliverFuture<'a>;

    /// How much to gather before delivering, and how long the oldest chunk may wait.
    fn gather_limits(&self) -> (usize, Duration);

    /// Whether the sink takes chunks as they are gathered ([`Deliver::absorb`]), so the
    /// driver holds none in memory (the object sink writes them to local files). Then
    /// [`Deliver::deliver`] is called with every chunk of the gathering absorbed, and
    /// again with the same (absorbed) gathering after a failure.
    fn absorbs(&self) -> bool {
        false
    }

    /// Takes the gathering's chunks (only called when [`Deliver::absorbs`]); returns
    /// whether the gathering should be delivered now. An error means the sink dropped
    /// what it had absorbed: the driver reads the gathering again.
    fn absorb(&mut self, _batch: &Gathered) -> Result<bool, DeliverError> {
        Ok(false)
    }

    /// When the sink wants a delivery whatever is gathered, even nothing (the object
    /// sink's next hour close).
    fn due_by(&self) -> Option<std::time::Instant> {
        None
    }

    /// Called for each gathering before its [`Deliver::intent_state`] is saved and its
    /// first attempt, and again after an error, until it succeeds: what the sink must
    /// settle before anything of the gathering is written (the Kafka sink's topics and
    /// the partition marks a read-back would start from).
    fn prepare<'a>(
        &'a mut self,
        _batch: &'a Gathered,
    ) -> futures::future::BoxFuture<'a, Result<(), DeliverError>> {
        Box::pin(async { Ok(()) })
    }

    /// State the sink needs after a crash to avoid delivering twice, saved atomically
    /// with the cursor after every successful delivery.
    fn recovery_state(&self) -> Option<serde_json::Value> {
        None
    }

    /// State to save (with the unchanged cursor) before a delivery starts, so that a crash
    /// in the middle of it can be recognised; `None` saves nothing.
    fn intent_state(&self) -> Option<serde_json::Value> {
        None
    }

    /// Whether a delivery cut short by a crash must be repeated with exactly the same
    /// events (the object sink: its keys are create-only, so the same key must get the
    /// same content). Then the driver records where each gathering ends before it is
    /// delivered, and after a crash gathers up to there again, whatever the limits.
    fn replays_exactly(&self) -> bool {
        false
    }

    /// Called once at start, before the first delivery. An error stops the relay from
    /// starting (the object sink's lease held by another live relay with this id); a
    /// destination that cannot be reached is not an error here.
    fn start(&mut self) -> futures::future::BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }

    /// Called once when the sink stops, after its last delivery.
    fn finish(&mut self) -> futures::future::BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// Called once at start with the last state saved by [`Deliver::recovery_state`] or
    /// [`Deliver::intent_state`].
    fn restore(&mut self, _state: Option<serde_json::Value>) {}
}
