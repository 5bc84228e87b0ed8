//! Kafka sink: one message per event, to the topic its template gives, keyed by its
//! source id (by default) so that one source's events share a partition, with headers
//! `tag`, `source`, `seq`, `relay` and `agent`, and the event's own time as the
//! message's CreateTime.
//!
//! The producer is idempotent with `acks=all`; a gathered batch counts as delivered only
//! when the broker acknowledged every message of it. An event larger than the topic
//! allows (`max_message`, lowered at start to the topic's `max.message.bytes`, or the
//! broker's refusal) is kept in the dead-letter location with its reason and provenance
//! (`deadletter.rs`) and the stream goes on.
//!
//! No duplicates from the relay's own retries or crashes, and recovery bounded by what
//! could have been written, however large and shared the topic (`recovery.rs`):
//! - before a gathering is produced (`prepare`) the sink takes the *marks* of its topics
//!   (every partition's end) and saves them in the intent, with the cursor;
//! - a retry after a failed attempt (a timed-out message may have landed anyway), and the
//!   first delivery after a crash in the middle of one, first read this relay's messages
//!   back from those marks and skip the events whose `(source, seq)` they find;
//! - a crash's marks are carried (and saved again) until a delivery has gone past the
//!   end of the gathering the crash cut short, so a second crash before then still
//!   reads back from the first one's marks.
//!
//! Order: within one attempt librdkafka's idempotent producer keeps each partition's
//! messages in order, retries included. An attempt stops producing at the first failure
//! it sees; its retry sends only what the read-back did not find, so an event whose
//! message failed can land after later events of the same source that were already in
//! flight (never twice). Its `seq` header tells its place.
//! Events without provenance (a client that sends no source id) cannot be found by a
//! read-back: a crash in the middle of their delivery can repeat them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::BaseConsumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use sluice_spool::Position;

use super::config::{KafkaSink, KafkaValue};
use super::deadletter::{DeadLetters, Letter};
use super::recovery::{self, Found, TopicMarks};
use super::template::{legal_topic, Template};
use crate::envelope;
use crate::metrics::{RelayMetrics, SinkReason};
use crate::record::Mark;
use crate::sinks::spec::{Deliver, DeliverError, DeliverFuture, Delivered, Gathered};

/// How long metadata about a topic (whether it exists, its partitions) is trusted.
const TOPIC_INFO_TTL: Duration = Duration::from_secs(30);
/// Bytes a record batch of one message adds around the event (batch header, record
/// framing, headers), kept free under the topic's limit.
const BATCH_OVERHEAD: usize = 1024;
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// A read-back fails when it read nothing for this long (a long one that progresses goes on).
const READ_BACK_STALL: Duration = Duration::from_secs(60);
/// After this many read-backs in a row that stalled (a broker that does not serve a
/// partition to its end), the delivery goes on without one: what the cut-short delivery
/// wrote may then be written again (logged at error level, counted in
/// `sluice_relay_kafka_readback_abandoned_total`) rather than the sink waiting forever.
const READ_BACK_GIVE_UP: u32 = 3;

/// Distinct topics a template may route to; events for more go to `default_topic`
/// (`reason="too_many_topics"`), so a high-cardinality field cannot grow the sink.
const MAX_TOPICS: usize = 1000;

/// Where each event of a gathering stands across attempts.
const PENDING: u8 = 0;
/// The broker acknowledged it (or a read-back found it).
const ACKED: u8 = 1;
/// Kept in the dead-letter location.
const DEAD: u8 = 2;

pub struct KafkaWriter {
    name: String,
    relay: String,
    topic: Template,
    default_topic: Option<String>,
    key: Template,
    key_is_source: bool,
    value: KafkaValue,
    raw_field: String,
    max_message: usize,
    client: ClientConfig,
    producer: ThreadedProducer<Acks>,
    consumer: Arc<BaseConsumer>,
    properties: BTreeMap<String, String>,
    dead: DeadLetters,
    metrics: Arc<RelayMetrics>,

    /// Topics by route number, and the route of each event of the prepared gathering
    /// (empty when every event goes to route 0).
    topics: Vec<String>,
    route_of: HashMap<String, u32>,
    routes: Vec<u32>,
    topic_info: HashMap<String, (Vec<i32>, Instant)>,
    /// The gathering `routes` and `marks` belong to.
    prepared: Option<Position>,
    /// Where this gathering's topics ended before it was produced (with a crash's
    /// carried marks, the earlier of the two).
    marks: TopicMarks,
    /// The end of the furthest gathering the marks cover.
    until: Position,
    /// From a crash in the middle of a delivery: its marks and where its gathering
    /// ended. Kept until a delivery ends at or past that.
    carry: Option<(TopicMarks, Position)>,
    /// Whether this run read back from the carried marks already.
    carried_read: bool,
    /// This relay's events found in Kafka by the last read-back: not sent again.
    found: Found,
    /// The batch of a failed attempt and where each of its events stands
    /// ([`PENDING`], [`ACKED`], [`DEAD`]).
    retry: Option<(Position, Vec<u8>)>,
    /// A failed attempt met a topic that no longer exists: route the retry again.
    replan: bool,
    /// Read-backs of this gathering that stalled in a row (see [`READ_BACK_GIVE_UP`]).
    stalls: u32,

