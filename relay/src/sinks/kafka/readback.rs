//! Reads the sink's topic back for `reconcile`.

use std::time::{Duration, Instant};

use crate::readback::Found;

/// The sink's librdkafka properties: its TLS, SASL and client settings reach the reads.
type Properties = std::collections::BTreeMap<String, String>;

/// Reads the whole topic. The end of each partition is found by the consumer's
/// partition-EOF event rather than by ListOffsets watermarks, which some Kafka-API brokers
/// (tansu 0.6) do not report reliably.
pub fn read_kafka(
    brokers: &str,
    properties: &Properties,
    topic: &str,
    timeout: Duration,
) -> Result<Found, String> {
    let mut found = Found::default();
    consume_from(brokers, properties, topic, timeout, None, &mut |p| {
        found.add_line(p)
    })?;
    Ok(found)
}

/// How a windowed read went.
#[derive(Debug, Default)]
pub struct KafkaRead {
    pub messages: u64,
    pub partitions: usize,
    /// Partitions read from their beginning because the broker did not answer
    /// offsets-for-times for them.
    pub from_beginning: usize,
    /// Partitions with no message at or after the window's start (nothing to read).
    pub skipped: usize,
}

/// Reads the topic into `found` from, in each partition, the first message whose
/// timestamp (the event time, as the sink sets it) is at or after `from_ms` — found by
/// offsets-for-times, so a window costs what it holds, not the whole topic — to the
/// partition's end. Earlier messages all have earlier timestamps, so no event of the
/// window is before that offset; later ones outside the window are passed over by
/// `found`'s window. `progress` is told the messages read so far now and then.
pub fn read_kafka_from(
    brokers: &str,
    properties: &Properties,
    topic: &str,
    timeout: Duration,
    from_ms: Option<i64>,
    found: &mut Found,
    progress: &mut dyn FnMut(u64),
) -> Result<KafkaRead, String> {
    let mut n = 0u64;
    consume_from(
        brokers,
        properties,
        topic,
        timeout,
        from_ms,
        &mut |payload| {
            found.add_line(payload);
            n += 1;
            if n.is_multiple_of(100_000) {
                progress(n);
            }
        },
    )
}

/// Reads the topic as [`read_kafka_from`] does, handing each message's value to `each`.
/// The consumer has the sink's properties but those only a producer reads.
pub fn consume_from(
    brokers: &str,
    properties: &Properties,
    topic: &str,
    timeout: Duration,
    from_ms: Option<i64>,
    each: &mut dyn FnMut(&[u8]),
) -> Result<KafkaRead, String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::error::KafkaError;
    use rdkafka::{Message, Offset, TopicPartitionList};
    let consumer: BaseConsumer =
        super::recovery::consumer(brokers, properties, "sluice-reconcile")?;
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
    let mut read = KafkaRead {
        partitions: partitions.len(),
        ..KafkaRead::default()
    };
    let mut starts: std::collections::BTreeMap<i32, Offset> =
        partitions.iter().map(|p| (*p, Offset::Beginning)).collect();
    if let Some(ms) = from_ms {
        let mut times = TopicPartitionList::new();
        for p in &partitions {
            times
                .add_partition_offset(topic, *p, Offset::Offset(ms))
                .map_err(|e| e.to_string())?;
        }
        match consumer.offsets_for_times(times, timeout) {
            Ok(answer) => {
                for e in answer.elements() {
                    match e.offset() {
                        Offset::Offset(n) if n >= 0 && e.error().is_ok() => {
                            starts.insert(e.partition(), Offset::Offset(n));
                        }
                        Offset::End if e.error().is_ok() => {
                            starts.remove(&e.partition());
                            read.skipped += 1;
                        }
                        _ => read.from_beginning += 1,
                    }
                }
            }
            Err(e) => {
                tracing::warn!(topic, error = %e, "Kafka offsets-for-times failed; reading the partitions from their beginning");
                read.from_beginning = partitions.len();
            }
        }
    }
    let mut assignment = TopicPartitionList::new();
    let mut remaining = std::collections::BTreeSet::new();
    for (p, start) in &starts {
        remaining.insert(*p);
        assignment
            .add_partition_offset(topic, *p, *start)
            .map_err(|e| e.to_string())?;
    }
    if remaining.is_empty() {
        return Ok(read);
    }
    consumer.assign(&assignment).map_err(|e| e.to_string())?;
    let mut deadline = Instant::now() + timeout;
    while !remaining.is_empty() {
        if Instant::now() > deadline {
            return Err(format!(
                "Kafka: partitions {remaining:?} of {topic} not read to their end: nothing came for {timeout:?}"
            ));
        }
        match consumer.poll(Duration::from_millis(500)) {
            None => continue,
            Some(Err(KafkaError::PartitionEOF(p))) => {
                remaining.remove(&p);
            }
            Some(Err(e)) => return Err(format!("Kafka consume from {topic}: {e}")),
            Some(Ok(msg)) => {
                each(msg.payload().unwrap_or_default());
                read.messages += 1;
                // The time limit is for making no progress: a paced reader (replay
                // --rate) may take longer in all.
                deadline = Instant::now() + timeout;
            }
        }
    }
    Ok(read)
}
