//! Parsers end to end: the real agent tails an nginx access log with `parser = "nginx"`
//! and ships over TLS to the real relay (file sink). Parsed lines arrive as fields; a
//! line that does not parse arrives raw with `parse_error`, and the agent counts it.

use std::time::Duration;

use sluice_e2e::*;

#[test]
fn nginx_lines_arrive_parsed_and_a_bad_line_arrives_raw_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(dir.path(), "relay");
    let relay = RelaySpec::with_file_sink(dir.path(), certs.server_tls()).start();
    let log = dir.path().join("access.log");
    let lines = [
        r#"203.0.113.7 - alice [23/Nov/2026:05:00:00 +0000] "GET /api/v1/items?id=42 HTTP/1.1" 200 512 "-" "curl/8.5.0""#,
        "this is not an access log line",
        r#"198.51.100.2 - - [23/Nov/2026:05:00:01 +0000] "POST /login HTTP/2.0" 302 - "https://example.com/" "Mozilla/5.0""#,
    ];
    std::fs::write(&log, lines.join("\n") + "\n").unwrap();

    let mut spec = agent_spec(dir.path(), &relay, &certs, &log);
    let tail = spec.tail();
    tail.name = "web".into();
    tail.tag = "nginx.access".into();
    tail.parser = ParserKind::Nginx;
    let mut agent = spec.spawn();
    agent.wait("3 events at the relay", Duration::from_secs(60), || {
        relay.delivered("file") >= 3
    });
    let errors = agent.metric("sluice_agent_parse_errors_total", "input=\"web\"");
    agent.stop(Duration::from_secs(20));

    let text = std::fs::read_to_string(relay.sink_file("file")).unwrap();
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["record"].clone())
        .collect();
    assert_eq!(records.len(), 3, "{text}");
    assert_eq!(
        records[0],
        serde_json::json!({"remote": "203.0.113.7", "user": "alice",
            "time": "23/Nov/2026:05:00:00 +0000", "method": "GET",
            "path": "/api/v1/items?id=42", "protocol": "HTTP/1.1", "code": 200, "size": 512,
            "referer": "-", "agent": "curl/8.5.0"})
    );
    assert_eq!(
        records[1],
        serde_json::json!({"message": "this is not an access log line",
            "parse_error": "not in combined/common log format"})
    );
    assert_eq!(records[2]["method"], "POST");
    assert_eq!(records[2]["code"], 302);
    assert!(records[2].get("size").is_none(), "{}", records[2]);
    assert_eq!(errors, Some(1.0), "parse errors counted per input");
    // The event time is the log's own (nginx's default time field), not the read time;
    // the line that did not parse keeps the read time.
    let times = event_times(&relay);
    assert_eq!(times[0], "2026-11-23T05:00:00.000000000Z");
    assert_eq!(times[2], "2026-11-23T05:00:01.000000000Z");
    assert!(!times[1].starts_with("2026-11-23T05:00:0"), "{times:?}");
}

/// The `time` of every envelope in the relay's file sink (RFC 3339, UTC, nanoseconds).
fn event_times(relay: &Relay) -> Vec<String> {
    std::fs::read_to_string(relay.sink_file("file"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["time"].as_str().unwrap().to_string()
        })
        .collect()
}

/// JSON lines with their time in epoch milliseconds: each event carries it; a line
/// without the field arrives with its read time, is counted, and is logged once with
/// the file it came from.
#[test]
fn json_time_key_sets_the_event_time_and_a_missing_one_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(dir.path(), "relay");
    let relay = RelaySpec::with_file_sink(dir.path(), certs.server_tls()).start();
    let log = dir.path().join("app.log");
    std::fs::write(
        &log,
        "{\"ts\":1795428000250,\"msg\":\"a\"}\n{\"msg\":\"no time\"}\n{\"ts\":\"1795431600000\",\"msg\":\"c\"}\n",
    )
    .unwrap();
    let mut spec = agent_spec(dir.path(), &relay, &certs, &log);
    spec.tail().parser = ParserKind::Json;
    spec.tail().time_key = Some("ts".into());
    spec.tail().time_format = Some("epoch_ms".into());
    let mut agent = ship(spec, &relay, 3);
    let time_errors = agent.metric("sluice_agent_time_errors_total", "input=\"app\"");
    agent.stop(Duration::from_secs(20));
    let times = event_times(&relay);
    assert_eq!(times[0], "2026-11-23T10:00:00.250000000Z");
    assert_eq!(times[2], "2026-11-23T11:00:00.000000000Z");
    assert_eq!(
        records(&relay)[1]["msg"],
        "no time",
        "delivered all the same"
    );
    assert_eq!(time_errors, Some(1.0));
    let log_text = agent.log_text();
    assert!(
        log_text.contains("record time unusable") && log_text.contains("no such field"),
        "{log_text}"
    );
}

