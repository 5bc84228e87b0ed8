//! `sluice-relay reconcile --from --to` for a cluster, against real tansu and moto: three
//! relays share one topic and one bucket; events of 3 tags over 4 past hours, each
//! source's seqs 0, 1, 2, ... (half of each source through one relay, the rest through
//! the next, as after a failover). Then: every row OK; one object deleted with boto3 is
//! named, and exactly its seqs are reported missing from object storage, `replay
//! --missing --into objects` repairs it (twice writes nothing more); records copied into
//! the topic with confluent-kafka are reported as exactly those duplicates.
//!
//! The relays' published ledgers (received counts and seqs per source) agree with both.
//!
//! And Kafka backfilled from the bucket: a relay's Kafka sink moved to a new, empty topic
//! (a new cluster, or hours written before the sink existed); reconcile reports every
//! event of the window missing in Kafka, `replay --into kafka` produces them from the
//! objects, one tag then the rest (what is there already is not produced again), and
//! confluent-kafka reads in the new topic, message for message, what the sink produced
//! into the old one: the same value bytes, key, timestamp, partition and headers.
//!
//! Size: SLUICE_RECONCILE_EVENTS (default 1,000,000, the issue's).

use std::io;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use sluice_e2e::*;
use sluice_forward::{encode_compressed_packed_forward, gzip_entries, write_entry, EventTime};

#[path = "forward_common/mod.rs"]
mod forward_common;
use forward_common::Conn;

const TAGS: [&str; 3] = ["app.web", "app.db", "audit"];
const HOURS: u64 = 4;
const SOURCES: u64 = 12;
const CHUNK: u64 = 2_000;

/// The message of `source`'s event `seq`: access-log-like, distinct per event.
fn message(source: &str, seq: u64) -> String {
    format!(
        "{source} event {seq:08} GET /api/v1/items?id={} 200",
        seq * 7919 % 100_003
    )
}

/// One chunk of `tag` from `source`: seqs `first..first + n`, event times spread evenly
/// over the 4 hours from `start` (unix seconds) by seq out of `per_source`.
fn chunk(tag: &str, source: &str, first: u64, n: u64, per_source: u64, start: u64) -> Vec<u8> {
    let mut entries = Vec::new();
    for seq in first..first + n {
        let secs = start + seq * HOURS * 3600 / per_source;
        let message = message(source, seq);
        write_entry(
            &mut entries,
            EventTime {
                secs: secs as u32,
                nanos: (seq % 1000) as u32 * 1000,
            },
            &[("message", message.as_bytes())],
        );
    }
    let provenance = sluice_forward::Provenance {
        source: source.to_string(),
        seqs: (first..first + n).collect(),
        offsets: (first..first + n).map(|s| s * 80).collect(),
    };
    let mut out = BytesMut::new();
    encode_compressed_packed_forward(
        tag,
        &gzip_entries(&entries),
        n as usize,
        &format!("{source}-{first}"),
        Some(&provenance),
        &mut out,
    );
    out.to_vec()
}

/// Four whole hours that ended at least an hour ago (they close at once): the first
/// hour, its start (unix seconds), and the window's `--from` and `--to`.
fn past_hours() -> (u64, u64, String, String) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let first_hour = now / 3600 - HOURS - 1;
    (
        first_hour,
        first_hour * 3600,
        sluice_relay::envelope::hour_label(first_hour),
        sluice_relay::envelope::hour_label(first_hour + HOURS),
    )
}

struct Run {
    code: i32,
    report: serde_json::Value,
}

fn reconcile(relay: &Relay, from: &str, to: &str, deep: bool) -> Run {
    reconcile_with(relay, from, to, deep, &[])
}

fn reconcile_with(relay: &Relay, from: &str, to: &str, deep: bool, extra: &[&str]) -> Run {
    reconcile_at(&relay.config_path, from, to, deep, extra)
}

fn reconcile_at(config: &std::path::Path, from: &str, to: &str, deep: bool, extra: &[&str]) -> Run {
    let mut cmd = std::process::Command::new(bin("sluice-relay"));
    cmd.arg("--config")
        .arg(config)
        .args(["reconcile", "--from", from, "--to", to, "--format", "json"])
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing");
    if deep {
        cmd.arg("--deep");
    }
    cmd.args(extra);
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "reconcile printed no JSON ({e}): {}\n{stderr}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    Run {
        code: out.status.code().unwrap_or(-1),
        report,
    }
}

