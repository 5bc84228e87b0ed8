//! A phased migration from object storage to Kafka, one config change at a time, each
//! applied by restarting the relay (SIGTERM, new config, start) while the agent keeps
//! tailing: add Kafka from "now", pause S3, resume S3 (it catches up from the spool),
//! remove Kafka. The independent readers then show exactly which lines each side holds.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sluice_e2e::*;

const N: u64 = 5_000;

struct Relay {
    dir: PathBuf,
    certs: Certs,
    forward: SocketAddr,
    metrics: SocketAddr,
    config: PathBuf,
    proc_: Option<Proc>,
    lives: usize,
}

impl Relay {
    fn start(&mut self, sinks: &str) {
        let text = format!(
            r#"
[relay]
id = "relay-migration"
data_dir = "{data}"

[server]
listen = "{forward}"
tls = {{ cert = "{cert}", key = "{key}" }}

[spool]
segment_size = "256 KiB"

[metrics]
listen = "{metrics}"

{sinks}"#,
            data = self.dir.join("relay-data").display(),
            forward = self.forward,
            cert = self.certs.cert.display(),
            key = self.certs.key.display(),
            metrics = self.metrics,
        );
        std::fs::write(&self.config, text).unwrap();
        self.lives += 1;
        let mut p = Proc::start(
            "sluice-relay",
            &self.config,
            &self.dir.join(format!("relay-{}.log", self.lives)),
        );
        wait_listening(self.forward, &mut p);
        self.proc_ = Some(p);
    }

    fn stop(&mut self) {
        if let Some(mut p) = self.proc_.take() {
            p.stop(Duration::from_secs(30));
        }
    }

    fn delivered(&self, sink: &str) -> f64 {
        metric(
            self.metrics,
            "sluice_relay_sink_events_total",
            &format!("sink=\"{sink}\""),
        )
        .unwrap_or(0.0)
    }

    fn lag(&self, sink: &str) -> Option<f64> {
        metric(
            self.metrics,
            "sluice_relay_sink_lag_bytes",
            &format!("sink=\"{sink}\""),
        )
    }

    fn wait_delivered(&mut self, sink: &str, at_least: u64) {
        let proc_ = self.proc_.as_mut().unwrap();
        let metrics = self.metrics;
        wait_for(
            &format!("{sink} to deliver {at_least} events"),
            Duration::from_secs(120),
            || {
                assert!(
                    proc_.is_running(),
                    "relay exited; log:\n{}",
                    proc_.log_text()
                );
                metric(
                    metrics,
                    "sluice_relay_sink_events_total",
                    &format!("sink=\"{sink}\""),
                )
                .unwrap_or(0.0)
                    >= at_least as f64
            },
        );
    }
}

fn s3_sink(svc: &Services, bucket: &str, enabled: bool) -> String {
    format!(
        "[[sink]]\nname = \"s3\"\ntype = \"object_store\"\nenabled = {enabled}\nurl = \"s3://{bucket}\"\nmax_object_age = \"500ms\"\noptions = {{ endpoint = \"{}\", allow_http = \"true\", region = \"us-east-1\" }}\n\n",
        svc.s3_endpoint
    )
}

fn kafka_sink(svc: &Services, topic: &str) -> String {
    format!(
        "[[sink]]\nname = \"kafka\"\ntype = \"kafka\"\nbrokers = \"{}\"\ntopic = \"{topic}\"\nstart_from = \"now\"\n\n",
        svc.kafka
    )
}

fn agent(dir: &Path, relay: SocketAddr, ca: &Path, log: &Path) -> Proc {
    let text = format!(
        r#"
[agent]
id = "agent-migration"
data_dir = "{data}"

[[input]]
type = "tail"
name = "app"
tag = "app.log"
include = ["{log}"]

[output]
relays = ["{relay}"]
tls = {{ ca = "{ca}", server_name = "localhost" }}
chunk_age = "100ms"
retry_max = "300ms"

[metrics]
listen = "127.0.0.1:{mport}"
"#,
        data = dir.join("agent-data").display(),
        log = log.display(),
        ca = ca.display(),
        mport = free_port(),
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, text).unwrap();
    Proc::start("sluice-agent", &path, &dir.join("agent.log"))
}

#[test]
fn migrate_from_object_storage_to_kafka_in_phases() {
    let svc = Services::from_env();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let topic = unique_name("migration");
    let bucket = unique_name("migration");
    svc.create_topic(&topic, 2);
    svc.create_bucket(&bucket);
    let mut relay = Relay {
        certs: Certs::generate(&dir, "relay"),
        forward: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        metrics: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        config: dir.join("relay.toml"),
        dir: dir.clone(),
        proc_: None,
        lives: 0,
    };
    let log = dir.join("app.log");

    // Phase 1: object storage only.
    relay.start(&s3_sink(&svc, &bucket, true));
    let mut agent = agent(&dir, relay.forward, &relay.certs.ca, &log);
    write_numbered_lines(&log, 1, N);
    relay.wait_delivered("s3", N);

    // Phase 2: Kafka added, starting from "now": it gets new lines only.
    relay.stop();
    relay.start(&(s3_sink(&svc, &bucket, true) + &kafka_sink(&svc, &topic)));
    write_numbered_lines(&log, N + 1, N);
    relay.wait_delivered("kafka", N);
    relay.wait_delivered("s3", N);

    // Phase 3: S3 disabled: Kafka alone; the spool keeps S3's share, its lag shows it.
    relay.stop();
    relay.start(&(s3_sink(&svc, &bucket, false) + &kafka_sink(&svc, &topic)));
    write_numbered_lines(&log, 2 * N + 1, N);
    relay.wait_delivered("kafka", N);
    wait_for(
        "the disabled sink's lag to show the held lines",
        Duration::from_secs(10),
        || relay.lag("s3").unwrap_or(0.0) > 0.0,
    );
    assert_eq!(relay.delivered("s3"), 0.0, "a disabled sink delivered");

    // Phase 4: S3 enabled again (it catches up from its cursor), Kafka removed.
    relay.stop();
    relay.start(&s3_sink(&svc, &bucket, true));
    write_numbered_lines(&log, 3 * N + 1, N);
    relay.wait_delivered("s3", 2 * N);
    assert!(relay.lag("kafka").is_none(), "a removed sink still reports");
    agent.stop(Duration::from_secs(30));
    relay.stop();

    let kafka = svc.kafka_summary(&topic, 2 * N);
    let s3 = svc.s3_summary(&bucket);
    eprintln!("kafka: {kafka}\ns3: {s3}");
    assert_eq!(s3["distinct_messages"], 4 * N, "the bucket has every line");
    assert_eq!(s3["messages"], 4 * N, "and each once");
    assert_eq!(
        kafka["distinct_messages"],
        2 * N,
        "Kafka has phases 2 and 3"
    );
    assert_eq!(kafka["messages"], 2 * N);
    assert_eq!(
        kafka["number_min"],
        N + 1,
        "Kafka started from now, not from the oldest data"
    );
    assert_eq!(
        kafka["number_max"],
        3 * N,
        "Kafka got nothing after it was removed"
    );
    assert!(
        dir.join("relay-data/sinks/kafka.json.removed").exists(),
        "removed sink's state set aside"
    );
}
