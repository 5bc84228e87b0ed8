//! `sluice-relay reconcile --from T1 --to T2 [--tag T] [--deep]`: for a window of
//! event-time hours, what is really in Kafka and what is really in object storage, for a
//! whole cluster (every relay writes to the same topic and bucket), and every
//! difference named by source and seq range. Needs only Kafka and the bucket, so it
//! runs anywhere the relay's config reaches them (a cron job, a laptop).
//!
//! - Kafka is read from the first message at or after the window's start in each
//!   partition (offsets-for-times on the event-time timestamps the sink sets), not from
//!   the beginning, to each partition's end.
//! - Object storage is read by its hour markers and manifests (each object with its seqs
//!   per source) and one listing per partition folder to see the objects are still
//!   there; `--deep` reads and counts every object of the window instead.
//!
//! What was found is kept as seq ranges per (tag, hour, source): memory follows the
//! sources, not the events. Expected, per source, is what either destination holds;
//! a sluice agent numbers a source's events 0, 1, 2, ..., so a gap between the lowest
//! and highest seq found of a source is missing from both. Statuses per row: `OK`,
//! `MISSING n` (in one destination or both), `DUPLICATE n` (found more than once in a
//! destination), `PENDING` (an hour some relay has not announced yet: its objects may
//! still come), and `LATE n` beside them (events written after their hour closed, in a
//! later manifest revision; not a difference).
//!
//! Exit code: 0 when every row is OK, 1 when something is missing or duplicated, 3 when
//! the only differences are in hours still pending.

use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::RelayConfig;
use crate::envelope::hour_label;
use crate::readback::Found;
use crate::sinks::object::published::SinkFigures;
use crate::sinks::object::readback::LedgerCell;
use crate::sinks::SinkKind;
use sluice_core::ranges::SeqRanges;

/// What to reconcile.
pub struct Window {
    /// Hours since the epoch, `[from, to)`.
    pub from: u64,
    pub to: u64,
    pub tag: Option<String>,
    pub deep: bool,
    pub kafka_timeout: Duration,
}

impl Window {
    /// From the command line's `--from` and `--to`, checked.
    pub fn parse(
        from: &str,
        to: &str,
        tag: Option<String>,
        deep: bool,
        kafka_timeout: Duration,
    ) -> Result<Window, String> {
        let (f, t) = (parse_hour(from)?, parse_hour(to)?);
        if f >= t {
            return Err(format!(
                "--to {to} is not after --from {from} (--to is the hour after the window's last)"
            ));
        }
        Ok(Window {
            from: f,
            to: t,
            tag,
            deep,
            kafka_timeout,
        })
    }
}

/// `YYYY-MM-DDTHH` (or a longer RFC 3339 time, of which the hour counts).
pub fn parse_hour(s: &str) -> Result<u64, String> {
    s.get(..13)
        .and_then(crate::envelope::parse_hour_label)
        .ok_or_else(|| {
            format!("{s:?} is not an hour: write YYYY-MM-DDTHH (UTC), e.g. 2026-11-23T09")
        })
}

#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct SourceRanges {
    pub source: String,
    pub seqs: SeqRanges,
    pub events: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct Destination {
    /// Distinct events found.
    pub events: u64,
    /// Events found more than once (each repeat counted).
    pub duplicates: u64,
    pub missing: Vec<SourceRanges>,
    pub duplicated: Vec<SourceRanges>,
}

