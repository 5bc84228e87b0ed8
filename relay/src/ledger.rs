//! The ledger: how many events the relay received, and how many each sink was offered,
//! delivered or had to drop, per tag and event-time hour. `sluice-relay reconcile` compares it with what is
//! really in Kafka and object storage.
//!
//! Exactness across crashes: received counts are part of the dedup snapshot and are
//! rebuilt from the spool at recovery; a sink's counts live in the same state file as its
//! cursor, written atomically, so counts and cursor never disagree. The file
//! `<data_dir>/ledger.json` is a periodic export of both for the report.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::envelope::{hour_label, parse_hour_label};
use sluice_core::ranges::SeqRanges;

/// tag -> hour (hours since the epoch) -> events. On disk the hours are labels
/// (`2026-11-23T09`), readable by people and by the report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts(pub BTreeMap<String, BTreeMap<u64, u64>>);

impl Serialize for Counts {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let labelled: BTreeMap<&str, BTreeMap<String, u64>> = self
            .0
            .iter()
            .map(|(tag, hours)| {
                (
                    tag.as_str(),
                    hours.iter().map(|(h, n)| (hour_label(*h), *n)).collect(),
                )
            })
            .collect();
        labelled.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Counts {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let labelled = BTreeMap::<String, BTreeMap<String, u64>>::deserialize(d)?;
        let mut counts = Counts::default();
        for (tag, hours) in labelled {
            for (label, n) in hours {
                let hour = parse_hour_label(&label).ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        "tag {tag:?}: {label:?} is not an hour (YYYY-MM-DDTHH)"
                    ))
                })?;
                counts.add(&tag, hour, n);
            }
        }
        Ok(counts)
    }
}

impl Counts {
    pub fn add(&mut self, tag: &str, hour: u64, n: u64) {
        if n == 0 {
            return;
        }
        // Look up by &str first: the tag String is allocated only the first time.
        match self.0.get_mut(tag) {
            Some(hours) => *hours.entry(hour).or_default() += n,
            None => {
                self.0.insert(tag.to_string(), BTreeMap::from([(hour, n)]));
            }
        }
    }

    /// Sets a cell; 0 removes it (and a tag left without hours).
    pub fn set(&mut self, tag: &str, hour: u64, n: u64) {
        match self.0.get_mut(tag) {
            Some(hours) if n == 0 => {
                hours.remove(&hour);
                if hours.is_empty() {
                    self.0.remove(tag);
                }
            }
            Some(hours) => {
                hours.insert(hour, n);
            }
            None if n == 0 => {}
            None => {
                self.0.insert(tag.to_string(), BTreeMap::from([(hour, n)]));
            }
        }
    }

    /// Removes every cell of an hour before `hour`, telling `gone` about each.
    pub fn prune_before(&mut self, hour: u64, mut gone: impl FnMut(&str, u64)) {
        self.0.retain(|tag, hours| {
            let keep = hours.split_off(&hour);
            for &h in hours.keys() {
                gone(tag, h);
            }
            *hours = keep;
            !hours.is_empty()
        });
    }

    /// Every (tag, hour, events) cell.
    pub fn cells(&self) -> impl Iterator<Item = (&str, u64, u64)> {
        self.0
            .iter()
            .flat_map(|(t, h)| h.iter().map(move |(hour, n)| (t.as_str(), *hour, *n)))
    }

    pub fn total(&self) -> u64 {
        self.0.values().flat_map(|h| h.values()).sum()
    }

    pub fn get(&self, tag: &str, hour: u64) -> u64 {
        self.0
            .get(tag)
            .and_then(|h| h.get(&hour))
            .copied()
            .unwrap_or(0)
    }

    pub fn merge(&mut self, other: &Counts) {
        for (tag, hours) in &other.0 {
            for (hour, n) in hours {
                self.add(tag, *hour, *n);
            }
        }
    }

    pub fn keys(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0
            .iter()
            .flat_map(|(t, h)| h.keys().map(move |hour| (t.as_str(), *hour)))
    }
}