/// Kubernetes container logs (`parser = "cri"`): each line's own time, to the nanosecond,
/// is the event time; a partial line (`P`) and its end (`F`) arrive as two records; a line
/// in another format arrives raw, is counted, and keeps its read time.
#[test]
fn cri_lines_carry_their_nanosecond_times_and_partial_lines_stay_apart() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(dir.path(), "relay");
    let relay = RelaySpec::with_file_sink(dir.path(), certs.server_tls()).start();
    let log = dir.path().join("web_default_nginx-0123.log");
    std::fs::write(
        &log,
        "2026-11-23T05:00:00.123456789Z stdout F GET /healthz 200\n\
         2026-11-23T05:00:01.000000001Z stderr P first half of a long line, \n\
         2026-11-23T05:00:01.000000002Z stderr F second half\n\
         {\"log\":\"a docker json-file line\\n\",\"stream\":\"stdout\"}\n",
    )
    .unwrap();
    let mut spec = agent_spec(dir.path(), &relay, &certs, &log);
    spec.tail().name = "containers".into();
    spec.tail().parser = ParserKind::Cri;
    let mut agent = ship(spec, &relay, 4);
    let errors = agent.metric("sluice_agent_parse_errors_total", "input=\"containers\"");
    agent.stop(Duration::from_secs(20));

    let records = records(&relay);
    assert_eq!(
        records[..3],
        [
            serde_json::json!({"time": "2026-11-23T05:00:00.123456789Z", "stream": "stdout",
                "logtag": "F", "message": "GET /healthz 200"}),
            serde_json::json!({"time": "2026-11-23T05:00:01.000000001Z", "stream": "stderr",
                "logtag": "P", "message": "first half of a long line, "}),
            serde_json::json!({"time": "2026-11-23T05:00:01.000000002Z", "stream": "stderr",
                "logtag": "F", "message": "second half"}),
        ]
    );
    assert!(
        records[3]["parse_error"]
            .as_str()
            .is_some_and(|e| e.contains("CRI log format")),
        "{}",
        records[3]
    );
    assert_eq!(errors, Some(1.0), "parse errors counted per input");
    let times = event_times(&relay);
    assert_eq!(
        times[..3],
        [
            "2026-11-23T05:00:00.123456789Z",
            "2026-11-23T05:00:01.000000001Z",
            "2026-11-23T05:00:01.000000002Z"
        ]
    );
    assert!(!times[3].starts_with("2026-11-23T05:00:0"), "{times:?}");
}

/// Starts the agent of `spec` and waits until the relay's file sink has `events` events.
fn ship(spec: AgentSpec, relay: &Relay, events: u64) -> Agent {
    let agent = spec.spawn();
    agent.wait(
        &format!("{events} events at the relay"),
        Duration::from_secs(60),
        || relay.delivered("file") >= events,
    );
    agent
}

/// The agent of these tests: tails `log`, sends chunks after 100 ms.
fn agent_spec(
    dir: &std::path::Path,
    relay: &Relay,
    certs: &Certs,
    log: &std::path::Path,
) -> AgentSpec {
    let mut spec = AgentSpec::new(
        dir,
        "agent-parsers",
        &[relay.forward],
        certs.client_tls(),
        &log.display().to_string(),
    );
    spec.config.output.chunk_age = Span::millis(100);
    spec
}

