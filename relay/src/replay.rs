//! `sluice-relay replay --from T1 --to T2 [--tag T] --into objects|kafka [--rate R]`:
//! writes into one destination the events of the window that the other holds and it does
//! not — what `reconcile --from --to` reports as `MISSING n in objects` or `MISSING n in
//! kafka` — with their provenance (source, seq, offset, time, tag), so that reconcile
//! then reports the window complete.
//!
//! Only what is missing is written, so a replay never duplicates what is there: run
//! twice, the second finds nothing missing. Hours still pending (a relay has not
//! announced them, or its spool still holds events for the destination) are left alone:
//! what they miss may still come.
//!
//! Into objects (from Kafka): each (tag, hour) gets one object in its partition folder,
//! `replay-<digest>.ndjson.gz`, with a manifest beside the relays'
//! (`_manifests/replay-<digest>.json`) listing its seqs per source; the digest is of those
//! seqs, so a replay repeated (say after a crash half way) writes the same keys with the
//! same lines and adds nothing. `--rate` caps the events read from Kafka per second.
//!
//! Into Kafka (from objects): the objects whose manifests list a missing seq are read,
//! and each missing event is produced once, as the sink would have produced it (same
//! envelope bytes, key, headers, timestamp; `relay` header `replay`), by an idempotent
//! producer. A replay cut short produced a part: the next run finds that part present and
//! produces the rest. `--rate` caps the events produced per second.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use crate::envelope::hour_label;
use crate::reconcile_window::{self, Window};
use crate::sinks::SinkKind;
use sluice_core::ranges::SeqRanges;

/// What a replay did.
#[derive(Debug, Default, serde::Serialize)]
pub struct Replayed {
    /// `objects` or `kafka`.
    pub into: &'static str,
    /// Events written, per `<tag> <hour>`.
    pub events: BTreeMap<String, u64>,
    /// Objects written (into objects) or read (into Kafka).
    pub objects: Vec<String>,
    pub kafka_messages_read: u64,
    /// Messages produced and acknowledged (into Kafka).
    pub kafka_messages_produced: u64,
    /// Events missing from the destination that the other did not have either.
    pub not_found: u64,
    /// Events not produced because they are larger than the sink's `max_message`.
    pub too_large: u64,
    /// Rows with missing events left alone, and why (`<tag> <hour>: <reason>`).
    pub skipped: Vec<String>,
}

use crate::sinks::object::readback::Wanted;

/// What reconcile reports missing in one destination, per (tag, hour) and source, for
/// the hours no longer pending; the rows passed over, with why, into `skipped`.
/// `force` replays the rows the ledgers cast doubt on too, never an hour some relay has
/// not announced.
fn missing_in(
    report: &reconcile_window::Report,
    destination: fn(&reconcile_window::Row) -> Option<&reconcile_window::Destination>,
    sink: Option<&str>,
    force: bool,
    skipped: &mut Vec<String>,
) -> Wanted {
    let mut wanted: Wanted = BTreeMap::new();
    for row in &report.rows {
        let Some(d) = destination(row) else {
            continue;
        };
        if d.missing.is_empty() {
            continue;
        }
        // What the hour misses may still come, and copying it now would duplicate it
        // once it does: an hour not announced by every relay, a relay whose ledger of it
        // is not published, events the ledgers show still in a spool for the sink, or
        // fewer offered to the sink than the relays received (a sink behind retries
        // what it has not delivered without counting it offered).
        let figures = sink.and_then(|n| row.sinks.get(n));
        let lost = sink
            .and_then(|n| row.lost_with_spools.get(n))
            .copied()
            .unwrap_or(0);
        let in_spool = figures.map_or(0, |f| {
            f.offered.saturating_sub(f.delivered + f.dropped + lost)
        });
        let offered = figures.map_or(0, |f| f.offered);
        let received = row.received.unwrap_or(0);
        let why = if !row.pending_relays.is_empty() {
            Some(format!(
                "relays {} have not announced the hour",
                row.pending_relays.join(", ")
            ))
        } else if force {
            None
        } else if row.status.contains("PENDING") {
            Some(format!("pending ({})", row.status))
        } else if !row.unpublished_relays.is_empty() {
            Some(format!(
                "relays {} published no ledger of the hour",
                row.unpublished_relays.join(", ")
            ))
        } else if in_spool > 0 {
            Some(format!(
                "{in_spool} events still in the relays' spools for the sink"
            ))
        } else if offered < received {
            Some(format!(
                "the sink was offered {offered} of the {received} events the relays received: it may be behind (sluice_relay_sink_lag_bytes), or was added after the hour; --force replays it"
            ))
        } else {
            None
        };
        if let Some(why) = why {
            skipped.push(format!("{} {}: {why}", row.tag, row.hour));
            continue;
        }
        let Some(hour) = crate::envelope::parse_hour_label(&row.hour) else {
            continue;
        };
        for m in &d.missing {
            wanted
                .entry((row.tag.clone(), hour))
                .or_default()
                .entry(m.source.clone())
                .or_default()
                .union(&m.seqs);
        }
    }
    wanted
}

