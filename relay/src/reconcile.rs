//! `sluice-relay reconcile`: compares, per tag and event-time hour, what the relay
//! received (its ledger), what each sink says it delivered, and what is really in Kafka
//! and object storage as read back from them, and lists every difference.
//!
//! "Really there" is counted by distinct provenance `(source, seq)`, so duplicates that
//! an at-least-once path produced are reported as duplicates, not as extra data. Events
//! without provenance (from plain Fluentd clients) are counted as they are.

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use serde::Deserialize;

use crate::config::{RelayConfig, SinkKind};
use crate::envelope::hour_label;
use crate::ledger::{Counts, Ledger};
use crate::sinks::object::open_store;

/// What is really in one destination.
#[derive(Default, Debug)]
pub struct Actual {
    pub counts: Counts,
    pub events: u64,
    pub duplicates: u64,
    pub unreadable: u64,
}

#[derive(Deserialize)]
struct EnvelopeHead<'a> {
    #[serde(borrow)]
    time: &'a str,
    #[serde(borrow)]
    tag: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    source: Option<std::borrow::Cow<'a, str>>,
    seq: Option<u64>,
}

impl Actual {
    fn add_line(&mut self, line: &[u8], seen: &mut HashSet<(String, u64)>) {
        let Ok(head) = serde_json::from_slice::<EnvelopeHead>(line) else {
            self.unreadable += 1;
            return;
        };
        let Some(hour) = hour_from_rfc3339(head.time) else {
            self.unreadable += 1;
            return;
        };
        self.events += 1;
        if let (Some(source), Some(seq)) = (head.source, head.seq) {
            if !seen.insert((source.into_owned(), seq)) {
                self.duplicates += 1;
                return;
            }
        }
        self.counts.add(&head.tag, hour, 1);
    }
}

/// Hours since the epoch of `YYYY-MM-DDTHH:...`.
fn hour_from_rfc3339(t: &str) -> Option<u64> {
    crate::envelope::parse_hour_label(t.get(..13)?)
}

/// Whether an object key was written by `relay` (`.../<relay>-<segment>-<offset>.ndjson.gz`).
fn written_by(key: &str, relay: &str) -> bool {
    let name = key.rsplit('/').next().unwrap_or(key);
    let Some(stem) = name.strip_suffix(".ndjson.gz") else {
        return false;
    };
    let mut parts = stem.rsplitn(3, '-');
    let (Some(offset), Some(segment), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    id == relay
        && !offset.is_empty()
        && offset.bytes().all(|b| b.is_ascii_digit())
        && segment.bytes().all(|b| b.is_ascii_digit())
}

/// Reads every object this relay wrote under the sink's prefix (other relays of a
/// cluster write to the same bucket under their own ids).
pub async fn read_object_store(
    relay: &str,
    url: &str,
    options: &BTreeMap<String, String>,
    prefix: &str,
) -> Result<Actual, String> {
    let (store, url_prefix) = open_store(url, options)?;
    let full: String = [url_prefix.as_str(), prefix.trim_matches('/')]
        .iter()
        .filter(|p| !p.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join("/");
    let list_prefix = object_store::path::Path::from(full.as_str());
    let objects: Vec<_> = store
        .list(if full.is_empty() {
            None
        } else {
            Some(&list_prefix)
        })
        .try_collect()
        .await
        .map_err(|e| format!("listing {url}: {e}"))?;
    let mut actual = Actual::default();
    let mut seen = HashSet::new();
    let mut text = Vec::new();
    for meta in objects {
        if !written_by(meta.location.as_ref(), relay) {
            continue;
        }
        let bytes = store
            .get(&meta.location)
            .await
            .map_err(|e| format!("get {}: {e}", meta.location))?
            .bytes()
            .await
            .map_err(|e| format!("read {}: {e}", meta.location))?;
        text.clear();
        flate2::read::MultiGzDecoder::new(&bytes[..])
            .read_to_end(&mut text)
            .map_err(|e| format!("{} is not valid gzip: {e}", meta.location))?;
        for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            actual.add_line(line, &mut seen);
        }
    }
    Ok(actual)
}

/// Reads the whole topic. The end of each partition is found by the consumer's
/// partition-EOF event rather than by ListOffsets watermarks, which some Kafka-API brokers
/// (tansu 0.6) do not report reliably.
pub fn read_kafka(brokers: &str, topic: &str, timeout: Duration) -> Result<Actual, String> {
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
    let mut actual = Actual::default();
    let mut seen = HashSet::new();
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
            Some(Ok(msg)) => actual.add_line(msg.payload().unwrap_or_default(), &mut seen),
        }
    }
    Ok(actual)
}