#[derive(Debug, Default, Serialize)]
pub struct Row {
    pub tag: String,
    pub hour: String,
    /// Distinct events in either destination, with the gaps both share and what the
    /// relays received and the agents reported.
    pub expected: u64,
    /// Events sluice agents reported acknowledged (their seqs), when a relay published them.
    pub agents: Option<u64>,
    /// Events the relays received, from their published ledgers.
    pub received: Option<u64>,
    /// Per sink (summed over the relays): offered, delivered, dropped.
    pub sinks: BTreeMap<String, SinkFigures>,
    /// Reported by an agent as acknowledged, received by no relay's ledger.
    pub not_received: Vec<SourceRanges>,
    pub kafka: Option<Destination>,
    pub objects: Option<Destination>,
    /// Missing from both (a gap in a source's seqs that neither destination holds).
    pub missing_everywhere: Vec<SourceRanges>,
    /// Events that arrived after the hour closed (in a later manifest revision).
    pub late: u64,
    /// Relays seen in the window that have not announced this hour yet.
    pub pending_relays: Vec<String>,
    /// Relays that announced this hour but published no ledger of it (while others
    /// did): what their spools still hold is not known.
    pub unpublished_relays: Vec<String>,
    /// Per sink, events offered and never delivered by a relay incarnation since
    /// replaced (its data directory lost): gone with its spool.
    pub lost_with_spools: BTreeMap<String, u64>,
    pub status: String,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub from: String,
    pub to: String,
    pub tag: Option<String>,
    pub deep: bool,
    pub rows: Vec<Row>,
    pub missing_objects: Vec<crate::sinks::object::readback::MissingObject>,
    pub kafka_messages_read: u64,
    pub kafka_partitions_from_beginning: usize,
    pub objects_read: u64,
    pub manifests_read: u64,
    pub ledgers_read: u64,
    /// Time reading Kafka, and reading object storage (markers, manifests, ledgers and,
    /// with `--deep`, every object).
    pub kafka_seconds: f64,
    pub objects_seconds: f64,
    pub seconds: f64,
    pub ok: bool,
    pub pending_only: bool,
}

impl Report {
    /// 0: everything matches; 1: missing or duplicated events; 3: only pending hours.
    pub fn exit_code(&self) -> u8 {
        if self.ok {
            0
        } else if self.pending_only {
            3
        } else {
            1
        }
    }
}

/// A progress line on a terminal (stderr), nothing otherwise.
struct Progress {
    on: bool,
    last: Instant,
}

impl Progress {
    fn show(&mut self, what: std::fmt::Arguments<'_>) {
        if self.on && self.last.elapsed() >= Duration::from_millis(200) {
            eprint!("\r{what}\x1b[K");
            self.last = Instant::now();
        }
    }

    fn done(&self) {
        if self.on {
            eprint!("\r\x1b[K");
        }
    }
}

fn cells(found: &Found) -> impl Iterator<Item = (&str, u64)> {
    found
        .seqs
        .iter()
        .flat_map(|(t, h)| h.keys().map(move |hour| (t.as_str(), *hour)))
        .chain(found.counts.keys())
}

/// What `f` found of `tag` in `hour`, per source (`none` when nothing).
fn cell_of<'a>(
    f: &'a Found,
    tag: &str,
    hour: u64,
    none: &'a BTreeMap<String, crate::readback::SourceSeqs>,
) -> &'a BTreeMap<String, crate::readback::SourceSeqs> {
    f.seqs.get(tag).and_then(|h| h.get(&hour)).unwrap_or(none)
}