/// The config's first enabled Kafka and object sinks, and their names (how the ledgers
/// count them): a replay reads one and writes the other.
struct Sinks {
    kafka: crate::sinks::kafka::KafkaSink,
    kafka_name: String,
    objects: crate::sinks::object::ObjectSink,
    objects_name: String,
}

fn sinks(config: &crate::config::RelayConfig, into: &str) -> Result<Sinks, String> {
    let enabled = || config.sinks.iter().filter(|s| s.enabled);
    let kafka = enabled().find_map(|s| match &s.kind {
        SinkKind::Kafka(k) => Some((k.clone(), s.name.clone())),
        _ => None,
    });
    let objects = enabled().find_map(|s| match &s.kind {
        SinkKind::ObjectStore(o) => Some((o.clone(), s.name.clone())),
        _ => None,
    });
    match (kafka, objects) {
        (Some((kafka, kafka_name)), Some((objects, objects_name))) => Ok(Sinks {
            kafka,
            kafka_name,
            objects,
            objects_name,
        }),
        (k, o) => Err(format!(
            "replay --into {into} reads one destination and writes the other: the config has no enabled {} sink",
            if k.is_none() { "kafka" } else if o.is_none() { "object_store" } else { "" }
        )),
    }
}

/// `--rate`: how long to wait before the next event, `n` having gone since `started`.
fn pace(rate: Option<u64>, n: u64, started: Instant) -> Option<Duration> {
    let rate = rate.filter(|r| *r > 0)?;
    Duration::from_secs_f64(n as f64 / rate as f64).checked_sub(started.elapsed())
}

fn total(wanted: &Wanted) -> u64 {
    wanted
        .values()
        .flat_map(|s| s.values())
        .map(SeqRanges::len)
        .sum()
}

/// The object lines found, per (tag, hour): (source, seq, line).
type Lines = BTreeMap<(String, u64), Vec<(String, u64, Vec<u8>)>>;

use crate::readback::EnvelopeHead as Head;

/// The object line of a Kafka envelope: its record's fields, then sluice's. The envelope
/// writer puts `"record":{...}` last, so the record is the text after that key.
fn flat_line(payload: &[u8], head: &Head<'_>, out: &mut Vec<u8>) -> Option<()> {
    const KEY: &[u8] = b",\"record\":";
    // The first: the head's strings are JSON-escaped (a `"` in them is `\"`), so the key
    // cannot appear before the envelope's own; a record may have a field `record`.
    let at = payload.windows(KEY.len()).position(|w| w == KEY)?;
    let record = payload.get(at + KEY.len()..payload.len().checked_sub(1)?)?;
    if record.first() != Some(&b'{') || record.last() != Some(&b'}') {
        return None;
    }
    out.extend_from_slice(&record[..record.len() - 1]);
    if record.len() > 2 {
        out.push(b',');
    }
    let s = |v: &str| serde_json::to_string(v).unwrap_or_default();
    let _ = write!(
        out,
        "\"_time\":{},\"_tag\":{},\"_source\":{},\"_seq\":{}",
        s(head.time),
        s(&head.tag),
        head.source.as_deref().map_or("null".into(), s),
        head.seq.map_or("null".into(), |n| n.to_string())
    );
    if let Some(o) = head.offset {
        let _ = write!(out, ",\"_offset\":{o}");
    }
    out.extend_from_slice(b"}\n");
    Some(())
}