/// tag -> hour (hours since the epoch) -> source -> seqs: which events of each source
/// a relay received, or an agent had acknowledged, per tag and event-time hour. Ranges,
/// not events, so a ledger grows with sources and hours. On disk the hours are labels,
/// as in [`Counts`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeqCells(pub BTreeMap<String, BTreeMap<u64, BTreeMap<String, SeqRanges>>>);

type Labelled<'a> = BTreeMap<&'a str, BTreeMap<String, &'a BTreeMap<String, SeqRanges>>>;

impl Serialize for SeqCells {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let labelled: Labelled<'_> = self
            .0
            .iter()
            .map(|(tag, hours)| {
                (
                    tag.as_str(),
                    hours.iter().map(|(h, c)| (hour_label(*h), c)).collect(),
                )
            })
            .collect();
        labelled.serialize(s)
    }
}

impl<'de> Deserialize<'de> for SeqCells {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        type Read = BTreeMap<String, BTreeMap<String, BTreeMap<String, SeqRanges>>>;
        let mut cells = SeqCells::default();
        for (tag, hours) in Read::deserialize(d)? {
            for (label, sources) in hours {
                let hour = parse_hour_label(&label).ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        "tag {tag:?}: {label:?} is not an hour (YYYY-MM-DDTHH)"
                    ))
                })?;
                for (source, seqs) in &sources {
                    cells.union(&tag, hour, source, seqs);
                }
            }
        }
        Ok(cells)
    }
}

impl SeqCells {
    /// The ranges of (tag, hour, source), made on first use.
    pub fn cell(&mut self, tag: &str, hour: u64, source: &str) -> &mut SeqRanges {
        // By &str first: the Strings are allocated only the first time.
        if !self.0.contains_key(tag) {
            self.0.insert(tag.to_string(), BTreeMap::new());
        }
        let sources = self
            .0
            .get_mut(tag)
            .expect("inserted above")
            .entry(hour)
            .or_default();
        if !sources.contains_key(source) {
            sources.insert(source.to_string(), SeqRanges::default());
        }
        sources.get_mut(source).expect("inserted above")
    }

    pub fn union(&mut self, tag: &str, hour: u64, source: &str, seqs: &SeqRanges) {
        if !seqs.is_empty() {
            self.cell(tag, hour, source).union(seqs);
        }
    }

    pub fn merge(&mut self, other: &SeqCells) {
        for (tag, hours) in &other.0 {
            for (hour, sources) in hours {
                for (source, seqs) in sources {
                    self.union(tag, *hour, source, seqs);
                }
            }
        }
    }

    /// Forgets the hours before `hour`; how many (tag, hour) cells went.
    pub fn prune_before(&mut self, hour: u64) -> usize {
        let mut gone = 0;
        self.0.retain(|_, hours| {
            let before = hours.len();
            hours.retain(|h, _| *h >= hour);
            gone += before - hours.len();
            !hours.is_empty()
        });
        gone
    }

    /// The sources of `tag` in `hour`.
    pub fn get(&self, tag: &str, hour: u64) -> Option<&BTreeMap<String, SeqRanges>> {
        self.0.get(tag).and_then(|h| h.get(&hour))
    }