fn replay(relay: &Relay, from: &str, to: &str) -> serde_json::Value {
    replay_into(relay, from, to, "objects", &[])
}

fn replay_into(
    relay: &Relay,
    from: &str,
    to: &str,
    into: &str,
    extra: &[&str],
) -> serde_json::Value {
    replay_at(&relay.config_path, from, to, into, extra)
}

fn replay_at(
    config: &std::path::Path,
    from: &str,
    to: &str,
    into: &str,
    extra: &[&str],
) -> serde_json::Value {
    let out = std::process::Command::new(bin("sluice-relay"))
        .arg("--config")
        .arg(config)
        .args([
            "replay",
            "--from",
            from,
            "--to",
            to,
            "--into",
            into,
            "--missing",
        ])
        .args(extra)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "replay failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn total(rows: &serde_json::Value, f: impl Fn(&serde_json::Value) -> u64) -> u64 {
    rows.as_array().unwrap().iter().map(f).sum()
}

#[test]
fn three_relays_reconcile_ok_then_name_a_deleted_object_and_copied_records() {
    let events = env_u64("SLUICE_RECONCILE_EVENTS", 1_000_000);
    let per_source = events / SOURCES;
    let events = per_source * SOURCES;
    let svc = Services::from_env();
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(dir.path(), "relay");
    let topic = unique_name("reconcile");
    let bucket = unique_name("reconcile");
    svc.create_topic(&topic, 4);
    svc.create_bucket(&bucket);
    let relays: Vec<Relay> = (0..3)
        .map(|i| {
            let mut spec = RelaySpec::new(dir.path(), &format!("relay-{i}"), certs.server_tls())
                .stem(&format!("relay-{i}"));
            spec.config.sinks.push(svc.kafka_sink(&topic));
            spec.config.sinks.push(svc.s3_sink(&bucket));
            spec.start()
        })
        .collect();
    let (first_hour, start, from, to) = past_hours();

    let t0 = Instant::now();
    let files = certs.client_tls();
    let mut sent = [0u64; 3];
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..SOURCES)
            .map(|s| {
                let relays = &relays;
                let files = &files;
                scope.spawn(move || -> io::Result<[u64; 3]> {
                    let tag = TAGS[(s % 3) as usize];
                    let source = format!("host-{s}:app");
                    let mut sent = [0u64; 3];
                    // The first half to one relay, the rest to the next.
                    for (half, range) in [(0, 0..per_source / 2), (1, per_source / 2..per_source)] {
                        let r = ((s + half) % 3) as usize;
                        let mut conn = Conn::connect(relays[r].forward, files)?;
                        let mut first = range.start;
                        while first < range.end {
                            let n = CHUNK.min(range.end - first);
                            let bytes = chunk(tag, &source, first, n, per_source, start);
                            conn.send_expect_ack(&bytes, &format!("{source}-{first}"))?;
                            sent[r] += n;
                            first += n;
                        }
                        conn.close();
                    }
                    Ok(sent)
                })
            })
            .collect();
        for h in handles {
            let got = h.join().unwrap().expect("a sender failed");
            for r in 0..3 {
                sent[r] += got[r];
            }
        }
    });
    eprintln!("{events} events sent in {:?}: {sent:?}", t0.elapsed());
    for (r, relay) in relays.iter().enumerate() {
        relay.wait_delivered("kafka", sent[r], Duration::from_secs(300));
        relay.wait_delivered("s3", sent[r], Duration::from_secs(300));
    }
    eprintln!("delivered after {:?}", t0.elapsed());

    // Every relay announces the four hours once its deliveries went past them, and
    // publishes its ledger (every 5 s).
    let received = |run: &Run| total(&run.report["rows"], |r| r["received"].as_u64().unwrap_or(0));
    let mut run = reconcile(&relays[0], &from, &to, false);
    let deadline = Instant::now() + Duration::from_secs(120);
    while (run.code == 3 || received(&run) != events) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        run = reconcile(&relays[0], &from, &to, false);
    }
    assert_eq!(
        received(&run),
        events,
        "the relays' published ledgers: {:#}",
        run.report
    );
    let rows = &run.report["rows"];
    assert_eq!(run.code, 0, "{:#}", run.report);
    assert_eq!(
        rows.as_array().unwrap().len(),
        12,
        "3 tags x 4 hours: {rows:#}"
    );
    // Backfilled hours closed with their first delivery: what came after is LATE (in a
    // later manifest revision), which is no difference.
    for row in rows.as_array().unwrap() {
        let status = row["status"].as_str().unwrap();
        assert!(status == "OK" || status.starts_with("OK; LATE "), "{row:#}");
    }
    assert_eq!(total(rows, |r| r["expected"].as_u64().unwrap()), events);
    assert_eq!(
        total(rows, |r| r["kafka"]["events"].as_u64().unwrap()),
        events
    );
    assert_eq!(
        total(rows, |r| r["objects"]["events"].as_u64().unwrap()),
        events
    );
    eprintln!(
        "reconcile (manifests) read {} Kafka messages in {:.1} s",
        run.report["kafka_messages_read"], run.report["seconds"]
    );
    // The last hour alone: only its rows, Kafka read from the window's start by
    // offsets-for-times.
    let last = sluice_relay::envelope::hour_label(first_hour + HOURS - 1);
    let one = reconcile(&relays[0], &last, &to, false);
    assert_eq!(one.code, 0, "{:#}", one.report);
    let one_rows = one.report["rows"].as_array().unwrap();
    assert_eq!(one_rows.len(), 3, "{one_rows:#?}");
    assert!(one_rows.iter().all(|r| r["hour"] == last.as_str()));
    let read = one.report["kafka_messages_read"].as_u64().unwrap();
    eprintln!(
        "reconcile of the last hour read {read} Kafka messages ({} partitions from the beginning)",
        one.report["kafka_partitions_from_beginning"]
    );
    // tansu (0.6) answers offsets-for-times with offset 0 whatever the time, so here the
    // whole topic is read (still correct: the window is applied to what is read); a
    // Kafka broker answers with the window's first offset.
    assert!(
        read >= events / HOURS,
        "read {read}: less than the hour holds"
    );
    let deep = reconcile(&relays[0], &from, &to, true);
    assert_eq!(deep.code, 0, "{:#}", deep.report);
    eprintln!(
        "reconcile --deep read {} objects in {:.1} s",
        deep.report["objects_read"], deep.report["seconds"]
    );

    // An object deleted from the bucket: named, and exactly its seqs missing in objects.
    let key = svc
        .s3_etags(&bucket)
        .into_keys()
        .find(|k| k.ends_with(".ndjson.gz"))
        .expect("an object in the bucket");
    svc.py(
        "s3_delete.py",
        &[
            "--endpoint",
            &svc.s3_endpoint,
            "--bucket",
            &bucket,
            "--key",
            &key,
        ],
    );
    let metrics = dir.path().join("reconcile.prom");
    let run = reconcile_with(
        &relays[0],
        &from,
        &to,
        false,
        &["--metrics-file", metrics.to_str().unwrap()],
    );
    assert_eq!(run.code, 1, "{:#}", run.report);
    let gone = run.report["missing_objects"].as_array().unwrap();
    assert_eq!(gone.len(), 1, "{gone:#?}");
    assert_eq!(gone[0]["key"], key.as_str());
    let records = gone[0]["records"].as_u64().unwrap();
    assert!(records > 0);
    // The metrics an alert reads: exactly those events missing in objects, for the
    // object's tag, none anywhere else.
    let text = std::fs::read_to_string(&metrics).unwrap();
    let sample = |name: &str, labels: &str| -> f64 {
        let prefix = if labels.is_empty() {
            format!("{name} ")
        } else {
            format!("{name}{{{labels}}} ")
        };
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {prefix} in:\n{text}"))
            .parse()
            .unwrap()
    };
    let tag = gone[0]["tag"].as_str().unwrap();
    assert_eq!(sample("sluice_reconcile_success", ""), 1.0);
    for t in TAGS {
        let want = if t == tag { records as f64 } else { 0.0 };
        let l = format!("tag=\"{t}\",destination=\"objects\"");
        assert_eq!(sample("sluice_reconcile_missing_events", &l), want, "{t}");
        let l = format!("tag=\"{t}\",destination=\"kafka\"");
        assert_eq!(sample("sluice_reconcile_missing_events", &l), 0.0, "{t}");
    }
    let rows = &run.report["rows"];
    let missing_objects = |rows: &serde_json::Value| -> serde_json::Map<String, serde_json::Value> {
        let mut by_source = serde_json::Map::new();
        for row in rows.as_array().unwrap() {
            for m in row["objects"]["missing"].as_array().unwrap() {
                by_source.insert(m["source"].as_str().unwrap().to_string(), m["seqs"].clone());
            }
        }
        by_source
    };
    assert_eq!(
        serde_json::Value::Object(missing_objects(rows)),
        gone[0]["sources"],
        "the object's seqs, and only those, are missing in objects"
    );
    assert_eq!(
        total(rows, |r| r["kafka"]["missing"].as_array().unwrap().len()
            as u64),
        0
    );
    // --deep, reading every object, finds the same events missing.
    let deep = reconcile(&relays[0], &from, &to, true);
    assert_eq!(deep.code, 1, "{:#}", deep.report);
    assert_eq!(
        serde_json::Value::Object(missing_objects(&deep.report["rows"])),
        gone[0]["sources"]
    );

    // `replay --missing --into objects` writes exactly those events back from Kafka:
    // reconcile is OK again, by manifests and --deep; a second replay writes nothing.
    let replayed = replay(&relays[0], &from, &to);
    assert_eq!(
        replayed["events"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum::<u64>(),
        records,
        "{replayed:#}"
    );
    assert_eq!(replayed["not_found"], 0, "{replayed:#}");
    let run = reconcile(&relays[0], &from, &to, false);
    assert_eq!(run.code, 0, "after the replay: {:#}", run.report);
    let deep = reconcile(&relays[0], &from, &to, true);
    assert_eq!(deep.code, 0, "after the replay, --deep: {:#}", deep.report);
    let again = replay(&relays[0], &from, &to);
    assert!(again["objects"].as_array().unwrap().is_empty(), "{again:#}");
    assert_eq!(reconcile(&relays[0], &from, &to, true).code, 0);

    // 1,000 records copied into the topic by another producer: exactly those duplicates.
    let dup = svc.py(
        "kafka_duplicate.py",
        &[
            "--brokers",
            &svc.kafka,
            "--topic",
            &topic,
            "--count",
            "1000",
        ],
    );
    let run = reconcile(&relays[0], &from, &to, false);
    assert_eq!(run.code, 1);
    let rows = &run.report["rows"];
    assert_eq!(
        total(rows, |r| r["kafka"]["duplicates"].as_u64().unwrap()),
        1000
    );
    let mut dup_seqs = 0;
    for row in rows.as_array().unwrap() {
        for d in row["kafka"]["duplicated"].as_array().unwrap() {
            let source = d["source"].as_str().unwrap();
            let want = &dup["sources"][source];
            let ranges = d["seqs"].as_array().unwrap();
            // One range per (source, hour) cell, inside what was copied.
            for r in ranges {
                let (a, b) = (r[0].as_u64().unwrap(), r[1].as_u64().unwrap());
                assert!(
                    a >= want[0].as_u64().unwrap() && b <= want[1].as_u64().unwrap(),
                    "{source}: {a}-{b} outside what was copied ({want})"
                );
                dup_seqs += b - a + 1;
            }
        }
    }
    assert_eq!(dup_seqs, 1000, "{rows:#}");
    for mut relay in relays {
        relay.stop(Duration::from_secs(30));
    }
}

