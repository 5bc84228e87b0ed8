//! The keys of `type = "kafka"`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sluice_core::units::{ByteSize, Span};

use super::template::{legal_topic, Template};

#[derive(Clone, Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KafkaSink {
    /// Bootstrap servers, "host:port,host:port".
    pub brokers: String,
    /// The topic of each event, a template: `{tag}`, `{source}` and `{record.<field>}`
    /// (`{record.kubernetes.namespace}` for a nested field), e.g. `logs.{tag}`. Topics
    /// must exist (the sink does not create them).
    pub topic: String,
    /// Where an event goes when `topic` cannot be rendered for it (a field missing), the
    /// rendered name is not a legal topic, or that topic does not exist; counted in
    /// `sluice_relay_kafka_rerouted_total{reason}`. Required when `topic` has a
    /// placeholder, refused when it has none.
    #[serde(default)]
    pub default_topic: Option<String>,
    /// The message key, a template like `topic`. The default, the source id, keeps each
    /// source's events in one partition, in order. An event without a source id gets no
    /// key; one whose key cannot be rendered gets its source id (counted as above).
    #[serde(default = "default_key")]
    pub key: String,
    /// The message value: `envelope` (JSON: time, tag, source, seq, record) or `raw`
    /// (the record's `raw_field` as it is, the log line; an event without it is sent as
    /// its envelope, counted as above). Provenance is in the headers either way.
    #[serde(default)]
    pub value: KafkaValue,
    /// The record field `value = "raw"` sends.
    #[serde(default = "default_raw_field")]
    pub raw_field: String,
    /// librdkafka compression codec: none, gzip, snappy, lz4, zstd.
    #[serde(default = "default_compression")]
    pub compression: String,
    /// How long the producer waits to fill a batch (librdkafka `linger.ms`).
    #[serde(default = "default_linger")]
    pub linger: Span,
    /// The largest record batch the producer builds (librdkafka `batch.size`), kept
    /// under the topic's max.message.bytes.
    #[serde(default = "default_batch_size")]
    pub batch_size: ByteSize,
    /// Largest message the sink produces. At start the sink reads the topic's
    /// max.message.bytes and keeps messages and the producer's batches under it (this is
    /// lowered to it). A larger event goes to the dead-letter location, with its reason
    /// and provenance (`sluice_relay_sink_dropped_total{reason="too_large"}` counts it
    /// for this sink), and the stream goes on.
    #[serde(default = "default_kafka_max_message")]
    pub max_message: ByteSize,
    /// Where events Kafka cannot take are kept: an object store URL like the object
    /// sink's (`s3://bucket/prefix`, `file:///dir`), one JSON object per event under
    /// `dead-letters/<sink>/<tag>/dt=YYYY-MM-DD/hour=HH/`. Empty: the local directory
    /// `<data_dir>/dead-letters/`.
    #[serde(default)]
    pub dead_letter_url: String,
    /// object_store options for `dead_letter_url` (endpoint, region, ...).
    #[serde(default)]
    pub dead_letter_options: BTreeMap<String, String>,
    /// How long a batch may wait for broker acknowledgements before it is retried
    /// (librdkafka `message.timeout.ms`). A message that timed out while a broker still
    /// held it unreplicated can become visible after the retry's read-back; `0s` waits
    /// without end instead (librdkafka's own idempotent retries, never a duplicate, but a
    /// delivery then waits for as long as the brokers are away).
    #[serde(default = "default_kafka_timeout")]
    pub delivery_timeout: Span,
    /// Extra librdkafka properties, passed as they are; all but the producer-only ones
    /// (acks, batching, compression, timeouts) also to the sink's consumers, so TLS and
    /// SASL settings reach its marks and read-backs.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum KafkaValue {
    #[default]
    Envelope,
    Raw,
}

fn default_key() -> String {
    "{source}".into()
}
fn default_raw_field() -> String {
    "message".into()
}
fn default_compression() -> String {
    "lz4".into()
}
fn default_linger() -> Span {
    Span::millis(5)
}
fn default_batch_size() -> ByteSize {
    ByteSize(1_000_000)
}
fn default_kafka_max_message() -> ByteSize {
    ByteSize::mib(1)
}
fn default_kafka_timeout() -> Span {
    Span::secs(30)
}

impl KafkaSink {
    pub fn check(&self, name: &str) -> Result<(), String> {
        if self.topic.is_empty() || self.brokers.is_empty() {
            return Err(format!("sink {name:?}: brokers and topic must be set"));
        }
        let topic =
            Template::parse(&self.topic).map_err(|e| format!("sink {name:?}: topic {e}"))?;
        Template::parse(&self.key).map_err(|e| format!("sink {name:?}: key {e}"))?;
        match (topic.constant(), &self.default_topic) {
            (Some(t), _) if !legal_topic(t) => {
                return Err(format!(
                    "sink {name:?}: topic {t:?} is not a legal Kafka topic name (1 to 249 of a-z A-Z 0-9 . _ -)"
                ))
            }
            (Some(_), Some(_)) => {
                return Err(format!(
                    "sink {name:?}: default_topic applies to a topic template; topic {:?} is one fixed topic, so there is nothing to fall back from (remove default_topic)",
                    self.topic
                ))
            }
            (None, None) => {
                return Err(format!(
                    "sink {name:?}: topic {:?} has placeholders: set default_topic, where events go whose topic cannot be rendered or does not exist",
                    self.topic
                ))
            }
            _ => {}
        }
        if let Some(d) = &self.default_topic {
            if !legal_topic(d) {
                return Err(format!(
                    "sink {name:?}: default_topic {d:?} is not a legal Kafka topic name (1 to 249 of a-z A-Z 0-9 . _ -)"
                ));
            }
        }
        if !["none", "gzip", "snappy", "lz4", "zstd"].contains(&self.compression.as_str()) {
            return Err(format!(
                "sink {name:?}: compression {:?} is not one of none, gzip, snappy, lz4, zstd",
                self.compression
            ));
        }
        if self.raw_field.is_empty() {
            return Err(format!("sink {name:?}: raw_field must name a record field"));
        }
        Ok(())
    }
}