    buf: Vec<u8>,
    text: String,
    /// What the producer's delivery reports said, taken as they come.
    settled: Vec<(usize, Option<KafkaError>)>,
}

/// Keeps messages and batches under a topic's `max.message.bytes` (`limit`): lowers
/// `batch.size` and `message.max.bytes` in `client` (unless the sink's `properties` set
/// them) and returns the new largest message, or `None` when all fit already.
pub(crate) fn fit_to_limit(
    client: &mut ClientConfig,
    properties: &std::collections::BTreeMap<String, String>,
    max_message: usize,
    limit: usize,
) -> Option<usize> {
    let fits = limit.saturating_sub(BATCH_OVERHEAD).max(1);
    let batch: usize = client
        .get("batch.size")
        .and_then(|b| b.parse().ok())
        .unwrap_or(1_000_000);
    if fits >= max_message && fits >= batch {
        return None;
    }
    if !properties.contains_key("batch.size") {
        client.set("batch.size", fits.min(batch).to_string());
    }
    if !properties.contains_key("message.max.bytes") {
        client.set("message.max.bytes", limit.max(1000).to_string());
    }
    Some(max_message.min(fits))
}

/// The topic's `max.message.bytes`, as the broker reports it (`None` when it does not).
pub(crate) async fn topic_max_message(
    client: &ClientConfig,
    topic: &str,
) -> Result<Option<usize>, String> {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> =
        client.create().map_err(|e| format!("admin client: {e}"))?;
    let opts = AdminOptions::new().request_timeout(Some(ADMIN_TIMEOUT));
    let results = admin
        .describe_configs(&[ResourceSpecifier::Topic(topic)], &opts)
        .await
        .map_err(|e| format!("describe configs: {e}"))?;
    for result in results {
        let resource = result.map_err(|code| format!("describe configs of {topic}: {code:?}"))?;
        let value = resource
            .entries
            .iter()
            .find(|e| e.name == "max.message.bytes")
            .and_then(|e| e.value.as_deref())
            .and_then(|v| v.trim().parse::<usize>().ok());
        if value.is_some() {
            return Ok(value);
        }
    }
    Ok(None)
}

/// The producer's settings for a sink: idempotent, `acks=all`, the sink's batching,
/// compression and timeouts, then its own properties (TLS, SASL, ...). `replay --into
/// kafka` produces with the same.
pub(crate) fn producer_config(cfg: &KafkaSink) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &cfg.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", &cfg.compression)
        .set("linger.ms", cfg.linger.get().as_millis().to_string())
        .set(
            "batch.size",
            cfg.batch_size.as_u64().min(i32::MAX as u64).to_string(),
        )
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .set(
            "message.timeout.ms",
            cfg.delivery_timeout.get().as_millis().to_string(),
        )
        .set(
            "message.max.bytes",
            (cfg.max_message.as_u64() + 64 * 1024).to_string(),
        );
    for (k, v) in &cfg.properties {
        client.set(k, v);
    }
    client
}

impl KafkaWriter {
    pub fn new(
        name: &str,
        relay: &str,
        data_dir: &std::path::Path,
        metrics: Arc<RelayMetrics>,
        cfg: &KafkaSink,
    ) -> Result<KafkaWriter, String> {
        let client = producer_config(cfg);
        let producer = Acks::producer(&client)
            .map_err(|e| format!("sink {name:?}: cannot create the Kafka producer: {e}"))?;
        let consumer = recovery::consumer(&cfg.brokers, &cfg.properties, "sluice-marks")
            .map_err(|e| format!("sink {name:?}: {e}"))?;
        let dead = DeadLetters::new(
            &cfg.dead_letter_url,
            &cfg.dead_letter_options,
            data_dir,
            name,
            relay,
        )
        .map_err(|e| format!("sink {name:?}: {e}"))?;
        let topic = Template::parse(&cfg.topic).map_err(|e| format!("sink {name:?}: topic {e}"))?;
        let key = Template::parse(&cfg.key).map_err(|e| format!("sink {name:?}: key {e}"))?;
        let mut w = KafkaWriter {
            name: name.to_string(),
            relay: relay.to_string(),
            key_is_source: cfg.key == "{source}",
            topic,
            default_topic: cfg.default_topic.clone(),
            key,
            value: cfg.value,
            raw_field: cfg.raw_field.clone(),
            max_message: cfg.max_message.as_usize(),
            client,
            producer,
            consumer: Arc::new(consumer),
            properties: cfg.properties.clone(),
            dead,
            metrics,
            topics: Vec::new(),
            route_of: HashMap::new(),
            routes: Vec::new(),
            topic_info: HashMap::new(),
            prepared: None,
            marks: TopicMarks::new(),
            until: Position::default(),
            carry: None,
            carried_read: false,
            found: Found::default(),
            retry: None,
            replan: false,
            stalls: 0,
            buf: Vec::with_capacity(4096),
            text: String::new(),
            settled: Vec::new(),
        };
        if let Some(t) = w.topic.constant() {
            let t = t.to_string();
            w.route(&t);
        }
        Ok(w)
    }