/// Replays into object storage what reconcile finds missing there in the window.
pub async fn into_objects(
    config: &crate::config::RelayConfig,
    window: &Window,
    rate: Option<u64>,
    force: bool,
) -> Result<Replayed, String> {
    let Sinks {
        kafka,
        objects,
        objects_name,
        ..
    } = sinks(config, "objects")?;
    let report = reconcile_window::run(config, window).await?;
    let mut done = Replayed {
        into: "objects",
        ..Replayed::default()
    };
    let wanted = missing_in(
        &report,
        |r| r.objects.as_ref(),
        Some(&objects_name),
        force,
        &mut done.skipped,
    );
    if wanted.is_empty() {
        return Ok(done);
    }
    // Read Kafka again for the window, keeping the lines of the events wanted.
    let timeout = window.kafka_timeout;
    let from_ms = (window.from * 3600 * 1000) as i64;
    let want = wanted.clone();
    let (lines, read) = tokio::task::spawn_blocking(move || {
        let mut lines: Lines = BTreeMap::new();
        let mut taken: BTreeMap<(String, u64), BTreeMap<String, SeqRanges>> = BTreeMap::new();
        let started = Instant::now();
        let mut n = 0u64;
        let read = crate::sinks::kafka::readback::consume_from(
            &kafka.brokers,
            &kafka.properties,
            &kafka.topic,
            timeout,
            Some(from_ms),
            &mut |payload| {
                n += 1;
                if let Some(wait) = pace(rate, n, started) {
                    std::thread::sleep(wait);
                }
                let Ok(head) = serde_json::from_slice::<Head>(payload) else {
                    return;
                };
                let (Some(source), Some(seq)) = (head.source.as_deref(), head.seq) else {
                    return;
                };
                let Some(hour) = head
                    .time
                    .get(..13)
                    .and_then(crate::envelope::parse_hour_label)
                else {
                    return;
                };
                let key = (head.tag.to_string(), hour);
                let Some(seqs) = want.get(&key).and_then(|s| s.get(source)) else {
                    return;
                };
                if !seqs.contains(seq) {
                    return;
                }
                // Once per event, if Kafka holds it twice.
                let t = taken
                    .entry(key.clone())
                    .or_default()
                    .entry(source.to_string())
                    .or_default();
                if !t.insert(seq) {
                    return;
                }
                let mut line = Vec::new();
                if flat_line(payload, &head, &mut line).is_some() {
                    lines
                        .entry(key)
                        .or_default()
                        .push((source.to_string(), seq, line));
                }
            },
        );
        read.map(|r| (lines, r))
    })
    .await
    .map_err(|e| e.to_string())??;
    done.kafka_messages_read = read.messages;
    let wanted_total = total(&wanted);
    let mut written = 0;
    for ((tag, hour), mut events) in lines {
        events.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        let mut sources: BTreeMap<String, SeqRanges> = BTreeMap::new();
        let mut body = Vec::new();
        for (source, seq, line) in &events {
            sources.entry(source.clone()).or_default().insert(*seq);
            body.extend_from_slice(line);
        }
        let key = objects.put_replay(&tag, hour, &body, &sources).await?;
        written += events.len() as u64;
        done.events
            .insert(format!("{tag} {}", hour_label(hour)), events.len() as u64);
        done.objects.push(key);
    }
    done.not_found = wanted_total - written;
    Ok(done)
}

/// Sluice's fields of an object line, the last in it ([`crate::envelope::write_flat`]).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LineTail {
    #[serde(rename = "_time")]
    time: String,
    #[serde(rename = "_tag")]
    tag: String,
    #[serde(rename = "_source")]
    source: Option<String>,
    #[serde(rename = "_seq")]
    seq: Option<u64>,
    #[serde(rename = "_offset", default)]
    offset: Option<u64>,
}

/// An object line taken apart: sluice's fields, and where the record is in the line.
struct Line {
    tail: LineTail,
    time: sluice_forward::EventTime,
    /// The record's own fields, the text between the line's `{` and sluice's fields.
    fields: std::ops::Range<usize>,
}

/// Reads an object line. Sluice's fields come after the record's, so they begin at the
/// last `"_time":"` (a record field of that name stays before them, and inside JSON
/// strings a `"` is escaped).
fn read_line(line: &[u8]) -> Option<Line> {
    const KEY: &[u8] = b"\"_time\":\"";
    let line = line.trim_ascii();
    let at = memchr::memmem::rfind(line, KEY)?;
    let fields = match line.get(at.checked_sub(1)?)? {
        b'{' if at == 1 => 1..1,
        b',' if at >= 2 && line.first() == Some(&b'{') => 1..at - 1,
        _ => return None,
    };
    let mut tail = Vec::with_capacity(line.len() - at + 1);
    tail.push(b'{');
    tail.extend_from_slice(&line[at..]);
    let tail: LineTail = serde_json::from_slice(&tail).ok()?;
    let time = crate::envelope::parse_rfc3339(&tail.time)?;
    Some(Line { tail, time, fields })
}

