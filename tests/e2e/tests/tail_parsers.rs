//! Parsers end to end: the real agent tails an nginx access log with `parser = "nginx"`
//! and ships over TLS to the real relay (file sink). Parsed lines arrive as fields; a
//! line that does not parse arrives raw with `parse_error`, and the agent counts it.

use std::net::SocketAddr;
use std::time::Duration;

use sluice_e2e::*;

#[test]
fn nginx_lines_arrive_parsed_and_a_bad_line_arrives_raw_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(dir.path(), "relay");
    let relay = FileRelay::start(dir.path(), &certs);
    let log = dir.path().join("access.log");
    let lines = [
        r#"203.0.113.7 - alice [23/Nov/2026:05:00:00 +0000] "GET /api/v1/items?id=42 HTTP/1.1" 200 512 "-" "curl/8.5.0""#,
        "this is not an access log line",
        r#"198.51.100.2 - - [23/Nov/2026:05:00:01 +0000] "POST /login HTTP/2.0" 302 - "https://example.com/" "Mozilla/5.0""#,
    ];
    std::fs::write(&log, lines.join("\n") + "\n").unwrap();

    let agent_metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[agent]
id = "agent-parsers"
data_dir = "{data}"

[[input]]
type = "tail"
name = "web"
tag = "nginx.access"
include = ["{log}"]
parser = "nginx"

[output]
relays = ["{relay}"]
tls = {{ ca = "{ca}", server_name = "localhost" }}
chunk_age = "100ms"

[metrics]
listen = "{agent_metrics}"
"#,
            data = dir.path().join("agent-data").display(),
            log = log.display(),
            relay = relay.forward,
            ca = certs.ca.display(),
        ),
    )
    .unwrap();
    let mut agent = Proc::start("sluice-agent", &config, &dir.path().join("agent.log"));
    wait_for("3 events at the relay", Duration::from_secs(60), || {
        assert!(agent.is_running(), "agent exited:\n{}", agent.log_text());
        relay.delivered() >= 3
    });
    let errors = metric(
        agent_metrics,
        "sluice_agent_parse_errors_total",
        "input=\"web\"",
    );
    agent.stop(Duration::from_secs(20));

    let text = std::fs::read_to_string(&relay.out).unwrap();
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
fn event_times(relay: &FileRelay) -> Vec<String> {
    std::fs::read_to_string(&relay.out)
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
    let relay = FileRelay::start(dir.path(), &certs);
    let log = dir.path().join("app.log");
    std::fs::write(
        &log,
        "{\"ts\":1795428000250,\"msg\":\"a\"}\n{\"msg\":\"no time\"}\n{\"ts\":\"1795431600000\",\"msg\":\"c\"}\n",
    )
    .unwrap();
    let input = format!(
        r#"include = ["{}"]
parser = "json"
time_key = "ts"
time_format = "epoch_ms""#,
        log.display()
    );
    let (mut agent, metrics) = ship(dir.path(), &relay, &certs, &input, 3);
    let time_errors = metric(metrics, "sluice_agent_time_errors_total", "input=\"app\"");
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

/// Starts an agent with the `[[input]]` body `input` and waits until the relay's file
/// sink has `events` events; returns the running agent and its metrics address.
fn ship(
    dir: &std::path::Path,
    relay: &FileRelay,
    certs: &Certs,
    input: &str,
    events: u64,
) -> (Proc, SocketAddr) {
    let (config, metrics) = agent_config(dir, relay, certs, input);
    let mut agent = Proc::start("sluice-agent", &config, &dir.join("agent.log"));
    wait_for(
        &format!("{events} events at the relay"),
        Duration::from_secs(60),
        || {
            assert!(agent.is_running(), "agent exited:\n{}", agent.log_text());
            relay.delivered() >= events
        },
    );
    (agent, metrics)
}

fn agent_config(
    dir: &std::path::Path,
    relay: &FileRelay,
    certs: &Certs,
    input: &str,
) -> (std::path::PathBuf, SocketAddr) {
    let config = dir.join("agent.toml");
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    std::fs::write(
        &config,
        format!(
            r#"
[agent]
id = "agent-parsers"
data_dir = "{data}"

[[input]]
type = "tail"
name = "app"
tag = "app.log"
{input}

[output]
relays = ["{relay}"]
tls = {{ ca = "{ca}", server_name = "localhost" }}
chunk_age = "100ms"

[metrics]
listen = "{metrics}"
"#,
            data = dir.join("agent-data").display(),
            relay = relay.forward,
            ca = certs.ca.display(),
        ),
    )
    .unwrap();
    (config, metrics)
}

fn records(relay: &FileRelay) -> Vec<serde_json::Value> {
    std::fs::read_to_string(&relay.out)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["record"].clone())
        .collect()
}

#[test]
fn multiline_joins_stack_traces_before_the_regex_parser() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(dir.path(), "relay");
    let relay = FileRelay::start(dir.path(), &certs);
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
    let input = format!(
        r#"include = ["{}"]
parser = "regex"
regex = '(?s)^(?P<time>\S+ \S+) (?P<level>[A-Z]+) (?P<message>.*)$'
time_key = "time"
time_format = "%Y-%m-%d %H:%M:%S"
multiline = {{ start = '^\d{{4}}-\d{{2}}-\d{{2}} ', timeout = "200ms" }}"#,
        log.display()
    );
    // The last event has no next start line: the timeout sends it.
    let (mut agent, _) = ship(dir.path(), &relay, &certs, &input, 2);
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
    let checkpoints =
        std::fs::read_to_string(dir.path().join("agent-data/checkpoints.json")).unwrap();
    let size = std::fs::metadata(&log).unwrap().len();
    assert!(
        checkpoints.contains(&format!("\"offset\": {size}")),
        "{checkpoints}"
    );
}

#[test]
fn max_read_rate_paces_reading_and_loses_nothing() {
    const LINES: u64 = 4_000; // about 260 KB
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(dir.path(), "relay");
    let relay = FileRelay::start(dir.path(), &certs);
    let log = dir.path().join("app.log");
    write_numbered_lines(&log, 1, LINES);
    let size = std::fs::metadata(&log).unwrap().len();
    let (config, _) = agent_config(
        dir.path(),
        &relay,
        &certs,
        &format!(
            "include = [\"{}\"]\nmax_read_rate = \"100 KiB\"",
            log.display()
        ),
    );
    let started = std::time::Instant::now();
    let mut agent = Proc::start("sluice-agent", &config, &dir.path().join("agent.log"));
    wait_for("every line at the relay", Duration::from_secs(60), || {
        assert!(agent.is_running(), "agent exited:\n{}", agent.log_text());
        relay.delivered() >= LINES
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