    /// The route number of `topic`, new or known.
    fn route(&mut self, topic: &str) -> u32 {
        if let Some(r) = self.route_of.get(topic) {
            return *r;
        }
        let r = self.topics.len() as u32;
        self.topics.push(topic.to_string());
        self.route_of.insert(topic.to_string(), r);
        r
    }

    fn count(&self, reason: &str, n: u64) {
        if n > 0 {
            self.metrics
                .kafka_rerouted
                .get_or_create(&SinkReason {
                    sink: self.name.clone(),
                    reason: reason.into(),
                })
                .inc_by(n);
        }
    }

    /// Keeps batches and messages under the topic's `max.message.bytes` (`limit`):
    /// lowers `max_message` and, unless `properties` set them, the producer's
    /// `batch.size` and `message.max.bytes`, with a new producer (none was used yet).
    fn fit_to_topic(&mut self, limit: usize) -> Result<(), String> {
        let Some(max) = fit_to_limit(&mut self.client, &self.properties, self.max_message, limit)
        else {
            return Ok(());
        };
        self.max_message = max;
        let new = Acks::producer(&self.client).map_err(|e| {
            format!(
                "sink {:?}: cannot create the Kafka producer: {e}",
                self.name
            )
        })?;
        // Dropping a producer joins librdkafka's threads: not on the runtime.
        let old = std::mem::replace(&mut self.producer, new);
        tokio::task::spawn_blocking(move || drop(old));
        tracing::info!(sink = %self.name, topic = %self.topics.first().map_or("", |t| t.as_str()), max_message_bytes = limit, max_message = self.max_message,
            "the topic's max.message.bytes is below the producer's batch size or max_message: batches and messages are kept under it");
        Ok(())
    }

    /// Partitions of the topics, from metadata at most [`TOPIC_INFO_TTL`] old (none: the
    /// topic does not exist).
    async fn partitions_of(&mut self, topics: &[String]) -> Result<Vec<Vec<i32>>, DeliverError> {
        let stale: Vec<String> = topics
            .iter()
            .filter(|t| {
                self.topic_info
                    .get(*t)
                    .is_none_or(|(_, at)| at.elapsed() > TOPIC_INFO_TTL)
            })
            .cloned()
            .collect();
        if !stale.is_empty() {
            let consumer = self.consumer.clone();
            let fresh = tokio::task::spawn_blocking(move || {
                stale
                    .into_iter()
                    .map(|t| recovery::partitions(&consumer, &t, ADMIN_TIMEOUT).map(|p| (t, p)))
                    .collect::<Result<Vec<_>, recovery::Failure>>()
            })
            .await
            .map_err(|e| DeliverError::Transient(e.to_string()))?
            .map_err(failed)?;
            for (t, p) in fresh {
                self.topic_info.insert(t, (p, Instant::now()));
            }
        }
        Ok(topics
            .iter()
            .map(|t| {
                self.topic_info
                    .get(t)
                    .map(|(p, _)| p.clone())
                    .unwrap_or_default()
            })
            .collect())
    }