    /// Every hour that has a cell.
    pub fn hours(&self) -> std::collections::BTreeSet<u64> {
        self.0.values().flat_map(|h| h.keys().copied()).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One sink's counts. `offered` is what the sink was given (after `start_from`, and
/// later routing and filters); every offered event ends up delivered or dropped, and a
/// difference is a delivery still under way.
impl SinkCounts {
    pub fn merge(&mut self, other: &SinkCounts) {
        self.offered.merge(&other.offered);
        self.delivered.merge(&other.delivered);
        self.dropped.merge(&other.dropped);
        self.spool_lost.merge(&other.spool_lost);
    }

    pub fn forget_before(&mut self, hour: u64) {
        for counts in [&mut self.offered, &mut self.delivered, &mut self.dropped] {
            counts.prune_before(hour, |_, _| {});
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkCounts {
    /// Absent in state files written before offered was counted: read as empty.
    #[serde(default)]
    pub offered: Counts,
    pub delivered: Counts,
    pub dropped: Counts,
    /// Spool batches this sink never got because they were damaged on disk before it
    /// read them. Their events cannot be counted (the batches are unreadable); they are
    /// the shortfall of `offered` against `received`, which reconcile reports as lost.
    #[serde(default, skip_serializing_if = "SpoolLoss::is_empty")]
    pub spool_lost: SpoolLoss,
}

/// Damaged spool batches a sink had to pass over.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpoolLoss {
    pub batches: u64,
    pub bytes: u64,
    pub ranges: Vec<LostRange>,
}

/// One damaged stretch of a spool segment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostRange {
    pub segment: u64,
    /// Byte offsets in the segment file: from the first damaged byte to the next valid batch.
    pub from: u64,
    pub to: u64,
    pub batches: u64,
    /// Whether the relay had acknowledged these batches to their senders.
    pub acknowledged: bool,
}

impl SpoolLoss {
    pub fn is_empty(&self) -> bool {
        self.batches == 0 && self.ranges.is_empty()
    }

    pub fn add(&mut self, d: &sluice_spool::Damage) {
        self.batches += d.batches;
        self.bytes += d.bytes();
        self.ranges.push(LostRange {
            segment: d.from.segment,
            from: d.from.offset,
            to: d.to.offset,
            batches: d.batches,
            acknowledged: d.acknowledged == sluice_spool::Acknowledged::Yes,
        });
    }

    pub fn merge(&mut self, other: &SpoolLoss) {
        self.batches += other.batches;
        self.bytes += other.bytes;
        self.ranges.extend(other.ranges.iter().cloned());
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    pub relay: String,
    pub received: Counts,
    pub duplicates: u64,
    pub sinks: BTreeMap<String, SinkCounts>,
    /// Hours before this one (hours since the epoch) are forgotten
    /// (`relay.ledger_retention`): `reconcile` does not report them. 0 in ledgers
    /// written before hours were forgotten.
    #[serde(default)]
    pub forgotten_before: u64,
    /// Per source, the seqs received (less what dedup trimmed), kept by the spool writer
    /// ([`crate::writer`]). Absent in ledgers written before they were kept.
    #[serde(default, skip_serializing_if = "SeqCells::is_empty")]
    pub received_seqs: SeqCells,
    /// What sluice agents reported they had sent and had acknowledged, per source:
    /// their reports are cumulative, so any relay that heard one keeps the union.
    #[serde(default, skip_serializing_if = "SeqCells::is_empty")]
    pub agents: SeqCells,
    /// Bumped whenever a count changes, so the periodic export writes the file only
    /// when there is something new. Not persisted.
    #[serde(skip)]
    pub revision: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "version")]
enum LedgerFile {
    #[serde(rename = "1")]
    V1(Ledger),
}

impl Ledger {
    /// Forgets the sinks' counts of hours before `hour` (the received counts are the
    /// writer's, which forgets them itself) and records the bound for `reconcile`.
    pub fn forget_before(&mut self, hour: u64) {
        if hour <= self.forgotten_before {
            return;
        }
        self.forgotten_before = hour;
        for counts in self.sinks.values_mut() {
            counts.forget_before(hour);
        }
        self.agents.prune_before(hour);
        self.revision += 1;
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(&LedgerFile::V1(self.clone()))?;
        sluice_core::durable::write_atomic(path, &bytes)
    }

    pub fn load(path: &Path) -> Result<Ledger, String> {
        let bytes = std::fs::read(path)
            .map_err(|e| format!("cannot read ledger {}: {e}", path.display()))?;
        match serde_json::from_slice(&bytes) {
            Ok(LedgerFile::V1(l)) => Ok(l),
            Err(e) => Err(format!(
                "ledger {} is not a sluice ledger: {e}",
                path.display()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = Ledger {
            relay: "r".into(),
            ..Ledger::default()
        };
        ledger.received.add("app", 498_729, 7);
        ledger
            .sinks
            .entry("s3".into())
            .or_default()
            .delivered
            .add("app", 498_729, 7);
        let path = dir.path().join("ledger.json");
        ledger.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"2026-11-23T09\": 7"), "{text}");
        assert_eq!(Ledger::load(&path).unwrap(), ledger);
    }
}
