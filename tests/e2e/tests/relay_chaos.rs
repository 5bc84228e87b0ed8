//! The relay under failure, against real tansu and moto: kill -9 in a loop, a sink's
//! service gone for a while, and the spool at its size limit. Every test ends by reading
//! Kafka and the bucket with independent clients and counting distinct lines.
//!
//! Sizes are the issue's where CI time allows; the long variants take an environment
//! variable (SLUICE_CHAOS_EVENTS, SLUICE_OUTAGE_SECS) and are run by hand, see docs/relay.md.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sluice_e2e::*;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Setup {
    dir: tempfile::TempDir,
    certs: Certs,
    forward: SocketAddr,
    metrics: SocketAddr,
    agent_metrics: SocketAddr,
    config: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let certs = Certs::generate(dir.path(), "relay");
        Setup {
            forward: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            metrics: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            agent_metrics: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            config: dir.path().join("relay.toml"),
            certs,
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes the relay config: Kafka and/or S3 sinks, the given spool settings.
    fn write_relay_config(
        &self,
        svc: &Services,
        topic: Option<&str>,
        bucket: Option<&str>,
        spool: &str,
    ) {
        let mut sinks = String::new();
        if let Some(topic) = topic {
            sinks += &format!(
                "[[sink]]\nname = \"kafka\"\ntype = \"kafka\"\nbrokers = \"{}\"\ntopic = \"{topic}\"\nretry_max = \"2s\"\n\n",
                svc.kafka
            );
        }
        if let Some(bucket) = bucket {
            sinks += &format!(
                "[[sink]]\nname = \"s3\"\ntype = \"object_store\"\nurl = \"s3://{bucket}\"\nprefix = \"logs\"\nmax_object_age = \"1s\"\noptions = {{ endpoint = \"{}\", allow_http = \"true\", region = \"us-east-1\" }}\n\n",
                svc.s3_endpoint
            );
        }
        let text = format!(
            r#"
[relay]
id = "relay-chaos"
data_dir = "{data}"
shutdown_timeout = "10s"

[server]
listen = "{forward}"
tls = {{ cert = "{cert}", key = "{key}" }}

[spool]
{spool}

[metrics]
listen = "{metrics}"

{sinks}"#,
            data = self.path("relay-data").display(),
            forward = self.forward,
            cert = self.certs.cert.display(),
            key = self.certs.key.display(),
            metrics = self.metrics,
        );
        std::fs::write(&self.config, text).unwrap();
    }

    fn start_relay(&self, n: usize) -> Proc {
        let mut relay = Proc::start(
            "sluice-relay",
            &self.config,
            &self.path(&format!("relay-{n}.log")),
        );
        wait_listening(self.forward, &mut relay);
        relay
    }

    fn start_agent(&self, log: &Path) -> Proc {
        let text = format!(
            r#"
[agent]
id = "agent-chaos"
data_dir = "{data}"

[[input]]
type = "tail"
name = "app"
tag = "app.log"
include = ["{log}"]

[output]
relays = ["{relay}"]
tls = {{ ca = "{ca}", server_name = "localhost" }}
chunk_size = "256 KiB"
chunk_age = "200ms"
in_flight = 8
retry_max = "500ms"

[metrics]
listen = "{metrics}"
"#,
            data = self.path("agent-data").display(),
            log = log.display(),
            relay = self.forward,
            ca = self.certs.ca.display(),
            metrics = self.agent_metrics,
        );
        let config = self.path("agent.toml");
        std::fs::write(&config, text).unwrap();
        Proc::start("sluice-agent", &config, &self.path("agent.log"))
    }

    fn relay_metric(&self, name: &str, labels: &str) -> f64 {
        metric(self.metrics, name, labels).unwrap_or(0.0)
    }

    fn acked(&self) -> f64 {
        metric(self.agent_metrics, "sluice_agent_events_acked_total", "").unwrap_or(0.0)
    }

    /// Every sink of the running relay has delivered everything the spool holds.
    fn sinks_caught_up(&self, sinks: &[&str]) -> bool {
        sinks.iter().all(|s| {
            metric(
                self.metrics,
                "sluice_relay_sink_lag_bytes",
                &format!("sink=\"{s}\""),
            ) == Some(0.0)
        })
    }
}

