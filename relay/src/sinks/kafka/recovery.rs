//! What a delivery cut short may already have written to Kafka: a failed attempt (a
//! timed-out message may still have landed) or a run killed in the middle of a delivery.
//!
//! Before a delivery produces anything the sink takes the topic's *marks*: the end of
//! every partition as the broker reports it. Whatever that delivery, its retries, or the
//! run that died during it wrote lies at or after the marks, so reading back from them
//! (not from the partitions' beginning) finds all of it, however large the topic and
//! however many other producers share it. Only this relay's messages (header `relay`)
//! are kept, so the set is bounded by what this relay wrote since the marks.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};

/// Per partition, an offset at or before which nothing of a delivery can lie.
pub type Marks = BTreeMap<i32, i64>;

/// The lower of two marks per partition; a partition only one of them knows keeps that
/// one's offset (a partition in neither is read from its beginning).
pub fn earliest(a: &Marks, b: &Marks) -> Marks {
    let mut out = a.clone();
    for (p, o) in b {
        out.entry(*p)
            .and_modify(|m| *m = (*m).min(*o))
            .or_insert(*o);
    }
    out
}

/// `(source, seq)` of this relay's messages found in Kafka.
#[derive(Debug, Default)]
pub struct Found {
    by_source: HashMap<String, HashSet<u64>>,
    /// Messages read (all producers').
    pub messages: u64,
}

impl Found {
    pub fn contains(&self, source: &str, seq: u64) -> bool {
        self.by_source.get(source).is_some_and(|s| s.contains(&seq))
    }

    pub fn insert(&mut self, source: &str, seq: u64) {
        match self.by_source.get_mut(source) {
            Some(seqs) => {
                seqs.insert(seq);
            }
            None => {
                self.by_source
                    .insert(source.to_string(), HashSet::from([seq]));
            }
        }
    }

    pub fn events(&self) -> usize {
        self.by_source.values().map(HashSet::len).sum()
    }
}

/// A consumer for marks and read-backs, with the sink's connection properties
/// (`security.*`, `ssl.*`, `sasl.*`, `client.*`, `socket.*`, `broker.*`).
pub fn consumer(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    group: &str,
) -> Result<BaseConsumer, String> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{group}-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest");
    for (k, v) in properties {
        let connection = [
            "security.",
            "ssl.",
            "sasl.",
            "client.",
            "socket.",
            "broker.",
        ];
        if connection.iter().any(|p| k.starts_with(p)) {
            config.set(k, v);
        }
    }
    config.create().map_err(|e| format!("Kafka consumer: {e}"))
}

/// The partitions of `topic`; none when the topic does not exist.
pub fn partitions(
    consumer: &BaseConsumer,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<i32>, String> {
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| format!("Kafka metadata for {topic}: {e}"))?;
    Ok(metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect())
}

/// Per topic, its partitions' marks.
pub type TopicMarks = BTreeMap<String, Marks>;

/// The lower of two marks per topic and partition (see [`earliest`]).
pub fn earliest_of_topics(a: &TopicMarks, b: &TopicMarks) -> TopicMarks {
    let mut out = a.clone();
    for (topic, marks) in b {
        let merged = match out.get(topic) {
            Some(m) => earliest(m, marks),
            None => marks.clone(),
        };
        out.insert(topic.clone(), merged);
    }
    out
}

/// One before the end of every partition of `topics` (ListOffsets "latest", one request
/// per broker): a read from there starts at a message. A broker may report less than the
/// real end, never more, which only makes a read-back longer: tansu 0.6 reports the last
/// record batch's first offset + 1, and answers a fetch from inside a batch with nothing,
/// so a read from the reported end itself would never reach the partition's end there.
pub fn marks(
    consumer: &BaseConsumer,
    topics: &[(&str, &[i32])],
    timeout: Duration,
) -> Result<TopicMarks, String> {
    let mut query = TopicPartitionList::new();
    for (topic, parts) in topics {
        for p in *parts {
            query
                .add_partition_offset(topic, *p, Offset::End)
                .map_err(|e| e.to_string())?;
        }
    }
    let mut marks = TopicMarks::new();
    if query.count() == 0 {
        return Ok(marks);
    }
    let answer = consumer
        .offsets_for_times(query, timeout)
        .map_err(|e| format!("Kafka end offsets: {e}"))?;
    for e in answer.elements() {
        match e.offset() {
            Offset::Offset(o) => {
                marks
                    .entry(e.topic().to_string())
                    .or_default()
                    .insert(e.partition(), o.saturating_sub(1).max(0));
            }
            other => {
                return Err(format!(
                    "Kafka end offset of {}/{}: {other:?} ({:?})",
                    e.topic(),
                    e.partition(),
                    e.error()
                ))
            }
        }
    }
    Ok(marks)
}

