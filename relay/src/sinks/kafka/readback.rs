//! Reads the sink's topic back for `reconcile`.

use std::time::{Duration, Instant};

use crate::readback::Found;

/// Reads the whole topic. The end of each partition is found by the consumer's
/// partition-EOF event rather than by ListOffsets watermarks, which some Kafka-API brokers
/// (tansu 0.6) do not report reliably.
pub fn read_kafka(brokers: &str, topic: &str, timeout: Duration) -> Result<Found, String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::error::KafkaError;
    use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("sluice-reconcile-{}", std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .create()
        .map_err(|e| format!("Kafka consumer: {e}"))?;
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| format!("Kafka metadata for {topic}: {e}"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(format!(
            "Kafka: topic {topic} has no partitions (does it exist?)"
        ));
    }
    let mut assignment = TopicPartitionList::new();
    let mut remaining = std::collections::BTreeSet::new();
    for p in &partitions {
        remaining.insert(*p);
        assignment
            .add_partition_offset(topic, *p, Offset::Beginning)
            .map_err(|e| e.to_string())?;
    }
    consumer.assign(&assignment).map_err(|e| e.to_string())?;
    let mut found = Found::default();
    let deadline = Instant::now() + timeout;
    while !remaining.is_empty() {
        if Instant::now() > deadline {
            return Err(format!(
                "Kafka: partitions {remaining:?} of {topic} not read to their end within {timeout:?}"
            ));
        }
        match consumer.poll(Duration::from_millis(500)) {
            None => continue,
            Some(Err(KafkaError::PartitionEOF(p))) => {
                remaining.remove(&p);
            }
            Some(Err(e)) => return Err(format!("Kafka consume from {topic}: {e}")),
            Some(Ok(msg)) => found.add_line(msg.payload().unwrap_or_default()),
        }
    }
    Ok(found)
}