fn records(relay: &Relay) -> Vec<serde_json::Value> {
    std::fs::read_to_string(relay.sink_file("file"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["record"].clone())
        .collect()
}

#[test]
fn multiline_joins_stack_traces_before_the_regex_parser() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(dir.path(), "relay");
    let relay = RelaySpec::with_file_sink(dir.path(), certs.server_tls()).start();
    let log = dir.path().join("app.log");
    std::fs::write(
        &log,
        "2026-11-23 10:00:00 ERROR request failed\n\
         java.lang.IllegalStateException: no connection\n\
         \tat com.example.Db.query(Db.java:42)\n\
         \tat com.example.Api.handle(Api.java:7)\n\
         2026-11-23 10:00:01 INFO recovered\n",
    )
    .unwrap();
    let mut spec = agent_spec(dir.path(), &relay, &certs, &log);
    let tail = spec.tail();
    tail.parser = ParserKind::Regex;
    tail.regex = Some(r"(?s)^(?P<time>\S+ \S+) (?P<level>[A-Z]+) (?P<message>.*)$".into());
    tail.time_key = Some("time".into());
    tail.time_format = Some("%Y-%m-%d %H:%M:%S".into());
    tail.multiline = Some(MultilineConfig {
        start: r"^\d{4}-\d{2}-\d{2} ".into(),
        timeout: Span::millis(200),
        max_bytes: ByteSize::mib(1),
    });
    // The last event has no next start line: the timeout sends it.
    let mut agent = ship(spec, &relay, 2);
    agent.stop(Duration::from_secs(20));
    let got = records(&relay);
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(
        got[0],
        serde_json::json!({"time": "2026-11-23 10:00:00", "level": "ERROR",
            "message": "request failed\njava.lang.IllegalStateException: no connection\n\tat com.example.Db.query(Db.java:42)\n\tat com.example.Api.handle(Api.java:7)"})
    );
    assert_eq!(got[1]["message"], "recovered");
    assert_eq!(
        event_times(&relay),
        [
            "2026-11-23T10:00:00.000000000Z",
            "2026-11-23T10:00:01.000000000Z"
        ]
    );
    // Acknowledged to the end: the checkpoint covers the event the timeout sent.
    let checkpoints = agent.checkpoints();
    let size = std::fs::metadata(&log).unwrap().len();
    assert!(
        checkpoints.contains(&format!("\"offset\": {size}")),
        "{checkpoints}"
    );
    // A multiline event counts once: seqs 0 and 1, offsets where each event began; the
    // checkpoint numbers on from 2.
    let marks: Vec<(u64, u64)> = std::fs::read_to_string(relay.sink_file("file"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|v| (v["seq"].as_u64().unwrap(), v["offset"].as_u64().unwrap()))
        .collect();
    let second = std::fs::read_to_string(&log)
        .unwrap()
        .find("2026-11-23 10:00:01")
        .unwrap();
    assert_eq!(marks, [(0, 0), (1, second as u64)]);
    assert!(checkpoints.contains("\"seq\": 2"), "{checkpoints}");
}

#[test]
fn max_read_rate_paces_reading_and_loses_nothing() {
    const LINES: u64 = 4_000; // about 260 KB
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(dir.path(), "relay");
    let relay = RelaySpec::with_file_sink(dir.path(), certs.server_tls()).start();
    let log = dir.path().join("app.log");
    write_numbered_lines(&log, 1, LINES);
    let size = std::fs::metadata(&log).unwrap().len();
    let mut spec = agent_spec(dir.path(), &relay, &certs, &log);
    spec.tail().max_read_rate = Some(ByteSize::kib(100));
    let started = std::time::Instant::now();
    let mut agent = spec.spawn();
    agent.wait("every line at the relay", Duration::from_secs(60), || {
        relay.delivered("file") >= LINES
    });
    let took = started.elapsed();
    agent.stop(Duration::from_secs(20));
    // A lower bound only (a slow machine is slower, never faster): the bucket starts
    // with a tenth of a second's worth.
    let floor = Duration::from_secs_f64((size as f64 / 102_400.0) - 0.2);
    eprintln!("{size} bytes at 100 KiB/s took {took:?} (at least {floor:?})");
    assert!(took >= floor, "read {size} bytes in {took:?}: not paced");
    assert_eq!(records(&relay).len() as u64, LINES);
}