/// Reads every partition of the topics of `from` from its mark (a partition without
/// one from its beginning) to its end and collects the `(source, seq)` of the messages
/// whose header `relay` is `relay`, or that have no `relay` header (written by a version
/// before it). One topic after the other: the end of a partition is librdkafka's
/// partition-EOF event (the high watermark of a Fetch response), which names the
/// partition only.
pub fn read_back(
    consumer: &BaseConsumer,
    from: &TopicMarks,
    relay: &str,
    timeout: Duration,
) -> Result<Found, String> {
    let deadline = Instant::now() + timeout;
    let mut found = Found::default();
    for (topic, marks) in from {
        read_topic(consumer, topic, marks, relay, deadline, &mut found)?;
    }
    Ok(found)
}

fn read_topic(
    consumer: &BaseConsumer,
    topic: &str,
    from: &Marks,
    relay: &str,
    deadline: Instant,
    found: &mut Found,
) -> Result<(), String> {
    let timeout = deadline.saturating_duration_since(Instant::now());
    let mut assignment = TopicPartitionList::new();
    let mut remaining = HashSet::new();
    for p in partitions(consumer, topic, timeout.max(Duration::from_secs(1)))? {
        let offset = from
            .get(&p)
            .map_or(Offset::Beginning, |o| Offset::Offset(*o));
        assignment
            .add_partition_offset(topic, p, offset)
            .map_err(|e| e.to_string())?;
        remaining.insert(p);
    }
    if remaining.is_empty() {
        return Ok(());
    }
    consumer.assign(&assignment).map_err(|e| e.to_string())?;
    let result = loop {
        if remaining.is_empty() {
            break Ok(());
        }
        if Instant::now() > deadline {
            break Err(format!(
                "Kafka: partitions {remaining:?} of {topic} not read back to their end in time"
            ));
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                remaining.remove(&p);
            }
            Some(Err(e)) => break Err(format!("Kafka read-back of {topic}: {e}")),
            Some(Ok(msg)) => {
                found.messages += 1;
                let Some(headers) = msg.headers() else {
                    continue;
                };
                let (mut source, mut seq, mut theirs) = (None, None, false);
                for h in headers.iter() {
                    match (h.key, h.value) {
                        ("source", Some(v)) => source = std::str::from_utf8(v).ok(),
                        ("seq", Some(v)) => {
                            seq = std::str::from_utf8(v).ok().and_then(|v| v.parse().ok())
                        }
                        ("relay", v) => theirs = v != Some(relay.as_bytes()),
                        _ => {}
                    }
                }
                if let (false, Some(source), Some(seq)) = (theirs, source, seq) {
                    found.insert(source, seq);
                }
            }
        }
    };
    let _ = consumer.unassign();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earliest_takes_the_lower_mark_of_each_partition() {
        let a = Marks::from([(0, 10), (1, 50)]);
        let b = Marks::from([(1, 40), (2, 7)]);
        assert_eq!(earliest(&a, &b), Marks::from([(0, 10), (1, 40), (2, 7)]));
        assert_eq!(earliest(&a, &Marks::new()), a);
    }

    #[test]
    fn found_is_by_source() {
        let mut a = Found::default();
        a.insert("h:1", 3);
        a.insert("h:1", 4);
        a.insert("h:2", 4);
        assert!(a.contains("h:1", 3) && a.contains("h:1", 4) && a.contains("h:2", 4));
        assert!(!a.contains("h:2", 3) && !a.contains("h:3", 4));
        assert_eq!(a.events(), 3);
    }
}
