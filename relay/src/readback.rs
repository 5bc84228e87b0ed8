//! What is really in a destination, as read back from it for `sluice-relay reconcile`.
//!
//! "Really there" is counted by distinct provenance `(source, seq)`, so duplicates that
//! an at-least-once path produced are reported as duplicates, not as extra data. Events
//! without provenance (from plain Fluentd clients) are counted as they are. Each sink
//! type reads its destination back in its own folder (`sinks/*/`) into a [`Found`].
//!
//! Seqs are kept as ranges per (tag, hour, source) ([`SeqRanges`]): memory follows the
//! sources (and the gaps), not the events.

use std::collections::BTreeMap;

use sluice_core::ranges::SeqRanges;

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
    /// tag -> hour -> source -> the seqs found, and those found more than once.
    pub seqs: BTreeMap<String, BTreeMap<u64, BTreeMap<String, SourceSeqs>>>,
    /// Only events of these hours (`[from, to)`, hours since the epoch) and of this tag
    /// are counted; the others are passed over ([`Found::outside`]).
    pub window: Option<(u64, u64)>,
    pub only_tag: Option<String>,
    /// Events read but outside the window or of another tag.
    pub outside: u64,
    /// Per source, the seqs of its events read outside the window: a seq there is not a
    /// gap (an event whose time fell just outside, say).
    pub beyond: std::collections::HashMap<String, SeqRanges>,
    /// Sources whose events carry byte offsets: sluice agents that number events 0, 1,
    /// 2, ..., so a gap in their seqs is a missing event (older agents numbered by byte
    /// offset, and other clients as they like).
    pub contiguous: std::collections::HashSet<String>,
}

/// What was found of one source in one (tag, hour).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceSeqs {
    pub found: SeqRanges,
    /// Seqs found twice or more.
    pub duplicated: SeqRanges,
    /// Events found more than once, counted with their repeats.
    pub duplicates: u64,
}

#[derive(Deserialize)]
pub(crate) struct EnvelopeHead<'a> {
    #[serde(borrow)]
    pub time: &'a str,
    #[serde(borrow)]
    pub tag: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    pub source: Option<std::borrow::Cow<'a, str>>,
    pub seq: Option<u64>,
    #[serde(default)]
    pub offset: Option<u64>,
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
    #[serde(rename = "_offset", default)]
    offset: Option<u64>,
}

impl Found {
    /// Counts one line: an object line (record and `_time`, `_tag`, `_source`, `_seq`)
    /// or a JSON envelope (Kafka, the file sink).
    pub fn add_line(&mut self, line: &[u8]) {
        // An envelope (Kafka, the file sink) begins with its time: one parse, straight
        // into the head, instead of trying the object line's forms first.
        // (An object line has `_time`; a record with its own `time` first is one of those.)
        if line.starts_with(b"{\"time\":") && memchr::memmem::find(line, b"\"_time\":").is_none() {
            if let Ok(head) = serde_json::from_slice::<EnvelopeHead>(line) {
                return self.add_head(head);
            }
        }
        let flat = serde_json::from_slice::<FlatHead>(line).ok().and_then(|f| {
            Some(EnvelopeHead {
                time: f.time?,
                tag: f.tag?,
                source: f.source,
                seq: f.seq,
                offset: f.offset,
            })
        });
        if flat.is_none() && self.add_flat_with_repeated_keys(line) {
            return;
        }
        let Some(head) = flat.or_else(|| serde_json::from_slice::<EnvelopeHead>(line).ok()) else {
            self.unreadable += 1;
            return;
        };
        self.add_head(head);
    }

    fn add_head(&mut self, head: EnvelopeHead<'_>) {
        let Some(hour) = hour_from_rfc3339(head.time) else {
            self.unreadable += 1;
            return;
        };
        if let (Some(source), Some(_)) = (head.source.as_deref(), head.offset) {
            if !self.contiguous.contains(source) {
                self.contiguous.insert(source.to_string());
            }
        }
        self.add_event(&head.tag, hour, head.source.as_deref(), head.seq);
    }

    /// Counts one event; false when its (source, seq) was found before.
    pub fn add_event(
        &mut self,
        tag: &str,
        hour: u64,
        source: Option<&str>,
        seq: Option<u64>,
    ) -> bool {
        if !self.wanted(tag, hour) {
            self.outside += 1;
            if let (Some(source), Some(seq)) = (source, seq) {
                if self.window.is_some() {
                    match self.beyond.get_mut(source) {
                        Some(r) => {
                            r.insert(seq);
                        }
                        None => {
                            self.beyond
                                .insert(source.to_string(), SeqRanges::from_ranges([[seq, seq]]));
                        }
                    }
                }
            }
            return false;
        }
        self.events += 1;
        if let (Some(source), Some(seq)) = (source, seq) {
            let s = self.source_seqs(tag, hour, source);
            if !s.found.insert(seq) {
                s.duplicated.insert(seq);
                s.duplicates += 1;
                self.duplicates += 1;
                return false;
            }
        }
        self.counts.add(tag, hour, 1);
        true
    }

    /// Whether an event of `tag` in `hour` is in the window asked for.
    pub fn wanted(&self, tag: &str, hour: u64) -> bool {
        self.window
            .is_none_or(|(from, to)| (from..to).contains(&hour))
            && self.only_tag.as_deref().is_none_or(|t| t == tag)
    }

    /// Counts what an object's manifest says it holds of one source (`records` of its
    /// seqs in `ranges`): seqs found already (in another object) are duplicates.
    pub fn add_ranges(&mut self, tag: &str, hour: u64, source: &str, ranges: &SeqRanges) {
        if !self.wanted(tag, hour) {
            self.outside += ranges.len();
            return;
        }
        let n = ranges.len();
        let s = self.source_seqs(tag, hour, source);
        let before = s.found.len();
        let again: Vec<[u64; 2]> = ranges
            .ranges()
            .iter()
            .flat_map(|&[a, b]| {
                let one = SeqRanges::from_ranges([[a, b]]);
                let new = one.minus(&s.found);
                one.minus(&new).ranges().to_vec()
            })
            .collect();
        s.found.union(ranges);
        let added = s.found.len() - before;
        let dups = n - added;
        for [a, b] in again {
            s.duplicated.insert_range(a, b);
        }
        s.duplicates += dups;
        self.events += n;
        self.duplicates += dups;
        self.counts.add(tag, hour, added);
    }

    /// The cell of one source, looked up by reference (allocated the first time only).
    fn source_seqs(&mut self, tag: &str, hour: u64, source: &str) -> &mut SourceSeqs {
        if !self.seqs.contains_key(tag) {
            self.seqs.insert(tag.to_string(), BTreeMap::new());
        }
        let hours = self.seqs.get_mut(tag).expect("inserted above");
        let sources = hours.entry(hour).or_default();
        if !sources.contains_key(source) {
            sources.insert(source.to_string(), SourceSeqs::default());
        }
        sources.get_mut(source).expect("inserted above")
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
        let source = map.get("_source").and_then(|v| v.as_str());
        let seq = map.get("_seq").and_then(|v| v.as_u64());
        self.add_event(tag, hour, source, seq);
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