/// A relay's Kafka sink moved to an empty topic: reconcile names every event of the
/// window missing in Kafka, `replay --into kafka` produces exactly those from the bucket,
/// as the sink produced them into the old topic.
#[test]
fn replay_into_kafka_backfills_a_new_topic_as_the_sink_wrote_the_old_one() {
    const BACKFILL_SOURCES: u64 = 6;
    let per_source = env_u64("SLUICE_REPLAY_EVENTS", 12_000) / BACKFILL_SOURCES;
    let events = per_source * BACKFILL_SOURCES;
    let svc = Services::from_env();
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(dir.path(), "relay");
    let (old_topic, new_topic) = (unique_name("before"), unique_name("backfill"));
    let bucket = unique_name("backfill");
    svc.create_topic(&old_topic, 4);
    svc.create_topic(&new_topic, 4);
    svc.create_bucket(&bucket);
    let mut spec = RelaySpec::new(dir.path(), "relay-b", certs.server_tls()).stem("relay-b");
    spec.config.sinks.push(svc.kafka_sink(&old_topic));
    spec.config.sinks.push(svc.s3_sink(&bucket));
    let mut relay = spec.start();
    let (_, start, from, to) = past_hours();
    let files = certs.client_tls();
    let mut per_tag = std::collections::BTreeMap::<&str, u64>::new();
    for s in 0..BACKFILL_SOURCES {
        let (tag, source) = (TAGS[(s % 2) as usize], format!("host-{s}:app"));
        let mut conn = Conn::connect(relay.forward, &files).unwrap();
        let mut first = 0;
        while first < per_source {
            let n = CHUNK.min(per_source - first);
            let bytes = chunk(tag, &source, first, n, per_source, start);
            conn.send_expect_ack(&bytes, &format!("{source}-{first}"))
                .unwrap();
            first += n;
        }
        conn.close();
        *per_tag.entry(tag).or_default() += per_source;
    }
    relay.wait_delivered("kafka", events, Duration::from_secs(120));
    relay.wait_delivered("s3", events, Duration::from_secs(120));
    // The hours announced and the ledger published: reconcile is OK.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut run = reconcile(&relay, &from, &to, false);
    while run.code != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        run = reconcile(&relay, &from, &to, false);
    }
    assert_eq!(run.code, 0, "before the move: {:#}", run.report);
    relay.stop(Duration::from_secs(30));

    // The sink moved to the new topic: every event of the window is missing in Kafka,
    // by source and seq range.
    let moved = svc.kafka_sink(&new_topic);
    relay.reconfigure(|c| {
        c.sinks.retain(|s| s.common.name != "kafka");
        c.sinks.push(moved);
    });
    let run = reconcile(&relay, &from, &to, false);
    assert_eq!(run.code, 1, "{:#}", run.report);
    let rows = &run.report["rows"];
    let missing_k = total(rows, |r| {
        r["kafka"]["missing"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["events"].as_u64().unwrap())
            .sum()
    });
    assert_eq!(missing_k, events, "{rows:#}");
    for row in rows.as_array().unwrap() {
        let status = row["status"].as_str().unwrap();
        assert!(
            status.starts_with("MISSING ") && status.ends_with(" in kafka"),
            "{row:#}"
        );
    }

    // One tag first, paced; then the rest: what the first produced is not produced again.
    let first_tag = TAGS[0];
    let one = replay_into(
        &relay,
        &from,
        &to,
        "kafka",
        &["--tag", first_tag, "--rate", "50000"],
    );
    assert_eq!(
        one["kafka_messages_produced"], per_tag[first_tag],
        "{one:#}"
    );
    assert_eq!(one["not_found"], 0, "{one:#}");
    let run = reconcile(&relay, &from, &to, false);
    for row in run.report["rows"].as_array().unwrap() {
        let ok = row["status"].as_str().unwrap().starts_with("OK");
        assert_eq!(ok, row["tag"] == first_tag, "{row:#}");
    }
    let rest = replay_into(&relay, &from, &to, "kafka", &[]);
    assert_eq!(
        rest["kafka_messages_produced"],
        events - per_tag[first_tag],
        "{rest:#}"
    );
    let run = reconcile(&relay, &from, &to, false);
    assert_eq!(run.code, 0, "after the replay: {:#}", run.report);
    let deep = reconcile(&relay, &from, &to, true);
    assert_eq!(deep.code, 0, "after the replay, --deep: {:#}", deep.report);
    let again = replay_into(&relay, &from, &to, "kafka", &[]);
    assert_eq!(again["kafka_messages_produced"], 0, "{again:#}");

    // confluent-kafka: the new topic holds each event once, as the sink produced it into
    // the old one (the `relay` header aside: `replay`).
    let dump = |topic: &str| -> std::collections::HashMap<(String, u64), serde_json::Value> {
        let dump = svc.py(
            "kafka_dump.py",
            &[
                "--brokers",
                &svc.kafka,
                "--topic",
                topic,
                "--expect",
                &events.to_string(),
            ],
        );
        let messages = dump["messages"].as_array().unwrap();
        assert_eq!(messages.len() as u64, events, "{topic}");
        let mut by_event = std::collections::HashMap::new();
        for m in messages {
            let value: serde_json::Value =
                serde_json::from_str(m["value"].as_str().unwrap()).unwrap();
            let id = (
                value["source"].as_str().unwrap().to_string(),
                value["seq"].as_u64().unwrap(),
            );
            assert!(
                by_event.insert(id.clone(), m.clone()).is_none(),
                "{topic}: {id:?} twice"
            );
        }
        by_event
    };
    let (before, after) = (dump(&old_topic), dump(&new_topic));
    for ((source, seq), m) in &after {
        let was = &before[&(source.clone(), *seq)];
        for field in ["value", "key", "timestamp", "partition"] {
            assert_eq!(m[field], was[field], "{source} {seq}: {field}");
        }
        let mut headers = was["headers"].clone();
        assert_eq!(headers["relay"], "relay-b");
        headers["relay"] = "replay".into();
        assert_eq!(m["headers"], headers, "{source} {seq}");
        let value: serde_json::Value = serde_json::from_str(m["value"].as_str().unwrap()).unwrap();
        assert_eq!(value["record"]["message"], message(source, *seq).as_str());
    }
}