/// Reads the window from the config's first Kafka sink and first object sink (either may
/// be absent) and compares them.
pub async fn run(config: &RelayConfig, w: &Window) -> Result<Report, String> {
    let started = Instant::now();
    let new_found = || Found {
        window: Some((w.from, w.to)),
        only_tag: w.tag.clone(),
        ..Found::default()
    };
    let mut progress = Progress {
        on: std::io::stderr().is_terminal(),
        last: Instant::now() - Duration::from_secs(1),
    };
    let mut report = Report {
        from: hour_label(w.from),
        to: hour_label(w.to),
        tag: w.tag.clone(),
        deep: w.deep,
        ..Report::default()
    };
    let enabled = || config.sinks.iter().filter(|s| s.enabled);
    // The names the relays' ledgers count these sinks under.
    let kafka_name = enabled()
        .find(|s| matches!(s.kind, SinkKind::Kafka(_)))
        .map(|s| s.name.clone());
    let objects_name = enabled()
        .find(|s| matches!(s.kind, SinkKind::ObjectStore(_)))
        .map(|s| s.name.clone());
    let mut kafka = None;
    if let Some(sink) = enabled().find_map(|s| match &s.kind {
        SinkKind::Kafka(k) => Some(k.clone()),
        _ => None,
    }) {
        let timeout = w.kafka_timeout;
        let began = Instant::now();
        let mut found = new_found();
        let (found, read) = tokio::task::spawn_blocking(move || {
            let mut p = Progress {
                on: std::io::stderr().is_terminal(),
                last: Instant::now(),
            };
            let read = sink.read_window(timeout, &mut found, &mut |n| {
                p.show(format_args!("reading Kafka: {n} messages"))
            });
            p.done();
            read.map(|r| (found, r))
        })
        .await
        .map_err(|e| e.to_string())??;
        report.kafka_messages_read = read.messages;
        report.kafka_partitions_from_beginning = read.from_beginning;
        report.kafka_seconds = began.elapsed().as_secs_f64();
        kafka = Some(found);
    }
    let mut objects = None;
    let mut object_read = None;
    if let Some(sink) = enabled().find_map(|s| match &s.kind {
        SinkKind::ObjectStore(o) => Some(o.clone()),
        _ => None,
    }) {
        let began = Instant::now();
        let mut found = new_found();
        let read = sink
            .read_window(w.deep, &mut found, &mut |i, n| {
                progress.show(format_args!("reading object storage: {i} of {n}"))
            })
            .await?;
        progress.done();
        report.objects_read = read.objects_read;
        report.objects_seconds = began.elapsed().as_secs_f64();
        report.manifests_read = read.manifests;
        report.ledgers_read = read.ledgers_read;
        objects = Some(found);
        object_read = Some(read);
    }
    if kafka.is_none() && objects.is_none() {
        return Err(
            "no enabled kafka or object_store sink in the config: nothing to reconcile".into(),
        );
    }
    // Every relay that announced any hour of the window is expected to announce each.
    let relays: BTreeSet<String> = object_read
        .iter()
        .flat_map(|r| r.announced.values().flatten().cloned())
        .collect();
    let empty = Found::default();
    let k = kafka.as_ref().unwrap_or(&empty);
    let o = objects.as_ref().unwrap_or(&empty);
    let no_ledgers = BTreeMap::new();
    let ledgers = object_read.as_ref().map_or(&no_ledgers, |r| &r.ledgers);
    let published = object_read.as_ref().is_some_and(|r| r.ledgers_read > 0);
    let keys: BTreeSet<(String, u64)> = cells(k)
        .chain(cells(o))
        .map(|(t, h)| (t.to_string(), h))
        .chain(ledgers.keys().cloned())
        .collect();
    // Per source, every seq found anywhere in the window: its gaps are missing everywhere.
    // Only for sources numbered 0, 1, 2, ... (sluice agents that send byte offsets), and
    // less what was read outside the window (an event whose time fell just outside).
    let mut all: BTreeMap<&str, SeqRanges> = BTreeMap::new();
    // What agents reported and relays received is numbered 0, 1, 2, ... too.
    for c in ledgers.values() {
        for (source, s) in c.agents.iter().chain(&c.received_seqs) {
            all.entry(source).or_default().union(s);
        }
    }
    for f in [k, o] {
        for sources in f.seqs.values().flat_map(|h| h.values()) {
            for (source, s) in sources {
                if k.contiguous.contains(source) || o.contiguous.contains(source) {
                    all.entry(source).or_default().union(&s.found);
                }
            }
        }
    }
    let beyond = |source: &str| -> SeqRanges {
        let mut r = SeqRanges::default();
        for f in [k, o] {
            if let Some(b) = f.beyond.get(source) {
                r.union(b);
            }
        }
        r
    };
    // A gap is put in the row of the seq just before it.
    let mut gaps: BTreeMap<&str, SeqRanges> = BTreeMap::new();
    for (source, seqs) in &all {
        let (Some(first), Some(last)) = (seqs.first(), seqs.last()) else {
            continue;
        };
        let g = SeqRanges::from_ranges([[first, last]])
            .minus(seqs)
            .minus(&beyond(source));
        if !g.is_empty() {
            gaps.insert(source, g);
        }
    }
    let mut all_ok = true;
    let mut only_pending = true;
    let (no_sources, no_seqs) = (BTreeMap::new(), SeqRanges::default());
    for (tag, hour) in keys {
        // Borrowed, not copied: a cell holds the ranges of every source of the hour.
        let (kc, oc) = (
            cell_of(k, &tag, hour, &no_sources),
            cell_of(o, &tag, hour, &no_sources),
        );
        let mut expected: BTreeMap<String, SeqRanges> = BTreeMap::new();
        for c in [kc, oc] {
            for (source, s) in c {
                expected.entry(source.clone()).or_default().union(&s.found);
            }
        }
        let no_cell = LedgerCell::default();
        let lc = ledgers.get(&(tag.clone(), hour)).unwrap_or(&no_cell);
        for (source, s) in lc.agents.iter().chain(&lc.received_seqs) {
            expected.entry(source.clone()).or_default().union(s);
        }
        let mut not_received = Vec::new();
        for (source, sent) in &lc.agents {
            let m = sent.minus(lc.received_seqs.get(source).unwrap_or(&no_seqs));
            if !m.is_empty() {
                not_received.push(SourceRanges {
                    source: source.clone(),
                    events: m.len(),
                    seqs: m,
                });
            }
        }
        let mut missing_everywhere = Vec::new();
        for (source, seqs) in expected.iter() {
            if let Some(g) = gaps.get(source.as_str()) {
                // The gaps that begin right after a seq of this cell (a gap is inside a
                // source's seqs, so the seq before it was found somewhere).
                let mine: Vec<[u64; 2]> = g
                    .ranges()
                    .iter()
                    .filter(|r| seqs.contains(r[0] - 1))
                    .copied()
                    .collect();
                if !mine.is_empty() {
                    let m = SeqRanges::from_ranges(mine);
                    // Not in what each destination is held to: it is missing from
                    // both, reported once.
                    missing_everywhere.push(SourceRanges {
                        source: source.clone(),
                        events: m.len(),
                        seqs: m,
                    });
                }
            }
        }
        let unattributed = |f: &Found, c: &BTreeMap<String, crate::readback::SourceSeqs>| {
            let placed: u64 = c.values().map(|s| s.found.len()).sum();
            f.counts.get(&tag, hour).saturating_sub(placed)
        };
        let unplaced = unattributed(k, kc).max(unattributed(o, oc));
        let expected_n: u64 = expected.values().map(SeqRanges::len).sum::<u64>()
            + missing_everywhere.iter().map(|m| m.events).sum::<u64>()
            + unplaced;
        let dest = |f: &Found, c: &BTreeMap<String, crate::readback::SourceSeqs>| {
            let mut d = Destination {
                events: f.counts.get(&tag, hour),
                ..Destination::default()
            };
            for (source, want) in &expected {
                let have = c.get(source).map_or(&no_seqs, |s| &s.found);
                let m = want.minus(have);
                if !m.is_empty() {
                    d.missing.push(SourceRanges {
                        source: source.clone(),
                        events: m.len(),
                        seqs: m,
                    });
                }
            }
            for (source, s) in c {
                if s.duplicates > 0 {
                    d.duplicates += s.duplicates;
                    d.duplicated.push(SourceRanges {
                        source: source.clone(),
                        events: s.duplicates,
                        seqs: s.duplicated.clone(),
                    });
                }
            }
            d
        };
        let kd = kafka.as_ref().map(|f| dest(f, kc));
        let od = objects.as_ref().map(|f| dest(f, oc));
        let pending_relays: Vec<String> = match &object_read {
            Some(r) => {
                let announced = r.announced.get(&hour);
                relays
                    .iter()
                    .filter(|id| announced.is_none_or(|a| !a.contains(*id)))
                    .cloned()
                    .collect()
            }
            None => Vec::new(),
        };
        let hour_pending = object_read.is_some()
            && (!pending_relays.is_empty()
                || object_read
                    .as_ref()
                    .is_some_and(|r| !r.announced.contains_key(&hour)));
        let late = object_read.as_ref().map_or(0, |r| r.late.get(&tag, hour));
        let mut status = Vec::new();
        let n = |d: &Option<Destination>, f: fn(&Destination) -> u64| d.as_ref().map_or(0, f);
        let missing_k = n(&kd, |d| d.missing.iter().map(|m| m.events).sum());
        let missing_o = n(&od, |d| d.missing.iter().map(|m| m.events).sum());
        let everywhere: u64 = missing_everywhere.iter().map(|m| m.events).sum();
        let unreceived: u64 = not_received.iter().map(|m| m.events).sum();
        let mut failing = false;
        let mut row_pending = hour_pending;
        // A relay that announced the hour but published no ledger of it yet may still
        // hold what an agent reported.
        let unpublished: Vec<&String> = match &object_read {
            Some(r) if published => r
                .announced
                .get(&hour)
                .into_iter()
                .flatten()
                .filter(|id| r.ledger_relays.get(&hour).is_none_or(|l| !l.contains(*id)))
                .collect(),
            _ => Vec::new(),
        };
        if unreceived > 0 {
            if hour_pending || !unpublished.is_empty() {
                status.push(format!("PENDING ({unreceived} reported, not received yet)"));
                row_pending = true;
            } else {
                status.push(format!("MISSING {unreceived} at relays"));
                failing = true;
            }
        }
        // What the relays' ledgers say of a sink: still in the spool (offered, not yet
        // delivered or dropped), or dropped.
        // What a replaced incarnation's spool held is lost, not on its way.
        let sink_figures = |name: &Option<String>| {
            name.as_ref()
                .and_then(|n| lc.sinks.get(n).map(|f| (f, lc.lost.get(n).copied())))
                .map_or((0, 0), |(f, lost)| {
                    (
                        f.offered
                            .saturating_sub(f.delivered + f.dropped + lost.unwrap_or(0)),
                        f.dropped,
                    )
                })
        };
        let (flight_k, dropped_k) = sink_figures(&kafka_name);
        let (flight_o, dropped_o) = sink_figures(&objects_name);
        if missing_k > 0 {
            if flight_k > 0 && dropped_k == 0 {
                status.push(format!(
                    "PENDING ({missing_k} not in kafka yet, {flight_k} still in the relays' spools)"
                ));
                row_pending = true;
            } else {
                // A sink offered fewer events than the relays received: behind (its
                // broker away: what it retries is not counted as offered) or added after
                // the hour. Said, so nobody replays what a spool may still deliver.
                let offered = kafka_name
                    .as_ref()
                    .and_then(|n| lc.sinks.get(n))
                    .map_or(0, |f| f.offered);
                if published && offered < lc.received {
                    status.push(format!(
                        "MISSING {missing_k} in kafka (its sink was offered {offered} of {} received)",
                        lc.received
                    ));
                } else {
                    status.push(format!("MISSING {missing_k} in kafka"));
                }
                failing = true;
            }
        }
        if dropped_k > 0 {
            status.push(format!("DROPPED {dropped_k} by kafka"));
            failing = true;
        }
        if dropped_o > 0 {
            status.push(format!("DROPPED {dropped_o} by objects"));
            failing = true;
        }
        if missing_o > 0 && !hour_pending && flight_o > 0 && dropped_o == 0 {
            status.push(format!(
                "PENDING ({missing_o} not in objects yet, {flight_o} still in the relays' spools)"
            ));
            row_pending = true;
        } else if missing_o > 0 {
            if hour_pending {
                status.push(format!("PENDING ({missing_o} not in objects yet)"));
            } else {
                status.push(format!("MISSING {missing_o} in objects"));
                failing = true;
            }
        } else if hour_pending {
            status.push("PENDING".into());
        }
        if everywhere > 0 {
            status.push(format!("MISSING {everywhere} everywhere"));
            failing = true;
        }
        let dup_k = n(&kd, |d| d.duplicates);
        let dup_o = n(&od, |d| d.duplicates);
        if dup_k > 0 {
            status.push(format!("DUPLICATE {dup_k} in kafka"));
            failing = true;
        }
        if dup_o > 0 {
            status.push(format!("DUPLICATE {dup_o} in objects"));
            failing = true;
        }
        if late > 0 {
            status.push(format!("LATE {late}"));
        }
        let pending = row_pending;
        if failing || pending {
            all_ok = false;
        }
        if failing {
            only_pending = false;
        }
        if status.iter().all(|s| s.starts_with("LATE")) {
            status.insert(0, "OK".into());
        }
        report.rows.push(Row {
            tag: tag.clone(),
            hour: hour_label(hour),
            expected: expected_n,
            agents: published.then(|| lc.agents.values().map(SeqRanges::len).sum()),
            received: published.then_some(lc.received),
            sinks: lc.sinks.clone(),
            not_received,
            kafka: kd,
            objects: od,
            missing_everywhere,
            late,
            pending_relays,
            unpublished_relays: unpublished.into_iter().cloned().collect(),
            lost_with_spools: lc.lost.clone(),
            status: status.join("; "),
        });
    }
    if let Some(r) = object_read {
        if !r.missing.is_empty() {
            only_pending = false;
            all_ok = false;
        }
        report.missing_objects = r.missing;
    }
    for f in [k, o] {
        if f.unreadable > 0 {
            all_ok = false;
            only_pending = false;
        }
    }
    report.ok = all_ok;
    report.pending_only = !all_ok && only_pending;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The report as a table, then each difference by source and seq range.
pub fn render(r: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "reconciliation of hours {} to {} (end excluded){}{}",
        r.from,
        r.to,
        r.tag
            .as_ref()
            .map(|t| format!(", tag {t}"))
            .unwrap_or_default(),
        if r.deep {
            ", every object read"
        } else {
            ", objects by manifest"
        }
    );
    let _ = writeln!(
        out,
        "{:<24} {:<13} {:>10} {:>10} {:>10} {:>10} {:>10}  status",
        "tag", "hour (UTC)", "expected", "agents", "received", "kafka", "objects"
    );
    let opt = |n: Option<u64>| n.map_or("-".to_string(), |n| n.to_string());
    let num =
        |d: &Option<Destination>| d.as_ref().map_or("-".to_string(), |d| d.events.to_string());
    for row in &r.rows {
        let _ = writeln!(
            out,
            "{:<24} {:<13} {:>10} {:>10} {:>10} {:>10} {:>10}  {}",
            row.tag,
            row.hour,
            row.expected,
            opt(row.agents),
            opt(row.received),
            num(&row.kafka),
            num(&row.objects),
            row.status
        );
        let mut detail = |what: &str, list: &[SourceRanges]| {
            for m in list {
                let _ = writeln!(
                    out,
                    "    {what}: source {} seqs {} ({} events)",
                    m.source,
                    m.seqs.describe(8),
                    m.events
                );
            }
        };
        if let Some(d) = &row.kafka {
            detail("missing in kafka", &d.missing);
            detail("duplicated in kafka", &d.duplicated);
        }
        if let Some(d) = &row.objects {
            detail("missing in objects", &d.missing);
            detail("duplicated in objects", &d.duplicated);
        }
        detail("missing everywhere", &row.missing_everywhere);
        detail(
            "reported by an agent, received by no relay",
            &row.not_received,
        );
        for (sink, f) in &row.sinks {
            if f.offered != f.delivered || f.dropped > 0 {
                let lost = match row.lost_with_spools.get(sink) {
                    Some(n) if *n > 0 => {
                        format!(", {n} gone with a replaced relay incarnation's spool")
                    }
                    _ => String::new(),
                };
                let _ = writeln!(
                    out,
                    "    sink {sink}: offered {}, delivered {}, dropped {}{lost} (relays' ledgers)",
                    f.offered, f.delivered, f.dropped
                );
            }
        }
        if !row.pending_relays.is_empty() {
            let _ = writeln!(
                out,
                "    not announced yet by: {}",
                row.pending_relays.join(", ")
            );
        }
    }
    for m in &r.missing_objects {
        let _ = writeln!(
            out,
            "object gone from the bucket: {} (relay {}, {} events of {} {}):",
            m.key,
            m.relay,
            m.records,
            m.tag,
            hour_label(m.hour)
        );
        for (source, seqs) in &m.sources {
            let _ = writeln!(out, "    source {source} seqs {}", seqs.describe(8));
        }
    }
    let _ = writeln!(
        out,
        "read {} Kafka messages{}, {} manifests, {} relay ledgers, {} objects in {:.1} s",
        r.kafka_messages_read,
        if r.kafka_partitions_from_beginning > 0 {
            format!(
                " ({} partitions from their beginning: the broker did not answer offsets-for-times)",
                r.kafka_partitions_from_beginning
            )
        } else {
            String::new()
        },
        r.manifests_read,
        r.ledgers_read,
        r.objects_read,
        r.seconds
    );
    let _ = writeln!(
        out,
        "{}",
        if r.ok {
            "RESULT: OK, both destinations hold every event of the window once"
        } else if r.pending_only {
            "RESULT: PENDING, hours not announced by every relay yet"
        } else {
            "RESULT: differences found (see the status column)"
        }
    );
    out
}

