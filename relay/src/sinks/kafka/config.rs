//! The keys of `type = "kafka"`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sluice_core::units::{ByteSize, Span};

#[derive(Clone, Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KafkaSink {
    /// Bootstrap servers, "host:port,host:port".
    pub brokers: String,
    /// The topic every event goes to (create it first; the sink does not).
    pub topic: String,
    /// librdkafka compression codec: none, gzip, snappy, lz4, zstd.
    #[serde(default = "default_compression")]
    pub compression: String,
    /// Largest message the sink produces. At start the sink reads the topic's
    /// max.message.bytes and keeps messages and the producer's batches under it (this is
    /// lowered to it). A larger event is not produced: it is counted as dropped (reason
    /// too_large) and logged.
    #[serde(default = "default_kafka_max_message")]
    pub max_message: ByteSize,
    /// How long a batch may wait for broker acknowledgements before it is retried.
    #[serde(default = "default_kafka_timeout")]
    pub delivery_timeout: Span,
    /// Extra librdkafka properties, passed as they are.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

fn default_compression() -> String {
    "lz4".into()
}
fn default_kafka_max_message() -> ByteSize {
    ByteSize::mib(1)
}
fn default_kafka_timeout() -> Span {
    Span::secs(30)
}