    /// Routes every event of `batch` to its topic and takes the marks of those topics.
    /// Routing the same gathering again (`replan`, after a topic vanished) keeps the
    /// earlier of the old and the new marks: the saved intent's stay valid.
    async fn plan(&mut self, batch: &Gathered) -> Result<(), DeliverError> {
        let again = self.prepared == Some(batch.start);
        self.routes.clear();
        let mut used = vec![false; self.topics.len()];
        // (reason, events) sent to the default topic; counted once routing succeeded.
        let mut rerouted: Vec<(&'static str, u64)> = Vec::new();
        if self.topic.constant().is_some() {
            used = vec![true];
        } else {
            let default = self.default_topic.clone().unwrap_or_default();
            let default_route = self.route(&default);
            // Whatever this gathering's topics, events may be sent to the default one.
            if used.len() <= default_route as usize {
                used.resize(default_route as usize + 1, false);
            }
            used[default_route as usize] = true;
            let (mut missing, mut invalid, mut too_many) = (0, 0, 0);
            let template = self.topic.clone();
            for chunk in batch.chunks() {
                let chunk = chunk?;
                for event in chunk.events() {
                    let (entry, _) = event?;
                    let r = match template.render(
                        &mut self.text,
                        chunk.tag,
                        chunk.source,
                        entry.record,
                    ) {
                        Ok(()) if legal_topic(&self.text) => {
                            match self.route_of.get(self.text.as_str()) {
                                Some(r) => *r,
                                None if self.topics.len() < MAX_TOPICS => {
                                    let t = std::mem::take(&mut self.text);
                                    let r = self.route(&t);
                                    self.text = t;
                                    r
                                }
                                None => {
                                    too_many += 1;
                                    default_route
                                }
                            }
                        }
                        Ok(()) => {
                            invalid += 1;
                            default_route
                        }
                        Err(_) => {
                            missing += 1;
                            default_route
                        }
                    };
                    self.routes.push(r);
                    if used.len() <= r as usize {
                        used.resize(r as usize + 1, false);
                    }
                    used[r as usize] = true;
                }
            }
            rerouted.extend([
                ("missing_field", missing),
                ("invalid_topic", invalid),
                ("too_many_topics", too_many),
            ]);
        }
        let names: Vec<String> = used
            .iter()
            .enumerate()
            .filter(|(_, u)| **u)
            .map(|(r, _)| self.topics[r].clone())
            .collect();
        let parts = self.partitions_of(&names).await?;
        let fallback = self.default_topic.as_deref().or(self.topic.constant());
        let mut gone = Vec::new();
        for (name, parts) in names.iter().zip(&parts) {
            if !parts.is_empty() {
                continue;
            }
            if Some(name.as_str()) == fallback {
                return Err(DeliverError::Permanent(format!(
                    "topic {name:?} does not exist in Kafka at {} (create it; the sink does not)",
                    self.client.get("bootstrap.servers").unwrap_or("")
                )));
            }
            gone.push(self.route_of[name]);
        }
        if !gone.is_empty() {
            let default_route = self.route_of[fallback.unwrap_or("")];
            let mut unknown = 0;
            for r in self.routes.iter_mut() {
                if gone.contains(r) {
                    *r = default_route;
                    unknown += 1;
                }
            }
            rerouted.push(("unknown_topic", unknown));
            tracing::warn!(sink = %self.name, topics = ?gone.iter().map(|r| &self.topics[*r as usize]).collect::<Vec<_>>(), events = unknown,
                "topics rendered for these events do not exist: they go to default_topic (sluice_relay_kafka_rerouted_total{{reason=\"unknown_topic\"}})");
        }
        let targets: Vec<(String, Vec<i32>)> = names
            .into_iter()
            .zip(parts)
            .filter(|(_, p)| !p.is_empty())
            .collect();
        let consumer = self.consumer.clone();
        let marks = tokio::task::spawn_blocking(move || {
            let refs: Vec<(&str, &[i32])> = targets
                .iter()
                .map(|(t, p)| (t.as_str(), p.as_slice()))
                .collect();
            recovery::marks(&consumer, &refs, ADMIN_TIMEOUT)
        })
        .await
        .map_err(|e| DeliverError::Transient(e.to_string()))?
        .map_err(failed)?;
        if again {
            self.marks = recovery::earliest_of_topics(&self.marks, &marks);
        } else {
            self.marks = marks;
            self.until = batch.end;
        }
        if let Some((carried, end)) = &self.carry {
            self.marks = recovery::earliest_of_topics(carried, &self.marks);
            self.until = self.until.max(*end);
        }
        for (reason, n) in rerouted {
            self.count(reason, n);
        }
        Ok(())
    }

    /// Reads back what this relay wrote after the marks.
    async fn read_back(&mut self, why: &str) -> Result<(), DeliverError> {
        let (from, relay) = (self.marks.clone(), self.relay.clone());
        let (brokers, properties) = (
            self.client
                .get("bootstrap.servers")
                .unwrap_or("")
                .to_string(),
            self.properties.clone(),
        );
        let started = Instant::now();
        // A consumer of its own for each read-back: nothing an earlier outage left
        // queued in a long-lived one meets it.
        let found = tokio::task::spawn_blocking(move || {
            let consumer = recovery::consumer(&brokers, &properties, "sluice-read-back")
                .map_err(recovery::Failure::plain)?;
            recovery::read_back(&consumer, &from, &relay, READ_BACK_STALL)
        })
        .await
        .map_err(|e| DeliverError::Transient(e.to_string()))?;
        let found = match found {
            Ok(found) => found,
            Err(f) if f.stalled && self.stalls + 1 >= READ_BACK_GIVE_UP => {
                self.stalls = 0;
                self.metrics
                    .kafka_readback_abandoned
                    .get_or_create(&self.metrics.sink(&self.name))
                    .inc();
                tracing::error!(sink = %self.name, why, error = %f.message, stalls = READ_BACK_GIVE_UP,
                    "the read-back cannot reach the end of the topic (the broker does not serve it); delivering without it: events of the delivery cut short that are already in Kafka are written again (duplicates, findable by source and seq)");
                self.found = Found::default();
                return Ok(());
            }
            Err(f) => {
                if f.stalled {
                    self.stalls += 1;
                }
                return Err(failed(f));
            }
        };
        self.stalls = 0;
        let label = self.metrics.sink(&self.name);
        self.metrics
            .kafka_readback_messages
            .get_or_create(&label)
            .inc_by(found.messages);
        self.metrics
            .kafka_readback_seconds
            .get_or_create(&label)
            .set(started.elapsed().as_secs_f64());
        tracing::info!(sink = %self.name, why, messages = found.messages, events = found.events(), took = ?started.elapsed(),
            "read back this relay's messages after the marks; the events found will not be sent again");
        self.found = found;
        Ok(())
    }

    /// The message value of one event into `self.buf`.
    fn value_of(
        &mut self,
        time: sluice_forward::EventTime,
        tag: &str,
        source: Option<&str>,
        mark: Mark,
        record: &[u8],
    ) -> Result<bool, DeliverError> {
        self.buf.clear();
        if self.value == KafkaValue::Raw {
            if let Ok(Some(raw)) = sluice_forward::record_field(record, &self.raw_field) {
                self.buf.extend_from_slice(raw);
                return Ok(true);
            }
        }
        envelope::write(&mut self.buf, time, tag, source, mark, record)
            .map_err(|e| DeliverError::Permanent(e.to_string()))?;
        Ok(self.value == KafkaValue::Envelope)
    }

    /// Keeps the refused events of `batch` (by index) in the dead-letter location.
    async fn keep_dead(
        &self,
        batch: &Gathered,
        refused: &[(usize, String)],
        done: &mut Delivered,
        state: &mut [u8],
    ) -> Result<(), DeliverError> {
        let mut next = refused.iter().peekable();
        let mut index = 0usize;
        let mut kept = 0u64;
        'chunks: for chunk in batch.chunks() {
            let chunk = chunk?;
            for event in chunk.events() {
                let (entry, mark) = event?;
                let seq = mark.seq;
                let i = index;
                index += 1;
                let Some((want, detail)) = next.peek() else {
                    break 'chunks;
                };
                if *want != i {
                    continue;
                }
                next.next();
                let topic = &self.topics[self.routes.get(i).copied().unwrap_or(0) as usize];
                let letter = Letter {
                    reason: "too_large",
                    detail,
                    topic,
                    time: entry.time,
                    tag: chunk.tag,
                    namespace: chunk.namespace,
                    source: chunk.source,
                    mark,
                    record: entry.record,
                    at: (batch.start, i),
                };
                let key = self.dead.keep(&letter).await.map_err(|e| {
                    DeliverError::Transient(format!("{e} (the event stays in the spool)"))
                })?;
                tracing::warn!(sink = %self.name, tag = chunk.tag, source = chunk.source.unwrap_or("-"), seq = seq.unwrap_or(0), detail = %detail, dead_letter = %key,
                    "Kafka cannot take this event: kept in the dead-letter location (counted as dropped for this sink, reason too_large)");
                state[i] = DEAD;
                done.dropped(chunk.tag, entry.time);
                kept += 1;
            }
        }
        if kept > 0 {
            self.metrics
                .dead_letters
                .get_or_create(&SinkReason {
                    sink: self.name.clone(),
                    reason: "too_large".into(),
                })
                .inc_by(kept);
        }
        Ok(())
    }
}