/// A relay's Kafka sink whose broker went away keeps its events in the spool, and the
/// ledgers count only what it was offered: reconcile of a Kafka the events did not reach
/// says how few the sink was offered, and `replay --into kafka` leaves those hours alone
/// (the spool would deliver them again) until told `--force`.
#[test]
fn replay_leaves_alone_what_a_kafka_sink_behind_may_still_deliver() {
    let svc = Services::from_env();
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(dir.path(), "relay");
    let broker = PrivateService::tansu(&svc, &dir.path().join("tansu.log"));
    let private = svc.with(Some(&broker.addr), None);
    let (away_topic, topic, bucket) = (
        unique_name("away"),
        unique_name("other"),
        unique_name("away"),
    );
    private.create_topic(&away_topic, 2);
    svc.create_topic(&topic, 2);
    svc.create_bucket(&bucket);
    let mut spec = RelaySpec::new(dir.path(), "relay-w", certs.server_tls()).stem("relay-w");
    spec.config.sinks.push(private.kafka_sink(&away_topic));
    spec.config.sinks.push(svc.s3_sink(&bucket));
    let relay = spec.start();
    // The same sinks by name, Kafka read from another topic (where none of it is).
    let mut config = relay.config.clone();
    config.sinks.retain(|s| s.common.name != "kafka");
    config.sinks.push(svc.kafka_sink(&topic));
    let path = dir.path().join("reconcile.toml");
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    let (_, start, from, to) = past_hours();
    let files = certs.client_tls();
    let (source, per_source) = ("host-w:app", 4_000u64);
    let send = |first: u64, n: u64| {
        let mut conn = Conn::connect(relay.forward, &files).unwrap();
        let bytes = chunk(TAGS[0], source, first, n, per_source, start);
        conn.send_expect_ack(&bytes, &format!("{source}-{first}"))
            .unwrap();
        conn.close();
    };
    // The first hour's events reach the sink's broker; then it stops answering, and the
    // other hours stay in the spool while the bucket gets everything.
    send(0, per_source / 4);
    relay.wait_delivered("kafka", per_source / 4, Duration::from_secs(60));
    broker.pause();
    send(per_source / 4, per_source - per_source / 4);
    relay.wait_delivered("s3", per_source, Duration::from_secs(60));
    let received = |run: &Run| total(&run.report["rows"], |r| r["received"].as_u64().unwrap_or(0));
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut run = reconcile_at(&path, &from, &to, false, &[]);
    while (run.code == 3 || received(&run) != per_source) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
        run = reconcile_at(&path, &from, &to, false, &[]);
    }
    assert_eq!(run.code, 1, "{:#}", run.report);
    let rows = run.report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), HOURS as usize, "{rows:#?}");
    for (i, row) in rows.iter().enumerate() {
        let status = row["status"].as_str().unwrap();
        let n = per_source / HOURS;
        if i == 0 {
            assert_eq!(status, format!("MISSING {n} in kafka"), "{row:#}");
        } else {
            assert_eq!(
                status,
                format!("MISSING {n} in kafka (its sink was offered 0 of {n} received)"),
                "{row:#}"
            );
        }
    }
    // Only the hour the sink was offered whole is replayed; the others are named.
    let replayed = replay_at(&path, &from, &to, "kafka", &[]);
    assert_eq!(
        replayed["kafka_messages_produced"],
        per_source / HOURS,
        "{replayed:#}"
    );
    let skipped = replayed["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), HOURS as usize - 1, "{replayed:#}");
    assert!(
        skipped
            .iter()
            .all(|s| s.as_str().unwrap().contains("may be behind")),
        "{replayed:#}"
    );
    // Told the sink will not deliver them (its broker is gone for good): the rest.
    let forced = replay_at(&path, &from, &to, "kafka", &["--force"]);
    assert_eq!(
        forced["kafka_messages_produced"],
        per_source - per_source / HOURS,
        "{forced:#}"
    );
    let run = reconcile_at(&path, &from, &to, false, &[]);
    assert_eq!(run.code, 0, "after the replays: {:#}", run.report);
    drop(relay);
    drop(broker);
}