/// Appends the Kafka envelope of an object line ([`flat_line`]'s inverse): the bytes the
/// sink produced for the same event. Returns where its record is in `out`.
fn envelope_of(line: &[u8], l: &Line, out: &mut Vec<u8>) -> std::ops::Range<usize> {
    let line = line.trim_ascii();
    let s = |v: &str| serde_json::to_string(v).unwrap_or_default();
    let t = &l.tail;
    let _ = write!(
        out,
        "{{\"time\":{},\"tag\":{},\"source\":{},\"seq\":{}",
        s(&t.time),
        s(&t.tag),
        t.source.as_deref().map_or("null".into(), s),
        t.seq.map_or("null".into(), |n| n.to_string())
    );
    if let Some(o) = t.offset {
        let _ = write!(out, ",\"offset\":{o}");
    }
    out.extend_from_slice(b",\"record\":");
    let start = out.len();
    out.push(b'{');
    out.extend_from_slice(&line[l.fields.clone()]);
    out.push(b'}');
    let record = start..out.len();
    out.push(b'}');
    record
}

/// Produces into Kafka what reconcile finds missing there in the window, from the
/// objects that hold it.
pub async fn into_kafka(
    config: &crate::config::RelayConfig,
    window: &Window,
    rate: Option<u64>,
    force: bool,
) -> Result<Replayed, String> {
    let Sinks {
        kafka,
        kafka_name,
        objects,
        ..
    } = sinks(config, "kafka")?;
    // The producer first: a config it cannot produce with fails before any reading.
    let mut producer = crate::sinks::kafka::replay::Replayer::new(&kafka).await?;
    let report = reconcile_window::run(config, window).await?;
    let mut done = Replayed {
        into: "kafka",
        kafka_messages_read: report.kafka_messages_read,
        ..Replayed::default()
    };
    let wanted = missing_in(
        &report,
        |r| r.kafka.as_ref(),
        Some(&kafka_name),
        force,
        &mut done.skipped,
    );
    if wanted.is_empty() {
        return Ok(done);
    }
    let (store, prefix) = objects.open()?;
    let keys =
        crate::sinks::object::readback::objects_holding(store.as_ref(), &prefix, &wanted).await?;
    // Once per event, if the bucket holds it twice.
    let mut taken: Wanted = BTreeMap::new();
    let started = Instant::now();
    let mut produced = 0u64;
    let mut buf = Vec::new();
    for key in keys {
        // This object's missing events, in seq order per source: each line read once
        // and turned into its envelope here, the record's place in it kept.
        let mut found: Vec<(Line, Vec<u8>, std::ops::Range<usize>)> = Vec::new();
        let location = object_store::path::Path::from(key.as_str());
        crate::sinks::object::readback::each_line(
            store.as_ref(),
            &location,
            &mut buf,
            &mut |line| {
                let Some(l) = read_line(line) else {
                    return;
                };
                let (Some(source), Some(seq)) = (l.tail.source.as_deref(), l.tail.seq) else {
                    return;
                };
                let cell = (l.tail.tag.clone(), crate::envelope::hour_of(l.time));
                if !wanted
                    .get(&cell)
                    .and_then(|w| w.get(source))
                    .is_some_and(|w| w.contains(seq))
                {
                    return;
                }
                if taken
                    .entry(cell)
                    .or_default()
                    .entry(source.to_string())
                    .or_default()
                    .insert(seq)
                {
                    let mut envelope = Vec::with_capacity(line.len() + 64);
                    let record = envelope_of(line, &l, &mut envelope);
                    found.push((l, envelope, record));
                }
            },
        )
        .await?;
        found.sort_by(|a, b| {
            (&a.0.tail.source, a.0.tail.seq).cmp(&(&b.0.tail.source, b.0.tail.seq))
        });
        for (l, envelope, record) in &found {
            let t = &l.tail;
            let event = crate::sinks::kafka::replay::Event {
                time: l.time,
                tag: &t.tag,
                source: t.source.as_deref().unwrap_or_default(),
                seq: t.seq.unwrap_or_default(),
                envelope,
                record: &envelope[record.clone()],
            };
            if let Some(wait) = pace(rate, produced, started) {
                tokio::time::sleep(wait).await;
            }
            if producer.send(&event).await? {
                produced += 1;
                *done
                    .events
                    .entry(format!(
                        "{} {}",
                        t.tag,
                        hour_label(crate::envelope::hour_of(l.time))
                    ))
                    .or_default() += 1;
            }
        }
        done.objects.push(key);
    }
    producer.finish().await?;
    done.kafka_messages_produced = producer.delivered();
    done.too_large = producer.too_large;
    done.not_found = total(&wanted) - total(&taken);
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_becomes_the_object_line_the_sink_writes() {
        let payload = br#"{"time":"2026-11-23T09:00:00.000000001Z","tag":"t","source":"s","seq":3,"offset":80,"record":{"message":"hi \"x\""}}"#;
        let head: Head = serde_json::from_slice(payload).unwrap();
        let mut out = Vec::new();
        flat_line(payload, &head, &mut out).unwrap();
        // What envelope::write_flat writes for the same event.
        let mut want = Vec::new();
        let mut rec = Vec::new();
        sluice_forward::write_entry(
            &mut rec,
            sluice_forward::EventTime {
                secs: 1_795_424_400,
                nanos: 1,
            },
            &[("message", b"hi \"x\"".as_slice())],
        );
        crate::envelope::write_flat(
            &mut want,
            sluice_forward::EventTime {
                secs: 1_795_424_400,
                nanos: 1,
            },
            "t",
            Some("s"),
            crate::record::Mark {
                seq: Some(3),
                offset: Some(80),
            },
            &rec[sluice_forward::ENTRY_HEADER_LEN..],
        )
        .unwrap();
        want.push(b'\n');
        assert_eq!(
            String::from_utf8(out).unwrap(),
            String::from_utf8(want).unwrap()
        );
        let empty = br#"{"time":"2026-11-23T09:00:00.000000001Z","tag":"t","source":null,"seq":null,"record":{}}"#;
        let head: Head = serde_json::from_slice(empty).unwrap();
        let mut out = Vec::new();
        flat_line(empty, &head, &mut out).unwrap();
        assert_eq!(
            out,
            b"{\"_time\":\"2026-11-23T09:00:00.000000001Z\",\"_tag\":\"t\",\"_source\":null,\"_seq\":null}\n"
        );
    }

    /// An object line turned back into an envelope is byte for byte what the sink
    /// produced for the same event: for a record with fields named like sluice's (at its
    /// top and nested), an empty record, with and without offset and source.
    #[test]
    fn an_object_line_becomes_the_envelope_the_sink_produces() {
        use sluice_forward::EventTime;
        let time = EventTime {
            secs: 1_795_424_400,
            nanos: 123_456_789,
        };
        let records: Vec<Vec<(&str, &[u8])>> = vec![
            vec![("message", b"GET /x \"q\" 200".as_slice())],
            vec![
                ("_time", b"not ours".as_slice()),
                ("message", b"{\"_time\":\"x\"}"),
            ],
            vec![],
        ];
        for fields in &records {
            for (source, mark) in [
                (
                    Some("web-1:app:1:2:ab:0"),
                    crate::record::Mark {
                        seq: Some(7),
                        offset: Some(480),
                    },
                ),
                (
                    Some("fluent"),
                    crate::record::Mark {
                        seq: Some(0),
                        offset: None,
                    },
                ),
                (None, crate::record::Mark::default()),
            ] {
                let mut rec = Vec::new();
                sluice_forward::write_entry(&mut rec, time, fields);
                let record = &rec[sluice_forward::ENTRY_HEADER_LEN..];
                let mut flat = Vec::new();
                crate::envelope::write_flat(&mut flat, time, "app.web", source, mark, record)
                    .unwrap();
                flat.push(b'\n');
                let mut want = Vec::new();
                crate::envelope::write(&mut want, time, "app.web", source, mark, record).unwrap();
                let l = read_line(&flat).expect("an object line");
                assert_eq!(l.time, time);
                assert_eq!(l.tail.seq, mark.seq);
                assert_eq!(l.tail.source.as_deref(), source);
                let mut got = Vec::new();
                let record = envelope_of(&flat, &l, &mut got);
                assert_eq!(
                    String::from_utf8(got.clone()).unwrap(),
                    String::from_utf8(want).unwrap()
                );
                // And the record the key template reads is the record.
                let json: serde_json::Value = serde_json::from_slice(&got[record]).unwrap();
                assert_eq!(json.as_object().unwrap().len(), fields.len());
            }
        }
        for bad in [
            &b"{\"message\":\"no provenance\"}"[..],
            b"not json",
            b"{\"_time\":\"x\",\"_tag\":\"t\",\"_source\":null,\"_seq\":null}",
        ] {
            assert!(read_line(bad).is_none(), "{}", String::from_utf8_lossy(bad));
        }
    }

    /// A replay leaves alone, and lists, the rows whose missing events may still come.
    #[test]
    fn rows_whose_events_may_still_come_are_skipped_with_why() {
        use reconcile_window::{Destination, Report, Row, SourceRanges};
        let missing = |first, last| Destination {
            missing: vec![SourceRanges {
                source: "web-1:app".into(),
                seqs: SeqRanges::from_ranges([[first, last]]),
                events: last - first + 1,
            }],
            ..Destination::default()
        };
        let row = |hour: &str, status: &str, d: Destination| Row {
            tag: "app".into(),
            hour: hour.into(),
            status: status.into(),
            kafka: Some(d),
            ..Row::default()
        };
        let mut in_spool = row(
            "2026-11-23T12",
            "MISSING 5 in kafka; DROPPED 1 by kafka",
            missing(30, 34),
        );
        in_spool.sinks.insert(
            "kafka".into(),
            crate::sinks::object::published::SinkFigures {
                offered: 10,
                delivered: 3,
                dropped: 1,
            },
        );
        let mut behind = row(
            "2026-11-23T14",
            "MISSING 5 in kafka (its sink was offered 4 of 10 received)",
            missing(40, 44),
        );
        behind.received = Some(10);
        behind.sinks.insert(
            "kafka".into(),
            crate::sinks::object::published::SinkFigures {
                offered: 4,
                delivered: 4,
                dropped: 0,
            },
        );
        let mut announced_by_some = row("2026-11-23T15", "PENDING", missing(50, 54));
        announced_by_some.pending_relays = vec!["relay-3".into()];
        let mut unpublished = row("2026-11-23T11", "MISSING 5 in kafka", missing(20, 24));
        unpublished.unpublished_relays = vec!["relay-2".into()];
        let report = Report {
            rows: vec![
                row("2026-11-23T09", "MISSING 5 in kafka", missing(0, 4)),
                row(
                    "2026-11-23T10",
                    "PENDING (5 not in kafka yet, 9 still in the relays' spools)",
                    missing(10, 14),
                ),
                unpublished,
                in_spool,
                row("2026-11-23T13", "OK", Destination::default()),
                behind,
                announced_by_some,
            ],
            ..Report::default()
        };
        let mut skipped = Vec::new();
        let wanted = missing_in(
            &report,
            |r| r.kafka.as_ref(),
            Some("kafka"),
            false,
            &mut skipped,
        );
        let hour = crate::envelope::parse_hour_label("2026-11-23T09").unwrap();
        assert_eq!(wanted.len(), 1, "{wanted:?}");
        assert_eq!(
            wanted[&("app".to_string(), hour)]["web-1:app"],
            SeqRanges::from_ranges([[0, 4]])
        );
        assert_eq!(skipped.len(), 5, "{skipped:?}");
        assert!(
            skipped[3].contains("offered 4 of the 10 events"),
            "{skipped:?}"
        );
        assert!(
            skipped[4].contains("relay-3 have not announced"),
            "{skipped:?}"
        );
        assert!(
            skipped[0].starts_with("app 2026-11-23T10: pending"),
            "{skipped:?}"
        );
        assert!(
            skipped[1].contains("relay-2 published no ledger"),
            "{skipped:?}"
        );
        assert!(
            skipped[2].contains("6 events still in the relays' spools"),
            "{skipped:?}"
        );
        // --force: all but the hour a relay has not announced.
        let mut skipped = Vec::new();
        let wanted = missing_in(
            &report,
            |r| r.kafka.as_ref(),
            Some("kafka"),
            true,
            &mut skipped,
        );
        assert_eq!(wanted.len(), 5, "{wanted:?}");
        assert_eq!(skipped.len(), 1, "{skipped:?}");
    }
}