/// Builds the report; returns it with `true` when everything agrees.
pub async fn report(
    config: &RelayConfig,
    kafka_timeout: Duration,
) -> Result<(String, bool), String> {
    let ledger_path = config.relay.data_dir.join("ledger.json");
    let ledger = Ledger::load(&ledger_path)?;
    let mut actuals: BTreeMap<String, Actual> = BTreeMap::new();
    for sink in config.sinks.iter().filter(|s| s.enabled) {
        let actual = match &sink.kind {
            SinkKind::Kafka(k) => {
                let (brokers, topic) = (k.brokers.clone(), k.topic.clone());
                tokio::task::spawn_blocking(move || read_kafka(&brokers, &topic, kafka_timeout))
                    .await
                    .map_err(|e| e.to_string())??
            }
            SinkKind::ObjectStore(o) => {
                read_object_store(&config.relay.id, &o.url, &o.options, &o.prefix).await?
            }
            SinkKind::File { path } => {
                let mut actual = Actual::default();
                let mut seen = HashSet::new();
                let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
                for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                    actual.add_line(line, &mut seen);
                }
                actual
            }
            SinkKind::Discard => continue,
        };
        actuals.insert(sink.name.clone(), actual);
    }

    let mut keys: std::collections::BTreeSet<(String, u64)> = ledger
        .received
        .keys()
        .map(|(t, h)| (t.to_string(), h))
        .collect();
    for a in actuals.values() {
        keys.extend(a.counts.keys().map(|(t, h)| (t.to_string(), h)));
    }
    let mut out = String::new();
    use std::fmt::Write;
    let _ = writeln!(
        out,
        "reconciliation for relay {} (ledger {})",
        ledger.relay,
        ledger_path.display()
    );
    let _ = write!(out, "{:<24} {:<13} {:>10}", "tag", "hour (UTC)", "received");
    for name in actuals.keys() {
        let _ = write!(
            out,
            " {:>12} {:>12}",
            format!("{name}:ledger"),
            format!("{name}:found")
        );
    }
    let _ = writeln!(out, "  status");
    let mut all_ok = true;
    for (tag, hour) in &keys {
        let received = ledger.received.get(tag, *hour);
        let _ = write!(
            out,
            "{:<24} {:<13} {:>10}",
            tag,
            hour_label(*hour),
            received
        );
        let mut problems = Vec::new();
        for (name, actual) in &actuals {
            let counts = ledger.sinks.get(name).cloned().unwrap_or_default();
            let delivered = counts.delivered.get(tag, *hour);
            let dropped = counts.dropped.get(tag, *hour);
            let found = actual.counts.get(tag, *hour);
            let _ = write!(out, " {:>12} {:>12}", delivered, found);
            if delivered + dropped < received {
                problems.push(format!(
                    "{name}: {} not delivered yet",
                    received - delivered - dropped
                ));
            }
            if dropped > 0 {
                problems.push(format!("{name}: {dropped} dropped (see sink_dropped)"));
            }
            if found < delivered {
                problems.push(format!("{name}: {} missing", delivered - found));
            } else if found > delivered {
                problems.push(format!(
                    "{name}: {} more than the ledger",
                    found - delivered
                ));
            }
        }
        if problems.is_empty() {
            let _ = writeln!(out, "  ok");
        } else {
            all_ok = false;
            let _ = writeln!(out, "  {}", problems.join("; "));
        }
    }
    let _ = writeln!(
        out,
        "total received {} (duplicates trimmed by dedup: {})",
        ledger.received.total(),
        ledger.duplicates
    );
    for (name, a) in &actuals {
        let _ = writeln!(
            out,
            "{name}: {} events found, {} distinct, {} duplicates, {} unreadable",
            a.events,
            a.counts.total(),
            a.duplicates,
            a.unreadable
        );
        if a.unreadable > 0 {
            all_ok = false;
        }
    }
    let _ = writeln!(
        out,
        "{}",
        if all_ok {
            "RESULT: all sinks agree with the ledger"
        } else {
            "RESULT: differences found (see status column)"
        }
    );
    Ok((out, all_ok))
}

#[cfg(test)]
mod tests {
    #[test]
    fn hours_round_trip() {
        let h = super::hour_from_rfc3339("2026-11-18T11:06:40.000000005Z").unwrap();
        assert_eq!(h, 1_795_000_000 / 3600);
        assert_eq!(crate::envelope::hour_label(h), "2026-11-18T11");
        assert!(super::hour_from_rfc3339("yesterday").is_none());
    }
}
