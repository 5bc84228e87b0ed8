//! `sluice-relay replay --from T1 --to T2 [--tag T] --into objects [--rate R]`: writes into
//! object storage the events of the window that Kafka holds and the bucket does not — what
//! `reconcile --from --to` reports as `MISSING n in objects` — with their provenance
//! (`_source`, `_seq`, `_offset`, `_time`, `_tag`), so that reconcile then reports the
//! window complete.
//!
//! Only what is missing is written, so a replay never duplicates what is there. Each
//! (tag, hour) gets one object in its partition folder, `replay-<digest>.ndjson.gz`, with
//! a manifest beside the relays' (`_manifests/replay-<digest>.json`) listing its seqs per
//! source; the digest is of those seqs, so a replay repeated (say after a crash half way)
//! writes the same keys with the same lines and adds nothing. `--rate` caps the events
//! read from Kafka per second, so a replay can run beside production.
//!
//! Into Kafka (from objects) is not built yet.

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
    /// Events written, per `<tag> <hour>`.
    pub events: BTreeMap<String, u64>,
    pub objects: Vec<String>,
    pub kafka_messages_read: u64,
    /// Events missing from objects that Kafka did not have either.
    pub not_found: u64,
}

/// The seqs to replay: per tag, hour, source.
type Wanted = BTreeMap<(String, u64), BTreeMap<String, SeqRanges>>;

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
) -> Result<Replayed, String> {
    let report = reconcile_window::run(config, window).await?;
    let mut wanted: Wanted = BTreeMap::new();
    for row in &report.rows {
        let Some(objects) = &row.objects else {
            continue;
        };
        // An hour not announced by every relay: its objects may still come, and copying
        // its events now would duplicate them once they do.
        if !row.pending_relays.is_empty() || row.status.contains("PENDING") {
            continue;
        }
        let Some(hour) = crate::envelope::parse_hour_label(&row.hour) else {
            continue;
        };
        for m in &objects.missing {
            wanted
                .entry((row.tag.clone(), hour))
                .or_default()
                .entry(m.source.clone())
                .or_default()
                .union(&m.seqs);
        }
    }
    let mut done = Replayed::default();
    if wanted.is_empty() {
        return Ok(done);
    }
    let enabled = || config.sinks.iter().filter(|s| s.enabled);
    let kafka = enabled()
        .find_map(|s| match &s.kind {
            SinkKind::Kafka(k) => Some(k.clone()),
            _ => None,
        })
        .ok_or("replay --into objects reads Kafka: the config has no enabled kafka sink")?;
    let objects = enabled()
        .find_map(|s| match &s.kind {
            SinkKind::ObjectStore(o) => Some(o.clone()),
            _ => None,
        })
        .ok_or("replay --into objects needs an enabled object_store sink in the config")?;
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
            &kafka.topic,
            timeout,
            Some(from_ms),
            &mut |payload| {
                n += 1;
                if let Some(rate) = rate.filter(|r| *r > 0) {
                    // Paced: n events may have been read by now.
                    let due = Duration::from_secs_f64(n as f64 / rate as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        std::thread::sleep(wait);
                    }
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
    let wanted_total: u64 = wanted
        .values()
        .flat_map(|s| s.values())
        .map(SeqRanges::len)
        .sum();
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
}
