//! What is really in a destination, as read back from it for `sluice-relay reconcile`.
//!
//! "Really there" is counted by distinct provenance `(source, seq)`, so duplicates that
//! an at-least-once path produced are reported as duplicates, not as extra data. Events
//! without provenance (from plain Fluentd clients) are counted as they are. Each sink
//! type reads its destination back in its own folder (`sinks/*/`) into a [`Found`].

use std::collections::HashSet;

use serde::Deserialize;

use crate::ledger::Counts;

/// What is really in one destination.
#[derive(Default, Debug)]
pub struct Found {
    /// Distinct events per tag and event-time hour.
    pub counts: Counts,
    /// Every event read, duplicates included.
    pub events: u64,
    pub duplicates: u64,
    /// Lines that are not a sluice envelope.
    pub unreadable: u64,
    seen: HashSet<(String, u64)>,
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

/// An object line: the record's fields and sluice's four (`envelope::write_flat`).
#[derive(Deserialize)]
struct FlatHead<'a> {
    #[serde(rename = "_time", borrow)]
    time: Option<&'a str>,
    #[serde(rename = "_tag", borrow)]
    tag: Option<std::borrow::Cow<'a, str>>,
    #[serde(rename = "_source", borrow)]
    source: Option<std::borrow::Cow<'a, str>>,
    #[serde(rename = "_seq")]
    seq: Option<u64>,
}

impl Found {
    /// Counts one line: an object line (record and `_time`, `_tag`, `_source`, `_seq`)
    /// or a JSON envelope (Kafka, the file sink).
    pub fn add_line(&mut self, line: &[u8]) {
        let flat = serde_json::from_slice::<FlatHead>(line).ok().and_then(|f| {
            Some(EnvelopeHead {
                time: f.time?,
                tag: f.tag?,
                source: f.source,
                seq: f.seq,
            })
        });
        if flat.is_none() && self.add_flat_with_repeated_keys(line) {
            return;
        }
        let Some(head) = flat.or_else(|| serde_json::from_slice::<EnvelopeHead>(line).ok()) else {
            self.unreadable += 1;
            return;
        };
        let Some(hour) = hour_from_rfc3339(head.time) else {
            self.unreadable += 1;
            return;
        };
        self.events += 1;
        if let (Some(source), Some(seq)) = (head.source, head.seq) {
            if !self.seen.insert((source.into_owned(), seq)) {
                self.duplicates += 1;
                return;
            }
        }
        self.counts.add(&head.tag, hour, 1);
    }

    /// An object line whose record has a field named like one of sluice's four (JSON
    /// with a key twice, which the borrowing parse refuses): the last of each counts, as
    /// the line's writer promised. Returns whether the line was one.
    fn add_flat_with_repeated_keys(&mut self, line: &[u8]) -> bool {
        let Ok(map) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(line)
        else {
            return false;
        };
        let (Some(time), Some(tag)) = (
            map.get("_time").and_then(|v| v.as_str()),
            map.get("_tag").and_then(|v| v.as_str()),
        ) else {
            return false;
        };
        let Some(hour) = hour_from_rfc3339(time) else {
            return false;
        };
        self.events += 1;
        let source = map.get("_source").and_then(|v| v.as_str());
        let seq = map.get("_seq").and_then(|v| v.as_u64());
        if let (Some(source), Some(seq)) = (source, seq) {
            if !self.seen.insert((source.to_string(), seq)) {
                self.duplicates += 1;
                return true;
            }
        }
        self.counts.add(tag, hour, 1);
        true
    }

    /// Counts every non-empty line of newline-delimited envelopes.
    pub fn add_ndjson(&mut self, text: &[u8]) {
        for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            self.add_line(line);
        }
    }
}

/// Hours since the epoch of `YYYY-MM-DDTHH:...`.
fn hour_from_rfc3339(t: &str) -> Option<u64> {
    crate::envelope::parse_hour_label(t.get(..13)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hours_round_trip() {
        let h = hour_from_rfc3339("2026-11-18T11:06:40.000000005Z").unwrap();
        assert_eq!(h, 1_795_000_000 / 3600);
        assert_eq!(crate::envelope::hour_label(h), "2026-11-18T11");
        assert!(hour_from_rfc3339("yesterday").is_none());
    }

    #[test]
    fn duplicates_are_counted_once() {
        let mut found = Found::default();
        let line = br#"{"time":"2026-11-18T11:06:40Z","tag":"t","source":"s","seq":1,"record":{}}"#;
        let flat = br#"{"time":"x","tag":"y","_time":"2026-11-18T11:06:40Z","_tag":"t","_source":"s","_seq":2}"#;
        // A record with its own `_tag` and `_seq`: sluice's (the last) count.
        let repeated = br#"{"_tag":"mine","_seq":"x","_time":"2026-11-18T11:06:40Z","_tag":"t","_source":"s","_seq":3}"#;
        found.add_ndjson(
            &[
                &line[..],
                b"\n",
                &line[..],
                b"\nnot json\n",
                &flat[..],
                b"\n",
                &flat[..],
                b"\n",
                &repeated[..],
                b"\n",
            ]
            .concat(),
        );
        assert_eq!(
            (found.events, found.duplicates, found.unreadable),
            (5, 2, 1)
        );
        assert_eq!(found.counts.total(), 3);
    }
}
