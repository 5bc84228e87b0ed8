//! Kafka sink: one message per event (the JSON envelope), keyed by the event's source id
//! so one source's events keep their order within a partition, with headers `tag`,
//! `source` and `seq`.
//!
//! The producer is idempotent with `acks=all`; a gathered batch counts as delivered only
//! when the broker acknowledged every message of it. Events are produced one per
//! message, so a large chunk can never exceed the broker's message limit; a single event
//! larger than `max_message` is skipped, counted (`sink_dropped{reason="too_large"}`) and
//! logged — it is still in every other sink — instead of stalling the sink forever.
//!
//! At start the sink reads the topic's `max.message.bytes` (DescribeConfigs). The broker
//! applies it to a whole record batch, so with a topic limit below the producer's batch
//! size every batch of small events would be refused: the producer's `batch.size` and
//! `message.max.bytes` are kept under the topic's limit, and `max_message` lowered to it.
//!
//! No duplicates from the relay's own retries or crashes:
//! - a failed attempt remembers which events the broker did acknowledge, and the retry of
//!   the same batch sends only the others;
//! - after every delivery the sink saves, with its cursor, the offset after its last
//!   acknowledged message in each partition. After a crash, before delivering again, it
//!   reads every partition from there to its end and skips the events whose
//!   `(source, seq)` it finds: those the lost delivery had already written.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use sluice_spool::Position;

use super::config::KafkaSink;
use crate::envelope;
use crate::sinks::spec::{Deliver, DeliverError, DeliverFuture, Delivered, Gathered};

pub struct KafkaWriter {
    name: String,
    topic: String,
    brokers: String,
    max_message: usize,
    client: ClientConfig,
    producer: FutureProducer,
    buf: Vec<u8>,
    pending: Vec<(DeliveryFuture, usize)>,
    /// Per partition, the offset after the last message this sink had acknowledged.
    offsets: BTreeMap<i32, i64>,
    /// Set at start after a previous run: read back from these offsets first.
    recover_from: Option<BTreeMap<i32, i64>>,
    /// Seqs by source found in Kafka past the saved offsets: already delivered.
    skip: HashMap<String, HashSet<u64>>,
    /// The batch of a failed attempt and which of its events the broker acknowledged.
    retry: Option<(Position, Vec<bool>)>,
    /// The librdkafka properties the config set (never overridden).
    properties: BTreeMap<String, String>,
}

/// Bytes a record batch of one message adds around the event (batch header, record
/// framing, the three headers), kept free under the topic's limit.
const BATCH_OVERHEAD: usize = 1024;

