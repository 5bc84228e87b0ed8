//! The relay's ledger, published to object storage per event-time hour, so that
//! `sluice-relay reconcile` needs only Kafka and the bucket, for a whole cluster:
//! `<prefix>/_sluice/ledger/dt=<date>/hour=<HH>/<relay>-<incarnation>.json`, beside the
//! hour markers (`_sluice/hours/...`), with, per tag of the hour:
//!
//! - `received`: events the relay received (less the duplicates it trimmed);
//! - `sinks`: per sink, `offered`, `delivered` and `dropped`;
//! - `received_seqs`: per source, the seq ranges received;
//! - `agents`: per source, the seq ranges sluice agents reported acknowledged.
//!
//! An hour's document is rewritten whenever one of its figures changes (late events, a
//! report that came after the hour closed, a sink that caught up), at most every
//! [`PUBLISH_EVERY`], for the last [`crate::writer::SEQ_HOURS`] hours: older hours stay
//! as last written. One document per incarnation, so a relay whose data directory was
//! lost does not overwrite what its earlier life published.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use object_store::path::{Path as ObjectPath, PathPart};
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::envelope::hour_label;
use crate::ledger::Ledger;
use sluice_core::ranges::SeqRanges;

/// How often the ledger is looked at for hours to publish.
pub const PUBLISH_EVERY: Duration = Duration::from_secs(5);

/// One sink's figures for a (tag, hour).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkFigures {
    pub offered: u64,
    pub delivered: u64,
    pub dropped: u64,
}

/// One tag of an hour, as a relay published it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagFigures {
    pub received: u64,
    #[serde(default)]
    pub sinks: BTreeMap<String, SinkFigures>,
    #[serde(default)]
    pub received_seqs: BTreeMap<String, SeqRanges>,
    #[serde(default)]
    pub agents: BTreeMap<String, SeqRanges>,
}

/// One relay's ledger for one hour.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HourLedger {
    pub version: u32,
    pub relay: String,
    pub incarnation: String,
    pub hour: String,
    pub tags: BTreeMap<String, TagFigures>,
}

/// The hour document of `hour` from `ledger`.
pub fn hour_ledger(ledger: &Ledger, incarnation: &str, hour: u64) -> HourLedger {
    let mut tags: BTreeMap<String, TagFigures> = BTreeMap::new();
    for (tag, h, n) in ledger.received.cells() {
        if h == hour {
            tags.entry(tag.to_string()).or_default().received = n;
        }
    }
    for (sink, counts) in &ledger.sinks {
        for (field, c) in [
            (0, &counts.offered),
            (1, &counts.delivered),
            (2, &counts.dropped),
        ] {
            for (tag, h, n) in c.cells() {
                if h != hour {
                    continue;
                }
                let f = tags
                    .entry(tag.to_string())
                    .or_default()
                    .sinks
                    .entry(sink.clone())
                    .or_default();
                match field {
                    0 => f.offered = n,
                    1 => f.delivered = n,
                    _ => f.dropped = n,
                }
            }
        }
    }
    for (tag, hours) in &ledger.received_seqs.0 {
        if let Some(sources) = hours.get(&hour) {
            tags.entry(tag.clone()).or_default().received_seqs = sources.clone();
        }
    }
    for (tag, hours) in &ledger.agents.0 {
        if let Some(sources) = hours.get(&hour) {
            tags.entry(tag.clone()).or_default().agents = sources.clone();
        }
    }
    HourLedger {
        version: 1,
        relay: ledger.relay.clone(),
        incarnation: incarnation.to_string(),
        hour: hour_label(hour),
        tags,
    }
}

/// The hours with any figure in `ledger`, from [`crate::writer::SEQ_HOURS`] before the
/// clock's hour `now_hour` to [`crate::writer::SEQ_FUTURE_HOURS`] after it.
fn hours(ledger: &Ledger, now_hour: u64) -> BTreeSet<u64> {
    let mut all: BTreeSet<u64> = ledger.received.keys().map(|(_, h)| h).collect();
    for c in ledger.sinks.values() {
        for counts in [&c.offered, &c.delivered, &c.dropped] {
            all.extend(counts.keys().map(|(_, h)| h));
        }
    }
    all.extend(ledger.received_seqs.hours());
    all.extend(ledger.agents.hours());
    let window = now_hour.saturating_sub(crate::writer::SEQ_HOURS)
        ..=now_hour + crate::writer::SEQ_FUTURE_HOURS;
    all.retain(|h| window.contains(h));
    all
}

