//! Topic and key templates, headers, timestamps and the raw value (issue 14), read back
//! with the confluent-kafka client from tansu.
//!
//! One sink routes by `topic = "<u>-{record.service}"` with `key = "{record.service}"`:
//! events of an existing service's topic land there; events without the field, with a
//! service whose topic does not exist, or whose rendered name is not a legal topic go to
//! `default_topic`, each counted by reason. A second sink sends `value = "raw"`. Every
//! message carries headers tag, source, seq, relay and agent, and the event's own time
//! as its CreateTime.

use std::collections::BTreeMap;
use std::time::Duration;

use sluice_e2e::*;

const N: u64 = 500;

#[test]
fn templates_route_events_and_every_message_carries_its_provenance() {
    let svc = Services::from_env();
    let tmp = tempfile::tempdir().unwrap();
    let u = unique_name("route");
    let topic = |name: &str| format!("{u}-{name}");
    for t in ["billing", "search", "default", "raw"] {
        svc.create_topic(&topic(t), 3);
    }
    let mut spec = RelaySpec::insecure(tmp.path(), "relay-routing");
    let mut routed = svc.kafka_sink(&format!("{u}-{{record.service}}"));
    let k = routed.kafka();
    k.default_topic = Some(topic("default"));
    k.key = "{record.service}".into();
    let mut raw = svc.kafka_sink(&topic("raw"));
    raw.common.name = "raw".into();
    raw.kafka().value = KafkaValue::Raw;
    spec.config.sinks.push(routed);
    spec.config.sinks.push(raw);
    let relay = spec.start();

    // Event n has service billing, search, none, nosuch, bad/name in turn.
    let time = "2026-11-23T05:00:00Z";
    let sent = svc.py(
        "fluent_send.py",
        &[
            "--host",
            "127.0.0.1",
            "--port",
            &relay.forward.port().to_string(),
            "--tag",
            "app.web",
            "--count",
            &N.to_string(),
            "--time",
            time,
            "--spread",
            "60",
            "--field",
            "service=billing,search,,nosuch,bad/name",
            "--source",
            "web-7:/var/log/app.log",
            "--ack",
            "--batch",
            "50",
        ],
    );
    assert_eq!(sent["sent"], N, "{sent}");
    relay.wait(
        "both sinks to deliver every event",
        Duration::from_secs(60),
        || relay.delivered("kafka") >= N && relay.delivered("raw") >= N,
    );

    let dump = |t: &str, expect: u64| -> Vec<serde_json::Value> {
        let out = svc.py(
            "kafka_dump.py",
            &[
                "--brokers",
                &svc.kafka,
                "--topic",
                &topic(t),
                "--expect",
                &expect.to_string(),
            ],
        );
        out["messages"].as_array().unwrap().clone()
    };
    let per_service = N / 5;
    let billing = dump("billing", per_service);
    let search = dump("search", per_service);
    let default = dump("default", 3 * per_service);
    assert_eq!(
        (billing.len(), search.len(), default.len()),
        (
            per_service as usize,
            per_service as usize,
            3 * per_service as usize
        ),
        "each service's topic, the rest in default_topic"
    );
    let rerouted = |reason: &str| {
        relay.counter(
            "sluice_relay_kafka_rerouted_total",
            &format!("reason=\"{reason}\""),
        ) as u64
    };
    assert_eq!(rerouted("missing_field"), per_service, "no service field");
    assert_eq!(rerouted("unknown_topic"), per_service, "service nosuch");
    assert_eq!(rerouted("invalid_topic"), per_service, "service bad/name");
    assert_eq!(
        rerouted("key_missing_field"),
        per_service,
        "no service for the key"
    );

    let start = parse_rfc3339(time);
    let mut seqs = Vec::new();
    for (t, messages) in [
        ("billing", &billing),
        ("search", &search),
        ("default", &default),
    ] {
        for m in messages {
            let env: serde_json::Value =
                serde_json::from_str(m["value"].as_str().unwrap()).unwrap();
            let service = env["record"]["service"].as_str();
            match t {
                "default" => assert!(
                    matches!(service, None | Some("nosuch") | Some("bad/name")),
                    "{m}"
                ),
                _ => assert_eq!(service, Some(t), "{m}"),
            }
            // The key template, or the source id where the field is missing.
            let want_key = service.unwrap_or("web-7:/var/log/app.log");
            assert_eq!(m["key"], want_key, "{m}");
            let h = &m["headers"];
            assert_eq!(h["tag"], "app.web", "{m}");
            assert_eq!(h["source"], "web-7:/var/log/app.log", "{m}");
            assert_eq!(h["relay"], "relay-routing", "{m}");
            assert_eq!(h["agent"], "web-7", "{m}");
            let seq: u64 = h["seq"].as_str().unwrap().parse().unwrap();
            assert_eq!(env["seq"], seq, "{m}");
            seqs.push(seq);
            // CreateTime (type 1) = the event's time in milliseconds.
            let event_ms = (parse_rfc3339(env["time"].as_str().unwrap()) * 1000.0).floor();
            assert_eq!(m["timestamp"][0], 1, "CreateTime: {m}");
            assert_eq!(m["timestamp"][1].as_f64().unwrap(), event_ms, "{m}");
            assert!(event_ms / 1000.0 >= start && event_ms / 1000.0 < start + 61.0);
        }
    }
    seqs.sort();
    assert_eq!(seqs, (1..=N).collect::<Vec<_>>(), "every event once");

    // The raw sink: the line itself, provenance in the headers.
    let raw = dump("raw", N);
    let lines: BTreeMap<u64, &str> = raw
        .iter()
        .map(|m| {
            let seq = m["headers"]["seq"].as_str().unwrap().parse().unwrap();
            (seq, m["value"].as_str().unwrap())
        })
        .collect();
    assert_eq!(lines.len() as u64, N);
    for (seq, line) in &lines {
        assert_eq!(
            *line,
            format!("line {seq:08}"),
            "the raw line of event {seq}"
        );
    }
}