/// The topic's `max.message.bytes`, as the broker reports it (`None` when it does not).
async fn topic_max_message(client: &ClientConfig, topic: &str) -> Result<Option<usize>, String> {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> =
        client.create().map_err(|e| format!("admin client: {e}"))?;
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
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

impl KafkaWriter {
    /// Keeps batches and messages under the topic's `max.message.bytes` (`limit`):
    /// lowers `max_message` and, unless `properties` set them, the producer's
    /// `batch.size` and `message.max.bytes`, with a new producer (none was used yet).
    fn fit_to_topic(
        &mut self,
        limit: usize,
        properties: &BTreeMap<String, String>,
    ) -> Result<(), String> {
        let fits = limit.saturating_sub(BATCH_OVERHEAD).max(1);
        if fits >= self.max_message && limit >= 1_000_000 {
            return Ok(());
        }
        self.max_message = self.max_message.min(fits);
        if !properties.contains_key("batch.size") {
            self.client
                .set("batch.size", fits.min(1_000_000).to_string());
        }
        if !properties.contains_key("message.max.bytes") {
            self.client
                .set("message.max.bytes", limit.max(1000).to_string());
        }
        self.producer = self.client.create().map_err(|e| {
            format!(
                "sink {:?}: cannot create the Kafka producer: {e}",
                self.name
            )
        })?;
        tracing::info!(sink = %self.name, topic = %self.topic, max_message_bytes = limit, max_message = self.max_message,
            "the topic's max.message.bytes is below the producer's batch size or max_message: batches and messages are kept under it");
        Ok(())
    }

    pub fn new(name: &str, cfg: &KafkaSink) -> Result<KafkaWriter, String> {
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &cfg.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", &cfg.compression)
            .set("linger.ms", "5")
            .set("batch.size", "1000000")
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
        let producer: FutureProducer = client
            .create()
            .map_err(|e| format!("sink {name:?}: cannot create the Kafka producer: {e}"))?;
        Ok(KafkaWriter {
            name: name.to_string(),
            topic: cfg.topic.clone(),
            brokers: cfg.brokers.clone(),
            max_message: cfg.max_message.as_usize(),
            client,
            producer,
            buf: Vec::with_capacity(4096),
            pending: Vec::new(),
            offsets: BTreeMap::new(),
            recover_from: None,
            skip: HashMap::new(),
            retry: None,
            properties: cfg.properties.clone(),
        })
    }

    /// Reads back what a previous run may have written after its saved offsets.
    async fn read_back(&mut self, from: BTreeMap<i32, i64>) -> Result<(), String> {
        let (brokers, topic) = (self.brokers.clone(), self.topic.clone());
        let started = Instant::now();
        let (skip, read) = tokio::task::spawn_blocking(move || {
            provenance_after(&brokers, &topic, &from, Duration::from_secs(60))
        })
        .await
        .map_err(|e| e.to_string())??;
        tracing::info!(sink = %self.name, messages = read, events = skip.values().map(HashSet::len).sum::<usize>(), took = ?started.elapsed(),
            "read back what the previous run wrote after its last saved offsets; those events will not be sent again");
        self.skip = skip;
        Ok(())
    }
}

/// `(source, seq)` of every message after `from` up to the end of each partition, and how
/// many messages were read. Partitions not in `from` never had a message of this sink
/// acknowledged, so they are read from their beginning: correct, and costly only in a
/// topic this sink rarely writes to, and only after a crash in the middle of a delivery.
fn provenance_after(
    brokers: &str,
    topic: &str,
    from: &BTreeMap<i32, i64>,
    timeout: Duration,
) -> Result<(HashMap<String, HashSet<u64>>, u64), String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Message, Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("sluice-recovery-{}", std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .create()
        .map_err(|e| format!("Kafka consumer for recovery: {e}"))?;
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| format!("Kafka metadata for {topic}: {e}"))?;
    let mut assignment = TopicPartitionList::new();
    let mut remaining = HashSet::new();
    for t in metadata.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            let offset = from
                .get(&p.id())
                .map_or(Offset::Beginning, |o| Offset::Offset(*o));
            assignment
                .add_partition_offset(topic, p.id(), offset)
                .map_err(|e| e.to_string())?;
            remaining.insert(p.id());
        }
    }
    if remaining.is_empty() {
        return Err(format!(
            "Kafka topic {topic} has no partitions (does it exist?)"
        ));
    }
    consumer.assign(&assignment).map_err(|e| e.to_string())?;
    let mut found: HashMap<String, HashSet<u64>> = HashMap::new();
    let mut read = 0u64;
    let deadline = Instant::now() + timeout;
    while !remaining.is_empty() {
        if Instant::now() > deadline {
            return Err(format!("reading back {topic}: partitions {remaining:?} not read to their end within {timeout:?}"));
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                remaining.remove(&p);
            }
            Some(Err(e)) => return Err(format!("reading back {topic}: {e}")),
            Some(Ok(msg)) => {
                read += 1;
                let Some(headers) = msg.headers() else {
                    continue;
                };
                let (mut source, mut seq) = (None, None);
                for h in headers.iter() {
                    match (h.key, h.value) {
                        ("source", Some(v)) => source = std::str::from_utf8(v).ok(),
                        ("seq", Some(v)) => {
                            seq = std::str::from_utf8(v)
                                .ok()
                                .and_then(|v| v.parse::<u64>().ok())
                        }
                        _ => {}
                    }
                }
                if let (Some(source), Some(seq)) = (source, seq) {
                    found.entry(source.to_string()).or_default().insert(seq);
                }
            }
        }
    }
    Ok((found, read))
}

fn restored_offsets(state: Option<serde_json::Value>) -> Option<BTreeMap<i32, i64>> {
    let map = state?.get("partition_offsets")?.as_object()?.clone();
    map.into_iter()
        .map(|(k, v)| Some((k.parse().ok()?, v.as_i64()?)))
        .collect()
}

/// Errors that will come back on every retry until someone changes the broker's ACLs,
/// credentials or topics. Everything else (timeouts, a broker that is down, leader
/// elections) is worth retrying soon.
fn classify(message: String, code: Option<RDKafkaErrorCode>) -> DeliverError {
    use RDKafkaErrorCode::*;
    match code {
        Some(
            TopicAuthorizationFailed
            | ClusterAuthorizationFailed
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

/// The outcome of the messages of one attempt, settled one by one.
struct Settler<'m> {
    meta: &'m [(&'m str, sluice_forward::EventTime)],
    acked: Vec<bool>,
    /// The first failure of this attempt, with librdkafka's code when it has one.
    first_error: Option<(String, Option<RDKafkaErrorCode>)>,
}