fn restored(state: &serde_json::Value) -> Option<(TopicMarks, Position)> {
    let marks: TopicMarks = serde_json::from_value(state.get("marks")?.clone()).ok()?;
    let until: Position = serde_json::from_value(state.get("until")?.clone()).ok()?;
    Some((marks, until))
}

fn failed(f: recovery::Failure) -> DeliverError {
    classify(f.message, f.code)
}

/// Errors that will come back on every retry until someone changes the broker's ACLs,
/// credentials or config. Everything else (timeouts, a broker that is down, leader
/// elections) is worth retrying soon. A topic that does not exist is found before
/// producing (`plan`); an unknown topic or partition while producing is a broker that
/// is restarting or electing leaders, and retried soon.
fn classify(message: String, code: Option<RDKafkaErrorCode>) -> DeliverError {
    use RDKafkaErrorCode::*;
    match code {
        Some(
            TopicAuthorizationFailed
            | ClusterAuthorizationFailed
            | TransactionalIdAuthorizationFailed
            | SaslAuthenticationFailed
            | Authentication
            | InvalidConfig
            | InvalidRequiredAcks
            | UnsupportedVersion,
        ) => DeliverError::Permanent(message),
        _ => DeliverError::Transient(message),
    }
}

fn too_large(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge) | Some(RDKafkaErrorCode::InvalidMessageSize)
    )
}

/// The producer's context: librdkafka's delivery reports (from the producer's polling
/// thread) are collected here by event index (the message's opaque, no allocation per
/// message) and the delivery waiting for them is woken.
pub struct Acks {
    settled: std::sync::Mutex<Vec<(usize, Option<KafkaError>)>>,
    wake: tokio::sync::Notify,
}

impl Acks {
    /// A producer with a context of its own: reports of a producer replaced after a
    /// fatal error cannot mix with the new one's.
    fn producer(client: &ClientConfig) -> rdkafka::error::KafkaResult<ThreadedProducer<Acks>> {
        client.create_with_context(Acks {
            settled: std::sync::Mutex::new(Vec::new()),
            wake: tokio::sync::Notify::new(),
        })
    }
}

impl ClientContext for Acks {}

impl ProducerContext for Acks {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, index: usize) {
        let error = result.as_ref().err().map(|(e, _)| e.clone());
        self.settled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((index, error));
        self.wake.notify_one();
    }
}

/// Takes the delivery reports that came in (waiting for one when `wait` and none has)
/// into `settled`, and settles them.
async fn settle_reports(
    producer: &ThreadedProducer<Acks>,
    settled: &mut Vec<(usize, Option<KafkaError>)>,
    settler: &mut Settler<'_>,
    done: &mut Delivered,
    in_flight: &mut usize,
    wait: bool,
) {
    let acks = producer.context();
    loop {
        // The permit a report left behind (Notify keeps one) makes this return at once.
        let woken = acks.wake.notified();
        std::mem::swap(
            settled,
            &mut *acks.settled.lock().unwrap_or_else(|e| e.into_inner()),
        );
        if !settled.is_empty() || !wait {
            break;
        }
        // A report that was pushed before the swap above left a permit; one after wakes.
        let _ = tokio::time::timeout(Duration::from_millis(100), woken).await;
    }
    for (index, error) in settled.drain(..) {
        *in_flight -= 1;
        settler.settle(index, error, done);
    }
}