/// Asserts that a summary by an independent reader holds every line exactly once or
/// more, and returns the number of duplicates.
fn check_summary(name: &str, summary: &serde_json::Value, lines: u64) -> u64 {
    eprintln!("{name}: {summary}");
    assert_eq!(
        summary["distinct_messages"],
        lines,
        "{name}: distinct lines (missing = {})",
        lines as i64 - summary["distinct_messages"].as_i64().unwrap_or(0)
    );
    assert_eq!(
        summary["bad"].as_u64().unwrap_or(0),
        0,
        "{name}: unreadable envelopes"
    );
    summary["messages"].as_u64().unwrap() - lines
}

#[test]
fn relay_killed_twenty_times_loses_nothing() {
    let lines = env_u64("SLUICE_CHAOS_EVENTS", 200_000);
    const KILLS: usize = 20;
    let svc = Services::from_env();
    let setup = Setup::new();
    let topic = unique_name("chaos-kill");
    let bucket = unique_name("chaos-kill");
    svc.create_topic(&topic, 3);
    svc.create_bucket(&bucket);
    setup.write_relay_config(
        &svc,
        Some(&topic),
        Some(&bucket),
        "segment_size = \"1 MiB\"\nfsync = \"always\"",
    );

    let log = setup.path("app.log");
    let mut relay = setup.start_relay(0);
    let mut agent = setup.start_agent(&log);
    // The writer runs alongside the kills: the agent reads while the relay dies.
    let writer = {
        let log = log.clone();
        std::thread::spawn(move || {
            let batch = lines / 100;
            for i in 0..100 {
                write_numbered_lines(&log, 1 + i * batch, batch);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let per_life = (lines / (KILLS as u64 + 5)).max(1_000) as f64;
    let started = Instant::now();
    for kill in 1..=KILLS {
        // Let each life take some chunks and deliver some, then kill it mid-flight.
        wait_for(
            &format!("relay life {kill} to receive {per_life} events"),
            Duration::from_secs(120),
            || {
                assert!(
                    agent.is_running(),
                    "agent exited; log:\n{}",
                    agent.log_text()
                );
                assert!(
                    relay.is_running(),
                    "relay exited; log:\n{}",
                    relay.log_text()
                );
                setup.relay_metric("sluice_relay_events_received_total", "") >= per_life
                    || (setup.acked() >= lines as f64)
            },
        );
        relay.kill();
        relay = setup.start_relay(kill);
    }
    writer.join().unwrap();
    eprintln!("{KILLS} kills in {:?}", started.elapsed());

    wait_for(
        "the agent to have every line acknowledged",
        Duration::from_secs(300),
        || {
            assert!(
                relay.is_running(),
                "relay exited; log:\n{}",
                relay.log_text()
            );
            setup.acked() >= lines as f64
        },
    );
    wait_for("both sinks to catch up", Duration::from_secs(300), || {
        setup.sinks_caught_up(&["kafka", "s3"])
    });
    let resent = metric(setup.agent_metrics, "sluice_agent_chunks_resent_total", "").unwrap_or(0.0);
    agent.stop(Duration::from_secs(30));
    relay.stop(Duration::from_secs(60));

    let dup_kafka = check_summary("kafka", &svc.kafka_summary(&topic, lines), lines);
    let dup_s3 = check_summary("s3", &svc.s3_summary(&bucket), lines);
    eprintln!(
        "kill -9 x{KILLS}, {lines} lines: chunks resent by the agent {resent}, duplicates downstream: kafka {dup_kafka}, s3 {dup_s3}"
    );
    // What each life's Kafka sink found already delivered by the life before it.
    for n in 0..=KILLS {
        let text =
            std::fs::read_to_string(setup.path(&format!("relay-{n}.log"))).unwrap_or_default();
        for line in text
            .lines()
            .filter(|l| l.contains("read back") || l.contains("not sent again"))
        {
            eprintln!(
                "life {n}: {}",
                line.split("sluice_relay").nth(1).unwrap_or(line)
            );
        }
    }
    for n in 0..=KILLS {
        let text =
            std::fs::read_to_string(setup.path(&format!("relay-{n}.log"))).unwrap_or_default();
        assert!(
            !text.contains("panicked"),
            "relay life {n} panicked:\n{text}"
        );
    }
    // The relay's dedup (resent chunks) and the Kafka sink's read-back after a crash
    // (its own lost deliveries) together make every line arrive exactly once.
    assert_eq!(
        (dup_kafka, dup_s3),
        (0, 0),
        "duplicates downstream (kafka, s3)"
    );
}

/// One sink's service goes away (SIGSTOP) for `SLUICE_OUTAGE_SECS` while lines keep
/// coming: the other sink keeps receiving, the spool holds the backlog, and after the
/// service returns both have every line.
fn outage(which: &str) {
    let outage = Duration::from_secs(env_u64("SLUICE_OUTAGE_SECS", 15));
    const LINES: u64 = 60_000;
    let shared = Services::from_env();
    let setup = Setup::new();
    let private = match which {
        "kafka" => PrivateService::tansu(&shared, &setup.path("tansu.log")),
        _ => PrivateService::moto(&shared, &setup.path("moto.log")),
    };
    let svc = match which {
        "kafka" => shared.with(Some(&private.addr), None),
        _ => shared.with(None, Some(&private.addr)),
    };
    let topic = unique_name("outage");
    let bucket = unique_name("outage");
    svc.create_topic(&topic, 2);
    svc.create_bucket(&bucket);
    setup.write_relay_config(
        &svc,
        Some(&topic),
        Some(&bucket),
        "segment_size = \"1 MiB\"",
    );
    let (down, up) = if which == "kafka" {
        ("kafka", "s3")
    } else {
        ("s3", "kafka")
    };

    let log = setup.path("app.log");
    write_numbered_lines(&log, 1, LINES / 3);
    let mut relay = setup.start_relay(0);
    let mut agent = setup.start_agent(&log);
    wait_for(
        "the first third in both sinks",
        Duration::from_secs(120),
        || {
            setup.relay_metric(
                "sluice_relay_sink_events_total",
                &format!("sink=\"{down}\""),
            ) >= (LINES / 3) as f64
                && setup.relay_metric("sluice_relay_sink_events_total", &format!("sink=\"{up}\""))
                    >= (LINES / 3) as f64
        },
    );

    private.pause();
    let paused_at = Instant::now();
    write_numbered_lines(&log, LINES / 3 + 1, LINES - LINES / 3);
    wait_for(
        &format!("{up} to take every line while {down} is down"),
        outage,
        || {
            setup.relay_metric("sluice_relay_sink_events_total", &format!("sink=\"{up}\""))
                >= LINES as f64
        },
    );
    wait_for(
        "the agent to have every line acknowledged by the spool",
        outage,
        || setup.acked() >= LINES as f64,
    );
    let lag = setup.relay_metric("sluice_relay_sink_lag_bytes", &format!("sink=\"{down}\""));
    assert!(lag > 0.0, "{down} is down, yet its lag is 0");
    let delivered_down = setup.relay_metric(
        "sluice_relay_sink_events_total",
        &format!("sink=\"{down}\""),
    );
    assert!(
        delivered_down < LINES as f64,
        "{down} delivered everything while paused?"
    );
    eprintln!("{down} down: {up} has all {LINES} lines after {:?}; {down} lag {lag} bytes, {delivered_down} delivered", paused_at.elapsed());
    // Hold the outage for its whole length.
    while paused_at.elapsed() < outage {
        assert!(relay.is_running() && agent.is_running());
        std::thread::sleep(Duration::from_millis(200));
    }
    private.resume();
    let resumed_at = Instant::now();
    wait_for(
        &format!("{down} to drain its backlog"),
        Duration::from_secs(300),
        || {
            setup.relay_metric(
                "sluice_relay_sink_events_total",
                &format!("sink=\"{down}\""),
            ) >= LINES as f64
                && setup.sinks_caught_up(&["kafka", "s3"])
        },
    );
    eprintln!(
        "{down} drained in {:?} after it came back",
        resumed_at.elapsed()
    );
    agent.stop(Duration::from_secs(30));
    relay.stop(Duration::from_secs(60));
    assert_eq!(
        setup.relay_metric("sluice_relay_sink_dropped_total", ""),
        0.0,
        "nothing may be dropped"
    );
    check_summary("kafka", &svc.kafka_summary(&topic, LINES), LINES);
    check_summary("s3", &svc.s3_summary(&bucket), LINES);
}

#[test]
fn kafka_outage_bucket_keeps_receiving_then_kafka_catches_up() {
    outage("kafka");
}

#[test]
fn s3_outage_kafka_keeps_receiving_then_bucket_catches_up() {
    outage("s3");
}

/// The start of the tests where Kafka is down while data comes in: a private tansu,
/// frozen, a topic on it, a relay whose only sink is that topic, and an agent tailing
/// `lines` lines already written.
struct FrozenKafka {
    private: PrivateService,
    svc: Services,
    topic: String,
    relay: Proc,
    agent: Proc,
    lines: u64,
}

impl FrozenKafka {
    fn start(setup: &Setup, name: &str, spool: &str, lines: u64) -> FrozenKafka {
        let shared = Services::from_env();
        let private = PrivateService::tansu(&shared, &setup.path("tansu.log"));
        let svc = shared.with(Some(&private.addr), None);
        let topic = unique_name(name);
        svc.create_topic(&topic, 2);
        setup.write_relay_config(&svc, Some(&topic), None, spool);
        private.pause();
        let log = setup.path("app.log");
        write_numbered_lines(&log, 1, lines);
        let relay = setup.start_relay(0);
        let agent = setup.start_agent(&log);
        FrozenKafka {
            private,
            svc,
            topic,
            relay,
            agent,
            lines,
        }
    }

    /// Waits for `cond` while the relay runs.
    fn wait(&mut self, what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
        let relay = &mut self.relay;
        wait_for(what, timeout, || {
            assert!(
                relay.is_running(),
                "relay exited; log:\n{}",
                relay.log_text()
            );
            cond()
        });
    }

    /// Thaws Kafka and waits until every line is acknowledged and delivered.
    fn thaw(&mut self, setup: &Setup) {
        self.private.resume();
        let lines = self.lines as f64;
        self.wait(
            "everything to arrive once Kafka drains the spool",
            Duration::from_secs(300),
            || setup.acked() >= lines && setup.sinks_caught_up(&["kafka"]),
        );
    }

    /// Stops both and checks the topic with the independent reader; returns duplicates.
    fn finish(mut self) -> u64 {
        self.agent.stop(Duration::from_secs(30));
        self.relay.stop(Duration::from_secs(60));
        check_summary(
            "kafka",
            &self.svc.kafka_summary(&self.topic, self.lines),
            self.lines,
        )
    }
}

/// The spool fills up while the only sink is down: the relay stops acknowledging, the
/// agent keeps the rest in its file, the relay's memory stays bounded, and everything
/// arrives once the sink is back.
#[test]
fn full_spool_pauses_the_agent_and_bounds_memory() {
    const LINES: u64 = 200_000;
    const RSS_BOUND_MIB: u64 = 200;
    let setup = Setup::new();
    let mut k = FrozenKafka::start(
        &setup,
        "spool-full",
        "segment_size = \"1 MiB\"\nmax_size = \"4 MiB\"",
        LINES,
    );
    k.wait(
        "the spool to reach its limit",
        Duration::from_secs(120),
        || setup.relay_metric("sluice_relay_spool_full", "") == 1.0,
    );
    // While full, acknowledgements stop: the agent's acked count stands still.
    let acked = setup.acked();
    let mut peak_kib = 0;
    let hold = Instant::now();
    while hold.elapsed() < Duration::from_secs(5) {
        peak_kib = peak_kib.max(rss_kib(k.relay.pid()));
        std::thread::sleep(Duration::from_millis(100));
    }
    let acked_after = setup.acked();
    assert!(
        acked < LINES as f64,
        "the agent got everything acknowledged with a full spool"
    );
    assert!(
        acked_after - acked <= 0.0,
        "acknowledgements went on while the spool was full: {acked} -> {acked_after}"
    );
    assert_eq!(setup.relay_metric("sluice_relay_spool_full", ""), 1.0);
    let spool_bytes = setup.relay_metric("sluice_relay_spool_bytes", "");
    assert!(
        spool_bytes <= 4.0 * 1024.0 * 1024.0 + 1_048_576.0,
        "spool over its limit: {spool_bytes}"
    );
    eprintln!("full spool: {spool_bytes} bytes, relay RSS peak {peak_kib} KiB, agent acked {acked} of {LINES}");
    assert!(
        peak_kib < RSS_BOUND_MIB * 1024,
        "relay RSS {peak_kib} KiB over {RSS_BOUND_MIB} MiB"
    );
    assert!(k.agent.is_running());

    k.thaw(&setup);
    k.wait(
        "the spool to report it is no longer full",
        Duration::from_secs(10),
        || setup.relay_metric("sluice_relay_spool_full", "") == 0.0,
    );
    k.finish();
}

/// A small tmpfs for the relay's data_dir, unmounted on drop. Needs root (CI runs as
/// root); elsewhere the test says so and does not run.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    fn mount(path: PathBuf, size: &str) -> Option<SmallDisk> {
        std::fs::create_dir_all(&path).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then_some(SmallDisk { path })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// The disk under the spool fills up before the spool's own limit: appends fail with
/// ENOSPC, are cut off again, counted and logged with the file; nothing is acknowledged
/// that is not on disk; once the sink drains and segments are collected, the relay takes
/// data again and every line arrives exactly once.
#[test]
fn full_disk_under_the_spool_loses_nothing() {
    const LINES: u64 = 200_000;
    let setup = Setup::new();
    let Some(_disk) = SmallDisk::mount(setup.path("relay-data"), "4m") else {
        eprintln!("SKIPPED full_disk_under_the_spool_loses_nothing: mounting a tmpfs needs root");
        return;
    };
    let mut k = FrozenKafka::start(
        &setup,
        "disk-full",
        "segment_size = \"512 KiB\"\nmax_size = \"1 GiB\"",
        LINES,
    );
    k.wait(
        "the disk to fill and appends to fail",
        Duration::from_secs(120),
        || setup.relay_metric("sluice_relay_spool_errors_total", "") >= 1.0,
    );
    let text = k.relay.log_text();
    assert!(
        text.contains("No space left on device"),
        "the log does not name the cause:\n{text}"
    );
    assert!(
        text.contains(".seg"),
        "the log does not name the segment file:\n{text}"
    );
    let acked = setup.acked();
    assert!(
        acked < LINES as f64,
        "everything acknowledged on a full disk?"
    );
    eprintln!("disk full after {acked} acknowledged lines");

    k.thaw(&setup);
    let dups = k.finish();
    assert_eq!(dups, 0, "duplicates in Kafka");
}