/// A Prometheus label value, escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The report as Prometheus text (for node_exporter's textfile collector, or any scraper
/// of files): per tag, the events missing and duplicated per destination, the hours
/// pending and whether every hour was OK; and when the run was, over which window, how
/// long it took. `report` is None when the run could not read its sources: then only
/// `sluice_reconcile_success 0` and the time, so an alert on the age or on success fires.
pub fn metrics_text(report: Option<&Report>, window: &Window, now_secs: u64) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    gauge(
        "sluice_reconcile_last_run_timestamp_seconds",
        "When the last reconciliation ran (unix seconds)",
        &[(String::new(), now_secs as f64)],
    );
    gauge(
        "sluice_reconcile_success",
        "1 when the last reconciliation could read Kafka and object storage, 0 when it could not",
        &[(String::new(), if report.is_some() { 1.0 } else { 0.0 })],
    );
    gauge(
        "sluice_reconcile_window_start_timestamp_seconds",
        "The first hour the last reconciliation covered (unix seconds)",
        &[(String::new(), (window.from * 3600) as f64)],
    );
    gauge(
        "sluice_reconcile_window_end_timestamp_seconds",
        "The end of the last reconciliation's window, excluded (unix seconds)",
        &[(String::new(), (window.to * 3600) as f64)],
    );
    let Some(r) = report else {
        return out;
    };
    gauge(
        "sluice_reconcile_duration_seconds",
        "How long the last reconciliation took",
        &[(String::new(), r.seconds)],
    );
    #[derive(Default)]
    struct PerTag {
        hours: u64,
        failing: u64,
        pending: u64,
        expected: u64,
        missing: [u64; 4],
        duplicates: [u64; 2],
    }
    let mut tags: BTreeMap<&str, PerTag> = BTreeMap::new();
    let sum = |v: &[SourceRanges]| v.iter().map(|m| m.events).sum::<u64>();
    for row in &r.rows {
        let t = tags.entry(row.tag.as_str()).or_default();
        t.hours += 1;
        t.expected += row.expected;
        if row.status.contains("PENDING") {
            t.pending += 1;
        }
        if row.status.contains("MISSING") || row.status.contains("DUPLICATE") {
            t.failing += 1;
        }
        for (i, d) in [&row.kafka, &row.objects].into_iter().enumerate() {
            if let Some(d) = d {
                t.missing[i] += sum(&d.missing);
                t.duplicates[i] += d.duplicates;
            }
        }
        t.missing[2] += sum(&row.missing_everywhere);
        t.missing[3] += sum(&row.not_received);
    }
    let per_tag = |f: &dyn Fn(&PerTag) -> u64| -> Vec<(String, f64)> {
        tags.iter()
            .map(|(tag, t)| (format!("{{tag=\"{}\"}}", label(tag)), f(t) as f64))
            .collect()
    };
    let by_destination = |names: &[&str], f: &dyn Fn(&PerTag, usize) -> u64| {
        let mut v = Vec::new();
        for (tag, t) in &tags {
            for (i, d) in names.iter().enumerate() {
                v.push((
                    format!("{{tag=\"{}\",destination=\"{d}\"}}", label(tag)),
                    f(t, i) as f64,
                ));
            }
        }
        v
    };
    gauge(
        "sluice_reconcile_hours",
        "Hours of the tag in the last reconciliation's window",
        &per_tag(&|t| t.hours),
    );
    gauge(
        "sluice_reconcile_failing_hours",
        "Hours of the tag with events missing or duplicated",
        &per_tag(&|t| t.failing),
    );
    gauge(
        "sluice_reconcile_pending_hours",
        "Hours of the tag not announced by every relay yet",
        &per_tag(&|t| t.pending),
    );
    gauge(
        "sluice_reconcile_expected_events",
        "Events of the tag expected in the window",
        &per_tag(&|t| t.expected),
    );
    gauge(
        "sluice_reconcile_missing_events",
        "Events missing: in kafka, in objects, everywhere (a gap in a source's seqs), at relays (reported by an agent, received by no relay)",
        &by_destination(&["kafka", "objects", "everywhere", "relays"], &|t, i| {
            t.missing[i]
        }),
    );
    gauge(
        "sluice_reconcile_duplicate_events",
        "Events found more than once in the destination",
        &by_destination(&["kafka", "objects"], &|t, i| t.duplicates[i]),
    );
    out
}