/// The outcome of the messages of one attempt, settled one by one.
struct Settler<'m> {
    meta: &'m [(&'m str, sluice_forward::EventTime)],
    state: Vec<u8>,
    /// Events Kafka refused as too large, by index, with why: for the dead letters.
    refused: Vec<(usize, String)>,
    /// The first failure of this attempt, with librdkafka's code when it has one.
    first_error: Option<(String, Option<RDKafkaErrorCode>)>,
}

impl Settler<'_> {
    fn settle(&mut self, index: usize, error: Option<KafkaError>, done: &mut Delivered) {
        let (tag, time) = self.meta[index];
        match error {
            None => {
                self.state[index] = ACKED;
                done.delivered(tag, time);
            }
            Some(e) if too_large(&e) => {
                self.refused
                    .push((index, format!("the broker refused it: {e}")));
            }
            Some(e) => {
                self.first_error.get_or_insert_with(|| {
                    (
                        format!("Kafka did not acknowledge: {e}"),
                        e.rdkafka_error_code(),
                    )
                });
            }
        }
    }
}

/// An event's provenance headers: `tag`, `source`, `seq` (empty when none), the `relay`
/// that produced it and the `agent` it came from.
pub(crate) fn headers(
    tag: &str,
    source: Option<&str>,
    seq: &[u8],
    relay: &str,
    agent: Option<&str>,
) -> OwnedHeaders {
    OwnedHeaders::new_with_capacity(5)
        .insert(Header {
            key: "tag",
            value: Some(tag),
        })
        .insert(Header {
            key: "source",
            value: source,
        })
        .insert(Header {
            key: "seq",
            value: Some(seq),
        })
        .insert(Header {
            key: "relay",
            value: Some(relay),
        })
        .insert(Header {
            key: "agent",
            value: agent,
        })
}

/// The agent an event came from: the client that authenticated, else the host part of
/// its source id (`<agent.id>:...`).
pub(crate) fn agent_of<'a>(namespace: Option<&'a str>, source: Option<&'a str>) -> Option<&'a str> {
    namespace.or_else(|| source.and_then(|s| s.split_once(':').map(|(host, _)| host)))
}

