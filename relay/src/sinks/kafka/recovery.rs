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
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};

/// How long a partition may give nothing before its read starts further back.
const STEP_BACK_AFTER: Duration = Duration::from_secs(3);

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

/// `(agent, source, seq)` of this relay's messages found in Kafka. The agent (header
/// `agent`: the authenticated client, else the host of the source id) keeps apart two
/// clients that send the same source id, as the relay's dedup does.
#[derive(Debug, Default)]
pub struct Found {
    by_agent: HashMap<String, HashMap<String, HashSet<u64>>>,
    /// Messages read (all producers').
    pub messages: u64,
}

impl Found {
    pub fn contains(&self, agent: Option<&str>, source: &str, seq: u64) -> bool {
        self.by_agent
            .get(agent.unwrap_or(""))
            .and_then(|sources| sources.get(source))
            .is_some_and(|s| s.contains(&seq))
    }

    pub fn insert(&mut self, agent: Option<&str>, source: &str, seq: u64) {
        let agent = agent.unwrap_or("");
        let sources = match self.by_agent.get_mut(agent) {
            Some(s) => s,
            None => self.by_agent.entry(agent.to_string()).or_default(),
        };
        match sources.get_mut(source) {
            Some(seqs) => {
                seqs.insert(seq);
            }
            None => {
                sources.insert(source.to_string(), HashSet::from([seq]));
            }
        }
    }

    pub fn events(&self) -> usize {
        self.by_agent
            .values()
            .flat_map(|s| s.values())
            .map(HashSet::len)
            .sum()
    }
}

/// A Kafka call that failed, with librdkafka's code when it has one (the sink decides
/// from it whether retrying can help).
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub code: Option<RDKafkaErrorCode>,
    /// A read-back that read nothing for its stall time.
    pub stalled: bool,
}

impl Failure {
    fn of(what: impl std::fmt::Display, e: &KafkaError) -> Failure {
        Failure {
            message: format!("{what}: {e}"),
            code: e.rdkafka_error_code(),
            stalled: false,
        }
    }

    pub fn plain(message: String) -> Failure {
        Failure {
            message,
            code: None,
            stalled: false,
        }
    }
}

/// librdkafka properties only a producer reads: not given to the sink's consumers (which
/// would log a warning for each).
const PRODUCER_ONLY: &[&str] = &[
    "acks",
    "request.required.acks",
    "batch.size",
    "batch.num.messages",
    "linger.ms",
    "queue.buffering.max.ms",
    "queue.buffering.max.messages",
    "queue.buffering.max.kbytes",
    "compression.type",
    "compression.codec",
    "compression.level",
    "enable.idempotence",
    "enable.gapless.guarantee",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "request.timeout.ms",
    "retries",
    "message.send.max.retries",
    "retry.backoff.ms",
    "max.in.flight.requests.per.connection",
    "max.in.flight",
    "transactional.id",
    "transaction.timeout.ms",
    "partitioner",
    "sticky.partitioning.linger.ms",
];

/// A consumer for marks and read-backs: the sink's properties (its TLS, SASL and client
/// settings) except those only a producer reads; `read_uncommitted`, so a transaction
/// another producer holds open on a shared topic does not hide this relay's messages
/// after it.
pub fn consumer(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    group: &str,
) -> Result<BaseConsumer, String> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (k, v) in properties {
        if !PRODUCER_ONLY.contains(&k.as_str()) {
            config.set(k, v);
        }
    }
    config
        .set("group.id", format!("{group}-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_uncommitted");
    config.create().map_err(|e| format!("Kafka consumer: {e}"))
}

/// Takes the events librdkafka queued for a consumer that is not reading (errors such as
/// "all brokers down" while a broker was away), so they neither pile up nor meet a
/// later read.
pub fn drain(consumer: &BaseConsumer) {
    for _ in 0..10_000 {
        if consumer.poll(Duration::ZERO).is_none() {
            break;
        }
    }
}

/// The partitions of `topic`; none when the topic does not exist. Any other error of
/// the topic (authorization, no leader yet) is an error, with its code.
pub fn partitions(
    consumer: &BaseConsumer,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<i32>, Failure> {
    drain(consumer);
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| Failure::of(format_args!("Kafka metadata for {topic}"), &e))?;
    let mut found = Vec::new();
    for t in metadata.topics().iter().filter(|t| t.name() == topic) {
        match t.error() {
            None => found.extend(t.partitions().iter().map(|p| p.id())),
            Some(e) => {
                let code = RDKafkaErrorCode::from(e);
                if code != RDKafkaErrorCode::UnknownTopicOrPartition {
                    return Err(Failure {
                        message: format!("Kafka metadata for {topic}: {code}"),
                        code: Some(code),
                        stalled: false,
                    });
                }
            }
        }
    }
    Ok(found)
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
) -> Result<TopicMarks, Failure> {
    drain(consumer);
    let mut query = TopicPartitionList::new();
    for (topic, parts) in topics {
        for p in *parts {
            query
                .add_partition_offset(topic, *p, Offset::End)
                .map_err(|e| Failure::of("Kafka end offsets", &e))?;
        }
    }
    let mut marks = TopicMarks::new();
    if query.count() == 0 {
        return Ok(marks);
    }
    let answer = consumer
        .offsets_for_times(query, timeout)
        .map_err(|e| Failure::of("Kafka end offsets", &e))?;
    for e in answer.elements() {
        match e.offset() {
            Offset::Offset(o) => {
                marks
                    .entry(e.topic().to_string())
                    .or_default()
                    .insert(e.partition(), o.saturating_sub(1).max(0));
            }
            other => {
                return Err(Failure {
                    message: format!(
                        "Kafka end offset of {}/{}: {other:?} ({:?})",
                        e.topic(),
                        e.partition(),
                        e.error()
                    ),
                    code: e.error().err().and_then(|e| e.rdkafka_error_code()),
                    stalled: false,
                })
            }
        }
    }
    Ok(marks)
}