/// A topic that does not exist is an error someone must fix: the sink retries it every
/// `retry_max`, says so at error level, `sink_failing` is 1 and `/ready` answers 503
/// naming the sink; once the topic exists the events are delivered and the relay is
/// ready again.
#[test]
fn a_missing_topic_makes_the_relay_not_ready() {
    let svc = Services::from_env();
    let tmp = tempfile::tempdir().unwrap();
    let topic = unique_name("not-yet");
    let mut spec = RelaySpec::insecure(tmp.path(), "relay-missing");
    let mut kafka = svc.kafka_sink(&topic);
    kafka.common.retry_max = Span::secs(1);
    spec.config.sinks.push(kafka);
    let relay = spec.start();
    svc.fluent_send(
        relay.forward.port(),
        "app",
        1,
        100,
        "2026-11-23T05:00:00Z",
        1.0,
    );
    let ready = || http_get(relay.metrics, "/ready").unwrap_or_default();
    relay.wait(
        "the relay to say it is not ready",
        Duration::from_secs(60),
        || {
            relay.counter("sluice_relay_sink_failing", "sink=\"kafka\"") == 1.0
                && ready().contains("sink \"kafka\"")
        },
    );
    let body = ready();
    assert!(
        body.contains("does not exist"),
        "/ready names the cause: {body}"
    );
    assert!(
        relay
            .log_text()
            .contains("will fail again until the cause is fixed"),
        "logged at error level"
    );
    svc.create_topic(&topic, 2);
    relay.wait_delivered("kafka", 100, Duration::from_secs(90));
    relay.wait(
        "the relay to be ready again",
        Duration::from_secs(30),
        || ready().contains(" 200 "),
    );
    assert_eq!(
        relay.counter("sluice_relay_sink_failing", "sink=\"kafka\""),
        0.0
    );
    let summary = svc.kafka_summary(&topic, 100);
    assert_eq!(summary["distinct_messages"], 100, "{summary}");
    assert_eq!(summary["duplicates"], 0, "{summary}");
}

/// Every codec the sink offers, against tansu, read back by confluent-kafka: the same
/// events through one sink per codec, each delivered once with its headers and time.
#[test]
fn every_compression_codec_reaches_the_broker_and_reads_back() {
    const EVENTS: u64 = 300;
    let svc = Services::from_env();
    let tmp = tempfile::tempdir().unwrap();
    let u = unique_name("codec");
    let codecs = ["none", "gzip", "snappy", "lz4", "zstd"];
    let mut spec = RelaySpec::insecure(tmp.path(), "relay-codecs");
    for codec in codecs {
        let topic = format!("{u}-{codec}");
        svc.create_topic(&topic, 2);
        let mut sink = svc.kafka_sink(&topic);
        sink.common.name = codec.into();
        sink.kafka().compression = codec.into();
        spec.config.sinks.push(sink);
    }
    let relay = spec.start();
    let sent = svc.py(
        "fluent_send.py",
        &[
            "--host",
            "127.0.0.1",
            "--port",
            &relay.forward.port().to_string(),
            "--tag",
            "codec",
            "--count",
            &EVENTS.to_string(),
            "--source",
            "web-3:/var/log/app.log",
            "--ack",
            "--batch",
            "100",
        ],
    );
    assert_eq!(sent["sent"], EVENTS, "{sent}");
    relay.wait(
        "every codec's sink to deliver",
        Duration::from_secs(60),
        || codecs.iter().all(|c| relay.delivered(c) >= EVENTS),
    );
    for codec in codecs {
        let summary = svc.kafka_summary(&format!("{u}-{codec}"), EVENTS);
        assert_eq!(summary["distinct_messages"], EVENTS, "{codec}: {summary}");
        assert_eq!(summary["duplicates"], 0, "{codec}: {summary}");
        assert_eq!(summary["bad"], 0, "{codec}: {summary}");
        assert_eq!(summary["header_mismatch"], 0, "{codec}: {summary}");
        assert_eq!(summary["timestamp_mismatch"], 0, "{codec}: {summary}");
    }
}