impl Deliver for KafkaWriter {
    fn prepare<'a>(
        &'a mut self,
        batch: &'a Gathered,
    ) -> futures::future::BoxFuture<'a, Result<(), DeliverError>> {
        Box::pin(async move {
            if self.prepared == Some(batch.start) && self.retry.is_some() {
                return Ok(());
            }
            self.plan(batch).await?;
            self.prepared = Some(batch.start);
            Ok(())
        })
    }

    fn deliver<'a>(&'a mut self, batch: &'a Gathered) -> DeliverFuture<'a> {
        Box::pin(async move {
            if self.prepared != Some(batch.start) || self.replan {
                self.plan(batch).await?;
                self.prepared = Some(batch.start);
                self.replan = false;
            }
            let retrying = matches!(&self.retry, Some((start, _)) if *start == batch.start);
            if retrying {
                self.read_back("a retry after a failed attempt").await?;
                self.carried_read = true;
            } else if self.carry.is_some() && !self.carried_read {
                self.read_back("the first delivery after a crash in the middle of one")
                    .await?;
                self.carried_read = true;
            }
            let mut done = Delivered::default();
            // (tag, time) per event index, to count deliveries once acknowledged.
            let mut meta = Vec::with_capacity(batch.events as usize);
            // What a failed attempt of this same batch got acknowledged or kept as a dead
            // letter: not sent again.
            let mut state = match self.retry.take() {
                Some((start, state)) if start == batch.start => state,
                _ => Vec::new(),
            };
            state.resize(batch.events as usize, PENDING);
            let mut skipped = 0u64;
            self.settled.clear();
            // Reports of an attempt cut short (the driver gave up at shutdown) are stale.
            self.producer
                .context()
                .settled
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
            let (mut in_flight, mut sent) = (0usize, 0usize);
            let mut to_send = Vec::new();
            for chunk in batch.chunks() {
                let chunk = chunk?;
                for event in chunk.events() {
                    let (entry, mark) = event?;
                    let seq = mark.seq;
                    let index = meta.len();
                    meta.push((chunk.tag, entry.time));
                    match state.get(index).copied() {
                        Some(ACKED) => {
                            done.delivered(chunk.tag, entry.time);
                            continue;
                        }
                        Some(DEAD) => {
                            done.dropped(chunk.tag, entry.time);
                            continue;
                        }
                        _ => {}
                    }
                    if let (Some(source), Some(seq)) = (chunk.source, seq) {
                        let agent = agent_of(chunk.namespace, Some(source));
                        if self.found.contains(agent, source, seq) {
                            done.delivered(chunk.tag, entry.time);
                            skipped += 1;
                            continue;
                        }
                    }
                    to_send.push((index, chunk, mark, entry));
                }
            }
            state.resize(meta.len(), PENDING);
            let mut settler = Settler {
                meta: &meta,
                state,
                refused: Vec::new(),
                first_error: None,
            };
            let (mut key_missing, mut value_missing) = (0u64, 0u64);
            let mut unencodable: Option<DeliverError> = None;
            let mut key_text = String::new();
            for (index, chunk, mark, entry) in to_send {
                let seq = mark.seq;
                // Stop at the first failure seen: the retry resends the rest, in order.
                if settler.first_error.is_some() {
                    break;
                }
                let (tag, source) = (chunk.tag, chunk.source);
                match self.value_of(entry.time, tag, source, mark, entry.record) {
                    Ok(true) => {}
                    Ok(false) => value_missing += 1,
                    Err(e) => {
                        // Settled below like any failure, so the retry knows what landed.
                        unencodable.get_or_insert(e);
                        break;
                    }
                }
                if self.buf.len() > self.max_message {
                    settler.refused.push((
                        index,
                        format!(
                            "{} bytes, more than max_message (or the topic's max.message.bytes) {}",
                            self.buf.len(),
                            self.max_message
                        ),
                    ));
                    continue;
                }
                let key: Option<&str> = if self.key_is_source {
                    source
                } else {
                    match self.key.render(&mut key_text, tag, source, entry.record) {
                        Ok(()) => Some(key_text.as_str()),
                        Err(_) => {
                            key_missing += 1;
                            source
                        }
                    }
                };
                let mut seq_text = itoa::Buffer::new();
                let seq_bytes: &[u8] = match seq {
                    Some(s) => seq_text.format(s).as_bytes(),
                    None => b"",
                };
                let headers = headers(
                    tag,
                    source,
                    seq_bytes,
                    &self.relay,
                    agent_of(chunk.namespace, source),
                );
                // CreateTime = the event's own time, so retention and consumers see the
                // log's time, not when the relay produced it.
                let millis = (entry.time.as_unix_nanos() / 1_000_000) as i64;
                let topic = &self.topics[self.routes.get(index).copied().unwrap_or(0) as usize];
                let mut record = BaseRecord::with_opaque_to(topic, index)
                    .payload(&self.buf[..])
                    .timestamp(millis)
                    .headers(headers);
                if let Some(key) = key {
                    record = record.key(key);
                }
                // Reports that came in meanwhile (cheap: no wait), so failures show early.
                sent += 1;
                if sent % 1024 == 0 {
                    settle_reports(
                        &self.producer,
                        &mut self.settled,
                        &mut settler,
                        &mut done,
                        &mut in_flight,
                        false,
                    )
                    .await;
                }
                loop {
                    match self.producer.send(record) {
                        Ok(()) => {
                            in_flight += 1;
                            break;
                        }
                        Err((e, back))
                            if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) =>
                        {
                            // The local queue is full: wait for acknowledgements.
                            record = back;
                            let wait = in_flight > 0;
                            settle_reports(
                                &self.producer,
                                &mut self.settled,
                                &mut settler,
                                &mut done,
                                &mut in_flight,
                                wait,
                            )
                            .await;
                            if in_flight == 0 {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                        }
                        Err((e, _)) if too_large(&e) => {
                            settler
                                .refused
                                .push((index, format!("the producer refused it: {e}")));
                            break;
                        }
                        Err((e, _)) => {
                            settler.first_error.get_or_insert_with(|| {
                                (format!("producing to {topic}: {e}"), e.rdkafka_error_code())
                            });
                            break;
                        }
                    }
                }
                done.bytes += self.buf.len() as u64;
            }
            // Settle everything, also after a failure: a retry must know what landed.
            while in_flight > 0 {
                settle_reports(
                    &self.producer,
                    &mut self.settled,
                    &mut settler,
                    &mut done,
                    &mut in_flight,
                    true,
                )
                .await;
            }
            self.count("key_missing_field", key_missing);
            self.count("value_missing_field", value_missing);
            let Settler {
                mut state,
                mut refused,
                first_error,
                ..
            } = settler;
            refused.sort_by_key(|(i, _)| *i);
            let kept = self.keep_dead(batch, &refused, &mut done, &mut state).await;
            if let Some(e) = unencodable {
                self.retry = Some((batch.start, state));
                return Err(e);
            }
            if let Some((e, code)) = first_error {
                if matches!(
                    code,
                    Some(
                        RDKafkaErrorCode::UnknownTopic | RDKafkaErrorCode::UnknownTopicOrPartition
                    )
                ) {
                    // A topic went away (or the broker does not know it yet): look again,
                    // and route the retry anew (to default_topic if it is really gone).
                    self.topic_info.clear();
                    self.replan = true;
                }
                self.retry = Some((batch.start, state));
                // A fatal error (for example ProducerFenced after a long broker outage)
                // breaks the idempotent producer for good: start a new one (the retry's
                // read-back, not the producer id, keeps it from duplicating).
                let fatal = self
                    .producer
                    .client()
                    .fatal_error()
                    .map(|(code, reason)| format!("{code:?}: {reason}"));
                let fenced = matches!(
                    code,
                    Some(RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::InvalidProducerEpoch)
                );
                if let Some(reason) = fatal.or_else(|| fenced.then(|| e.clone())) {
                    tracing::warn!(sink = %self.name, reason, "the Kafka producer hit a fatal error; creating a new producer");
                    let new = Acks::producer(&self.client).map_err(|e| {
                        DeliverError::Transient(format!("recreating the Kafka producer: {e}"))
                    })?;
                    // Dropping a producer joins librdkafka's threads: not on the runtime.
                    let old = std::mem::replace(&mut self.producer, new);
                    tokio::task::spawn_blocking(move || drop(old));
                }
                return Err(classify(e, code));
            }
            if let Err(e) = kept {
                self.retry = Some((batch.start, state));
                return Err(e);
            }
            if skipped > 0 {
                tracing::info!(sink = %self.name, skipped, "events found already in Kafka were not sent again");
            }
            // The read-back covered this gathering (and a crash's, until past its end).
            match &self.carry {
                Some((_, end)) if batch.end < *end => {}
                _ => {
                    self.carry = None;
                    self.found = Found::default();
                }
            }
            Ok(done)
        })
    }

    fn gather_limits(&self) -> (usize, Duration) {
        (4 << 20, Duration::ZERO)
    }

    fn recovery_state(&self) -> Option<serde_json::Value> {
        Some(match &self.carry {
            Some((marks, until)) => {
                serde_json::json!({ "in_flight": true, "marks": marks, "until": until })
            }
            None => serde_json::json!({ "in_flight": false }),
        })
    }

    fn intent_state(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({ "in_flight": true, "marks": self.marks, "until": self.until }))
    }

    fn start(&mut self) -> futures::future::BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            tracing::info!(sink = %self.name, dead_letters = %self.dead.location, "events Kafka cannot take are kept in the dead-letter location");
            let Some(topic) = self.topic.constant().map(str::to_string) else {
                return Ok(());
            };
            let limit = tokio::time::timeout(
                Duration::from_secs(15),
                topic_max_message(&self.client, &topic),
            )
            .await;
            match limit {
                Ok(Ok(Some(limit))) => self.fit_to_topic(limit)?,
                Ok(Ok(None)) => {
                    tracing::info!(sink = %self.name, topic = %topic, "the broker did not report the topic's max.message.bytes; max_message applies")
                }
                Ok(Err(e)) => {
                    tracing::warn!(sink = %self.name, topic = %topic, error = %e, "cannot read the topic's max.message.bytes; max_message applies (keep it and the producer's batch.size at or below the topic's limit)")
                }
                Err(_) => {
                    tracing::warn!(sink = %self.name, topic = %topic, "the broker did not answer DescribeConfigs within 15 s; max_message applies (keep it and the producer's batch.size at or below the topic's limit)")
                }
            }
            Ok(())
        })
    }

    fn restore(&mut self, state: Option<serde_json::Value>) {
        // No saved state: this sink never started a delivery, nothing to read back.
        let Some(state) = state else { return };
        if !state
            .get("in_flight")
            .and_then(|v| v.as_bool())
            .unwrap_or(true)
        {
            return;
        }
        self.carry = restored(&state).or_else(|| {
            // A state of the version before marks: the offsets after its last
            // acknowledged message per partition, for the one topic it had.
            let offsets: recovery::Marks =
                serde_json::from_value(state.get("partition_offsets")?.clone()).ok()?;
            let topic = self.topic.constant()?.to_string();
            Some((TopicMarks::from([(topic, offsets)]), Position::default()))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_survive_the_state_file() {
        let marks = TopicMarks::from([(
            "logs".to_string(),
            recovery::Marks::from([(0, 7i64), (2, 53_151)]),
        )]);
        let until = Position {
            segment: 3,
            offset: 4096,
        };
        let saved = serde_json::json!({ "in_flight": true, "marks": marks, "until": until });
        let text = serde_json::to_string(&saved).unwrap();
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(restored(&back), Some((marks, until)));
        assert!(restored(&serde_json::json!({"in_flight": true})).is_none());
    }

    /// librdkafka is built with TLS (OpenSSL, vendored), SASL (PLAIN, SCRAM, OAUTHBEARER)
    /// and every codec the config offers: a producer with each is created (no broker is
    /// needed for that; an unsupported value fails at once).
    #[test]
    fn the_producer_is_built_with_tls_sasl_and_every_codec() {
        for codec in ["none", "gzip", "snappy", "lz4", "zstd"] {
            for mechanism in ["PLAIN", "SCRAM-SHA-512", "OAUTHBEARER"] {
                let made: Result<ThreadedProducer<_>, _> = ClientConfig::new()
                    .set("bootstrap.servers", "127.0.0.1:1")
                    .set("compression.type", codec)
                    .set("security.protocol", "sasl_ssl")
                    .set("sasl.mechanism", mechanism)
                    .set("sasl.username", "u")
                    .set("sasl.password", "p")
                    .create();
                if let Err(e) = made {
                    panic!("{codec} over sasl_ssl with {mechanism}: {e}");
                }
            }
        }
    }

    #[test]
    fn the_agent_is_the_authenticated_client_or_the_source_host() {
        assert_eq!(agent_of(Some("web-1"), Some("web-9:app")), Some("web-1"));
        assert_eq!(
            agent_of(None, Some("web-9:/var/log/app.log")),
            Some("web-9")
        );
        assert_eq!(agent_of(None, None), None);
    }
}