/// Reads every partition of the topics of `from` from its mark (a partition without
/// one from its beginning) to its end and collects the `(agent, source, seq)` of the
/// messages whose header `relay` is `relay`, or that have no `relay` header (written by
/// a version before it). One topic after the other: the end of a partition is
/// librdkafka's partition-EOF event (the high watermark of a Fetch response), which
/// names the partition only. Fails when nothing was read for `stall` (a long read that
/// makes progress goes on).
pub fn read_back(
    consumer: &BaseConsumer,
    from: &TopicMarks,
    relay: &str,
    stall: Duration,
) -> Result<Found, Failure> {
    let mut found = Found::default();
    for (topic, marks) in from {
        read_topic(consumer, topic, marks, relay, stall, &mut found)?;
    }
    Ok(found)
}

fn read_topic(
    consumer: &BaseConsumer,
    topic: &str,
    from: &Marks,
    relay: &str,
    stall: Duration,
    found: &mut Found,
) -> Result<(), Failure> {
    let mut assignment = TopicPartitionList::new();
    let mut remaining = HashSet::new();
    // Per partition: where its read started, how far the next step back goes, and when
    // it last gave anything.
    let mut starts: HashMap<i32, (i64, i64, Instant)> = HashMap::new();
    for p in partitions(consumer, topic, stall)? {
        let offset = from
            .get(&p)
            .map_or(Offset::Beginning, |o| Offset::Offset(*o));
        if let Some(o) = from.get(&p) {
            starts.insert(p, (*o, 1, Instant::now()));
        }
        assignment
            .add_partition_offset(topic, p, offset)
            .map_err(|e| Failure::of("Kafka read-back", &e))?;
        remaining.insert(p);
    }
    if remaining.is_empty() {
        return Ok(());
    }
    consumer
        .assign(&assignment)
        .map_err(|e| Failure::of("Kafka read-back", &e))?;
    let mut progress = Instant::now();
    // librdkafka reports passing trouble (a broker down, a connection reset) as errors it
    // recovers from by itself: noted, the read goes on until it stalls.
    let mut trouble: Option<KafkaError> = None;
    let result = loop {
        if remaining.is_empty() {
            break Ok(());
        }
        if progress.elapsed() > stall {
            let why = trouble
                .as_ref()
                .map(|e| format!(" (last error: {e})"))
                .unwrap_or_default();
            break Err(Failure {
                message: format!(
                    "Kafka: nothing read for {stall:?} while reading back partitions {remaining:?} of {topic}{why}"
                ),
                code: trouble.as_ref().and_then(|e| e.rdkafka_error_code()),
                stalled: true,
            });
        }
        // A partition that gives nothing from its mark, not even its end: tansu 0.6
        // answers a fetch from inside a record batch with nothing, and a mark is one
        // before the end it reports, which is not always a batch's first offset. Start
        // it further back (1, 4, 16, ... offsets): reading more is always safe.
        for p in remaining.iter() {
            if let Some((start, step, since)) = starts.get_mut(p) {
                if since.elapsed() > STEP_BACK_AFTER && *start > 0 {
                    *start = start.saturating_sub(*step).max(0);
                    *step = step.saturating_mul(4);
                    *since = Instant::now();
                    let _ =
                        consumer.seek(topic, *p, Offset::Offset(*start), Duration::from_secs(5));
                }
            }
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                progress = Instant::now();
                remaining.remove(&p);
            }
            Some(Err(e)) => trouble = Some(e),
            Some(Ok(msg)) => {
                progress = Instant::now();
                if let Some((_, _, since)) = starts.get_mut(&msg.partition()) {
                    *since = Instant::now();
                }
                found.messages += 1;
                let Some(headers) = msg.headers() else {
                    continue;
                };
                let (mut source, mut seq, mut agent, mut theirs) = (None, None, None, false);
                for h in headers.iter() {
                    match (h.key, h.value) {
                        ("source", Some(v)) => source = std::str::from_utf8(v).ok(),
                        ("seq", Some(v)) => {
                            seq = std::str::from_utf8(v).ok().and_then(|v| v.parse().ok())
                        }
                        ("agent", Some(v)) => agent = std::str::from_utf8(v).ok(),
                        ("relay", v) => theirs = v != Some(relay.as_bytes()),
                        _ => {}
                    }
                }
                if let (false, Some(source), Some(seq)) = (theirs, source, seq) {
                    found.insert(agent, source, seq);
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
    fn found_is_by_agent_and_source() {
        let mut a = Found::default();
        a.insert(Some("web-1"), "h:1", 3);
        a.insert(Some("web-1"), "h:1", 4);
        a.insert(Some("web-1"), "h:2", 4);
        a.insert(None, "h:9", 1);
        assert!(a.contains(Some("web-1"), "h:1", 3) && a.contains(Some("web-1"), "h:2", 4));
        assert!(
            !a.contains(Some("web-2"), "h:1", 3),
            "another client's source of the same name"
        );
        assert!(!a.contains(Some("web-1"), "h:2", 3) && !a.contains(Some("web-1"), "h:3", 4));
        assert!(a.contains(None, "h:9", 1) && !a.contains(Some("web-1"), "h:9", 1));
        assert_eq!(a.events(), 4);
    }
}
