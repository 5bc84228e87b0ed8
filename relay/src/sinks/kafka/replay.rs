//! `sluice-relay replay --into kafka`: produces events read back from object storage as
//! the sink produces them — the same topic, key, value (the envelope), headers and
//! timestamp (the event's time) — with the sink's producer settings: idempotent,
//! `acks=all`, its TLS and SASL properties, its partitioner, so an event lands in the
//! partition of its source's other events.

use std::collections::VecDeque;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

use super::template::Template;
use super::writer::{agent_of, fit_to_limit, headers, producer_config, topic_max_message};
use super::{KafkaSink, KafkaValue};

/// The `relay` header of what a replay produced.
pub const REPLAY_RELAY: &str = "replay";

/// Deliveries awaited before more are queued: memory stays bounded whatever the range.
const IN_FLIGHT: usize = 50_000;

/// One event to produce: its envelope and what its key and headers are made of.
pub struct Event<'a> {
    pub time: sluice_forward::EventTime,
    pub tag: &'a str,
    pub source: &'a str,
    pub seq: u64,
    pub envelope: &'a [u8],
    /// The record as JSON, for a key template with `{record.<field>}`.
    pub record: &'a [u8],
}

pub struct Replayer {
    producer: FutureProducer,
    topic: String,
    /// None: the key is the source id (the default).
    key: Option<Template>,
    max_message: usize,
    key_text: String,
    deliveries: Deliveries,
    /// Events larger than the sink's `max_message`: not produced (the sink would not
    /// have produced them either; they are its dead letters).
    pub too_large: u64,
    /// Events whose key could not be rendered: keyed by their source id, as the sink does.
    pub key_missing: u64,
}

/// The deliveries awaited, and how those settled went.
#[derive(Default)]
struct Deliveries {
    pending: VecDeque<DeliveryFuture>,
    delivered: u64,
    failed: u64,
    first_error: Option<String>,
}

impl Deliveries {
    async fn settle_one(&mut self) {
        let Some(f) = self.pending.pop_front() else {
            return;
        };
        match f.await {
            Ok(Ok(_)) => self.delivered += 1,
            Ok(Err((e, _))) => {
                self.failed += 1;
                self.first_error.get_or_insert_with(|| e.to_string());
            }
            Err(_) => {
                self.failed += 1;
                self.first_error
                    .get_or_insert_with(|| "the producer went away".into());
            }
        }
    }
}

impl Replayer {
    /// With the sink's settings, kept under the topic's `max.message.bytes` as the sink
    /// keeps them.
    pub async fn new(cfg: &KafkaSink) -> Result<Replayer, String> {
        let topic = Template::parse(&cfg.topic)?;
        let Some(topic) = topic.constant() else {
            return Err(format!(
                "topic {:?} is a template: replay, like reconcile, reads and writes one topic per sink for now",
                cfg.topic
            ));
        };
        if cfg.value != KafkaValue::Envelope {
            return Err(
                "the kafka sink sends value = \"raw\": replay writes envelopes, which reconcile reads; set value = \"envelope\" to replay into this topic"
                    .into(),
            );
        }
        let mut client = producer_config(cfg);
        let mut max_message = cfg.max_message.as_usize();
        match topic_max_message(&client, topic).await {
            Ok(Some(limit)) => {
                if let Some(m) = fit_to_limit(&mut client, &cfg.properties, max_message, limit) {
                    max_message = m;
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(topic, error = %e, "cannot read the topic's max.message.bytes; messages are kept under the sink's max_message")
            }
        }
        let producer: FutureProducer = client
            .create()
            .map_err(|e| format!("cannot create the Kafka producer: {e}"))?;
        Ok(Replayer {
            producer,
            topic: topic.to_string(),
            key: (cfg.key != "{source}")
                .then(|| Template::parse(&cfg.key))
                .transpose()
                .map_err(|e| format!("key {e}"))?,
            max_message,
            key_text: String::new(),
            deliveries: Deliveries::default(),
            too_large: 0,
            key_missing: 0,
        })
    }

    /// Messages acknowledged so far.
    pub fn delivered(&self) -> u64 {
        self.deliveries.delivered
    }

    /// Queues one event; waits for earlier deliveries when librdkafka's queue is full.
    /// Returns whether it was queued (false: larger than `max_message`).
    pub async fn send(&mut self, e: &Event<'_>) -> Result<bool, String> {
        if e.envelope.len() > self.max_message {
            self.too_large += 1;
            return Ok(false);
        }
        let key: &str = match &self.key {
            None => e.source,
            Some(t) => {
                let record = serde_json::from_slice(e.record).unwrap_or_default();
                match t.render_json(&mut self.key_text, e.tag, Some(e.source), &record) {
                    Ok(()) => &self.key_text,
                    Err(_) => {
                        self.key_missing += 1;
                        e.source
                    }
                }
            }
        };
        let mut seq = itoa::Buffer::new();
        let mut record = FutureRecord::to(&self.topic)
            .payload(e.envelope)
            .key(key)
            .timestamp((e.time.as_unix_nanos() / 1_000_000) as i64)
            .headers(headers(
                e.tag,
                Some(e.source),
                seq.format(e.seq).as_bytes(),
                REPLAY_RELAY,
                agent_of(None, Some(e.source)),
            ));
        let d = &mut self.deliveries;
        loop {
            if d.pending.len() >= IN_FLIGHT {
                d.settle_one().await;
            }
            match self.producer.send_result(record) {
                Ok(f) => {
                    d.pending.push_back(f);
                    return Ok(true);
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    if d.pending.is_empty() {
                        // Nothing of ours to wait for: give librdkafka a moment.
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    } else {
                        d.settle_one().await;
                    }
                }
                Err((e, _)) => return Err(format!("Kafka produce to {}: {e}", self.topic)),
            }
        }
    }

    /// Waits for every delivery: an error when any failed (the idempotent producer
    /// retried it for the sink's `delivery_timeout` first).
    pub async fn finish(&mut self) -> Result<(), String> {
        let d = &mut self.deliveries;
        while !d.pending.is_empty() {
            d.settle_one().await;
        }
        match &d.first_error {
            None => Ok(()),
            Some(e) => Err(format!(
                "{} of {} messages were not delivered to {} (first: {e}); run the replay again: it produces only what is still missing",
                d.failed,
                d.failed + d.delivered,
                self.topic
            )),
        }
    }
}