impl Settler<'_> {
    async fn settle(
        &mut self,
        future: DeliveryFuture,
        index: usize,
        done: &mut Delivered,
        offsets: &mut BTreeMap<i32, i64>,
        sink: &str,
    ) {
        let (tag, time) = self.meta[index];
        match future.await {
            Ok(Ok(d)) => {
                self.acked[index] = true;
                done.delivered(tag, time);
                let next = offsets.entry(d.partition).or_insert(0);
                *next = (*next).max(d.offset + 1);
            }
            Ok(Err((e, _))) if too_large(&e) => {
                tracing::warn!(sink, tag, error = %e, "the broker refused an event as too large (dropped for this sink, counted)");
                self.acked[index] = true;
                done.dropped(tag, time);
            }
            Ok(Err((e, _))) => {
                self.first_error.get_or_insert_with(|| {
                    (
                        format!("Kafka did not acknowledge: {e}"),
                        e.rdkafka_error_code(),
                    )
                });
            }
            Err(_) => {
                self.first_error
                    .get_or_insert_with(|| ("the Kafka producer was shut down".into(), None));
            }
        }
    }
}

impl Deliver for KafkaWriter {
    fn deliver<'a>(&'a mut self, batch: &'a Gathered) -> DeliverFuture<'a> {
        Box::pin(async move {
            if let Some(from) = self.recover_from.take() {
                if let Err(e) = self.read_back(from.clone()).await {
                    self.recover_from = Some(from);
                    return Err(DeliverError::Transient(e));
                }
            }
            let mut done = Delivered::default();
            // (tag, time) per event index, to count deliveries once acknowledged.
            let mut meta = Vec::with_capacity(batch.events as usize);
            // Events a failed attempt of this same batch got acknowledged: not sent again.
            let mut acked = match self.retry.take() {
                Some((start, acked)) if start == batch.start => acked,
                _ => Vec::new(),
            };
            acked.resize(batch.events as usize, false);
            let mut skipped = 0u64;
            self.pending.clear();
            // Produce everything first (the futures settle later); meta must be complete
            // before settling, so settling is deferred to the end or to a full queue.
            let mut to_send = Vec::new();
            for chunk in batch.chunks() {
                let chunk = chunk?;
                for event in chunk.events() {
                    let (entry, seq) = event?;
                    let index = meta.len();
                    meta.push((chunk.tag, entry.time));
                    if acked.get(index).copied().unwrap_or(false) {
                        done.delivered(chunk.tag, entry.time);
                        continue;
                    }
                    let in_kafka = match (chunk.source, seq) {
                        (Some(source), Some(seq)) => self
                            .skip
                            .get(source)
                            .is_some_and(|seqs| seqs.contains(&seq)),
                        _ => false,
                    };
                    if in_kafka {
                        done.delivered(chunk.tag, entry.time);
                        skipped += 1;
                        continue;
                    }
                    to_send.push((index, chunk.tag, chunk.source, seq, entry));
                }
            }
            acked.resize(meta.len(), false);
            let mut settler = Settler {
                meta: &meta,
                acked,
                first_error: None,
            };
            for (index, tag, source, seq, entry) in to_send {
                self.buf.clear();
                envelope::write(&mut self.buf, entry.time, tag, source, seq, entry.record)
                    .map_err(|e| DeliverError::Permanent(e.to_string()))?;
                if self.buf.len() > self.max_message {
                    tracing::warn!(sink = %self.name, tag, source = source.unwrap_or("-"), seq = seq.unwrap_or(0), bytes = self.buf.len(), limit = self.max_message, "event larger than max_message (or the topic's max.message.bytes): not produced to Kafka (dropped for this sink, counted)");
                    settler.acked[index] = true;
                    done.dropped(tag, entry.time);
                    continue;
                }
                let mut seq_text = itoa::Buffer::new();
                let seq_bytes: &[u8] = match seq {
                    Some(s) => seq_text.format(s).as_bytes(),
                    None => b"",
                };
                let headers = OwnedHeaders::new_with_capacity(3)
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
                        value: Some(seq_bytes),
                    });
                // CreateTime = the event's own time, so retention and consumers see the
                // log's time, not when the relay produced it.
                let millis = (entry.time.as_unix_nanos() / 1_000_000) as i64;
                let mut record = FutureRecord::to(&self.topic)
                    .payload(&self.buf[..])
                    .timestamp(millis)
                    .headers(headers);
                if let Some(source) = source {
                    record = record.key(source);
                }
                loop {
                    match self.producer.send_result(record) {
                        Ok(future) => {
                            self.pending.push((future, index));
                            break;
                        }
                        Err((e, back))
                            if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) =>
                        {
                            // The local queue is full: wait for the oldest half to be acknowledged.
                            record = back;
                            let half = self.pending.len() / 2 + 1;
                            let older: Vec<_> =
                                self.pending.drain(..half.min(self.pending.len())).collect();
                            if older.is_empty() {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                            for (future, i) in older {
                                settler
                                    .settle(future, i, &mut done, &mut self.offsets, &self.name)
                                    .await;
                            }
                        }
                        Err((e, _)) if too_large(&e) => {
                            tracing::warn!(sink = %self.name, tag, error = %e, "Kafka refused an event as too large (dropped for this sink, counted)");
                            settler.acked[index] = true;
                            done.dropped(tag, entry.time);
                            break;
                        }
                        Err((e, _)) => {
                            settler.first_error.get_or_insert_with(|| {
                                (
                                    format!("producing to {}: {e}", self.topic),
                                    e.rdkafka_error_code(),
                                )
                            });
                            break;
                        }
                    }
                }
                done.bytes += self.buf.len() as u64;
            }
            // Settle everything, also after a failure: a retry must know what landed.
            let pending: Vec<_> = self.pending.drain(..).collect();
            for (future, i) in pending {
                settler
                    .settle(future, i, &mut done, &mut self.offsets, &self.name)
                    .await;
            }
            if let Some((e, code)) = settler.first_error {
                self.retry = Some((batch.start, settler.acked));
                // A fatal error (for example ProducerFenced after a long broker outage)
                // breaks the idempotent producer for good: start a new one.
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
                    self.producer = self.client.create().map_err(|e| {
                        DeliverError::Transient(format!("recreating the Kafka producer: {e}"))
                    })?;
                }
                return Err(classify(e, code));
            }
            if skipped > 0 {
                tracing::info!(sink = %self.name, skipped, "events found already in Kafka after a crash were not sent again");
            }
            // The read-back set covered the delivery lost in the crash, which this one
            // (starting at the same cursor, gathering at least as much) has now replaced.
            self.skip = HashMap::new();
            Ok(done)
        })
    }

    fn gather_limits(&self) -> (usize, Duration) {
        (4 << 20, Duration::ZERO)
    }

    fn recovery_state(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({ "partition_offsets": self.offsets, "in_flight": false }))
    }

    fn intent_state(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({ "partition_offsets": self.offsets, "in_flight": true }))
    }

    fn start(&mut self) -> futures::future::BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let limit = tokio::time::timeout(
                Duration::from_secs(15),
                topic_max_message(&self.client, &self.topic),
            )
            .await;
            match limit {
                Ok(Ok(Some(limit))) => {
                    let properties = self.properties.clone();
                    self.fit_to_topic(limit, &properties)?;
                }
                Ok(Ok(None)) => {
                    tracing::info!(sink = %self.name, topic = %self.topic, "the broker did not report the topic's max.message.bytes; max_message applies")
                }
                Ok(Err(e)) => {
                    tracing::warn!(sink = %self.name, topic = %self.topic, error = %e, "cannot read the topic's max.message.bytes; max_message applies (keep it and the producer's batch.size at or below the topic's limit)")
                }
                Err(_) => {
                    tracing::warn!(sink = %self.name, topic = %self.topic, "the broker did not answer DescribeConfigs within 15 s; max_message applies (keep it and the producer's batch.size at or below the topic's limit)")
                }
            }
            Ok(())
        })
    }

    fn restore(&mut self, state: Option<serde_json::Value>) {
        // No saved state: this sink never started a delivery, nothing to read back.
        let Some(state) = state else { return };
        let offsets = restored_offsets(Some(state.clone())).unwrap_or_default();
        self.offsets = offsets.clone();
        // Read back only when the last run died in the middle of a delivery.
        if state
            .get("in_flight")
            .and_then(|v| v.as_bool())
            .unwrap_or(true)
        {
            self.recover_from = Some(offsets);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_offsets_survive_the_state_file() {
        let offsets = BTreeMap::from([(0, 7i64), (2, 53_151)]);
        let saved = serde_json::json!({ "partition_offsets": offsets });
        let text = serde_json::to_string(&saved).unwrap();
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(restored_offsets(Some(back)), Some(offsets.clone()));
        assert!(restored_offsets(Some(serde_json::json!({"in_flight": true}))).is_none());
        assert_eq!(restored_offsets(None), None);
    }
}