fn clock_hour() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 3600)
}

/// `<prefix>/_sluice/ledger/dt=<date>/hour=<HH>`.
pub fn folder(prefix: &str, hour: u64) -> String {
    let (dt, hh) = super::key::date_and_hour(hour);
    let rest = format!("_sluice/ledger/dt={dt}/hour={hh}");
    if prefix.is_empty() {
        rest
    } else {
        format!("{prefix}/{rest}")
    }
}

/// Publishes hour documents whose content changed since it last did.
pub struct Publisher {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    incarnation: String,
    revision: Option<u64>,
    /// Per hour, a digest of the document last written.
    written: HashMap<u64, u64>,
    /// Per hour, the document an earlier run of this incarnation had published.
    carried: HashMap<u64, HourLedger>,
}

fn digest(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Publisher {
    /// Into `store` under `prefix` (an object sink's, [`super::ObjectSink::open`]).
    pub fn new(store: Arc<dyn ObjectStore>, prefix: String, incarnation: &str) -> Publisher {
        Publisher {
            store,
            prefix,
            incarnation: incarnation.to_string(),
            revision: None,
            written: HashMap::new(),
            carried: HashMap::new(),
        }
    }

    /// The document at `path` as an earlier run of this incarnation published it (an
    /// empty one when there is none).
    async fn read_published(&self, path: &ObjectPath) -> Result<HourLedger, String> {
        let bytes = match self.store.get(path).await {
            Ok(r) => r.bytes().await.map_err(|e| format!("read {path}: {e}"))?,
            Err(object_store::Error::NotFound { .. }) => return Ok(HourLedger::default()),
            Err(e) => return Err(format!("get {path}: {e}")),
        };
        Ok(serde_json::from_slice::<HourLedger>(&bytes).unwrap_or_else(|e| {
            tracing::warn!(%path, error = %e, "the published ledger is not readable; it is replaced");
            HourLedger::default()
        }))
    }

    /// Adds to `doc` the seqs of `old`: ranges only grow. The counts are `doc`'s (rebuilt
    /// exactly at start); a tag only `old` has is kept as it was.
    fn merge(old: &HourLedger, doc: &mut HourLedger) {
        for (tag, t) in old.tags.clone() {
            match doc.tags.get_mut(&tag) {
                None => {
                    doc.tags.insert(tag, t);
                }
                Some(mine) => {
                    for (source, seqs) in t.received_seqs {
                        mine.received_seqs.entry(source).or_default().union(&seqs);
                    }
                    for (source, seqs) in t.agents {
                        mine.agents.entry(source).or_default().union(&seqs);
                    }
                }
            }
        }
    }

    /// Writes the hours that changed; how many. An hour that fails is tried again next time.
    pub async fn publish(&mut self, ledger: &Mutex<Ledger>) -> Result<usize, String> {
        let (revision, relay, docs) = {
            let ledger = ledger.lock().unwrap_or_else(|e| e.into_inner());
            if self.revision == Some(ledger.revision) {
                return Ok(0);
            }
            let docs: Vec<(u64, HourLedger)> = hours(&ledger, clock_hour())
                .into_iter()
                .map(|h| (h, hour_ledger(&ledger, &self.incarnation, h)))
                .collect();
            (ledger.revision, ledger.relay.clone(), docs)
        };
        let mut written = 0;
        let mut failed = None;
        for (hour, mut doc) in docs {
            let path: ObjectPath = ObjectPath::from(folder(&self.prefix, hour).as_str())
                .parts()
                .chain([PathPart::from(format!("{relay}-{}.json", self.incarnation))])
                .collect();
            // What an earlier run of the same incarnation published stays in: a restart
            // must not shrink it. Read once per hour and process.
            if !self.carried.contains_key(&hour) {
                match self.read_published(&path).await {
                    Ok(old) => {
                        self.carried.insert(hour, old);
                    }
                    Err(e) => {
                        failed = Some(e);
                        continue;
                    }
                }
            }
            if let Some(old) = self.carried.get(&hour) {
                Self::merge(old, &mut doc);
            }
            let body = serde_json::to_vec(&doc).unwrap_or_default();
            let d = digest(&body);
            if self.written.get(&hour) == Some(&d) {
                continue;
            }
            match self.store.put(&path, PutPayload::from(body)).await {
                Ok(_) => {
                    self.written.insert(hour, d);
                    written += 1;
                }
                Err(e) => failed = Some(format!("put {path}: {e}")),
            }
        }
        let oldest = clock_hour().saturating_sub(crate::writer::SEQ_HOURS);
        self.written.retain(|h, _| *h >= oldest);
        self.carried.retain(|h, _| *h >= oldest);
        match failed {
            Some(e) => Err(e),
            None => {
                self.revision = Some(revision);
                Ok(written)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_hour_document_holds_every_figure_of_that_hour_only() {
        let mut l = Ledger {
            relay: "r1".into(),
            ..Ledger::default()
        };
        l.received.add("app", 10, 5);
        l.received.add("app", 11, 7);
        let s = l.sinks.entry("kafka".into()).or_default();
        s.offered.add("app", 10, 5);
        s.delivered.add("app", 10, 4);
        s.dropped.add("app", 10, 1);
        l.received_seqs
            .union("app", 10, "a:1", &SeqRanges::from_ranges([[0, 4]]));
        l.agents
            .union("app", 10, "a:1", &SeqRanges::from_ranges([[0, 5]]));
        let doc = hour_ledger(&l, "inc", 10);
        let t = &doc.tags["app"];
        assert_eq!(t.received, 5);
        assert_eq!(
            t.sinks["kafka"],
            SinkFigures {
                offered: 5,
                delivered: 4,
                dropped: 1
            }
        );
        assert_eq!(t.received_seqs["a:1"].len(), 5);
        assert_eq!(t.agents["a:1"].len(), 6);
        assert_eq!(hour_ledger(&l, "inc", 11).tags["app"].received, 7);
        assert_eq!(hours(&l, 12).into_iter().collect::<Vec<_>>(), [10, 11]);
        assert!(hours(&l, 100).is_empty(), "older than the window");
        let back: HourLedger = serde_json::from_slice(&serde_json::to_vec(&doc).unwrap()).unwrap();
        assert_eq!(back, doc);
    }

    #[tokio::test]
    async fn a_restarted_relay_adds_to_what_it_published_and_never_shrinks_it() {
        let dir = tempfile::tempdir().unwrap();
        let sink: super::super::ObjectSink = serde_json::from_value(serde_json::json!({
            "url": format!("file://{}", dir.path().display()),
        }))
        .unwrap();
        let h = clock_hour();
        let life = |agents: [u64; 2]| {
            let mut l = Ledger {
                relay: "r1".into(),
                revision: 1,
                ..Ledger::default()
            };
            l.received.add("app", h, 5);
            l.agents
                .union("app", h, "a:1", &SeqRanges::from_ranges([agents]));
            Mutex::new(l)
        };
        let (store, prefix) = sink.open().unwrap();
        let mut first = Publisher::new(store.clone(), prefix.clone(), "i1");
        first.publish(&life([0, 9])).await.unwrap();
        // The next life lost the agent's first report: the bucket keeps it.
        let mut second = Publisher::new(store, prefix, "i1");
        second.publish(&life([10, 19])).await.unwrap();
        // And keeps it on later writes of the hour.
        let later = life([10, 20]);
        later.lock().unwrap().revision = 2;
        second.publish(&later).await.unwrap();
        let file = dir.path().join(folder("", h)).join("r1-i1.json");
        let doc: HourLedger = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
        assert_eq!(
            doc.tags["app"].agents["a:1"],
            SeqRanges::from_ranges([[0, 20]])
        );
    }

    #[tokio::test]
    async fn only_changed_hours_are_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let sink: super::super::ObjectSink = serde_json::from_value(serde_json::json!({
            "url": format!("file://{}", dir.path().display()),
        }))
        .unwrap();
        let ledger = Mutex::new(Ledger {
            relay: "r1".into(),
            ..Ledger::default()
        });
        let h = clock_hour();
        ledger.lock().unwrap().received.add("app", h, 5);
        ledger.lock().unwrap().revision += 1;
        let (store, prefix) = sink.open().unwrap();
        let mut p = Publisher::new(store, prefix, "i1");
        assert_eq!(p.publish(&ledger).await.unwrap(), 1);
        assert_eq!(p.publish(&ledger).await.unwrap(), 0, "same revision");
        {
            let mut l = ledger.lock().unwrap();
            l.received.add("app", h + 1, 1);
            l.revision += 1;
        }
        assert_eq!(
            p.publish(&ledger).await.unwrap(),
            1,
            "the first hour did not change"
        );
        let file = dir.path().join(folder("", h)).join("r1-i1.json");
        let doc: HourLedger = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
        assert_eq!(doc.tags["app"].received, 5);
    }
}
