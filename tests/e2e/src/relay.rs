//! The relay of a test: [`RelaySpec`] is its config (the real [`RelayConfig`]) with test
//! defaults, [`Relay`] the running `sluice-relay` built from it, over as many lives
//! (kill -9, restart, reconfigure) as the test needs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
pub use sluice_relay::config::{
    AckMode, FsyncMode, KafkaSink, KafkaValue, MetricsSection, ObjectSink, RateLimit, RelayConfig,
    RelaySection, ServerSection, SinkCommon, SinkConfig, SinkKind, SpoolSection, StartFrom,
};

use crate::lives::Lives;
use crate::{loopback, wait_listening, with_defaults, ServerTlsFiles, Services, Span};

/// A relay config for a test, before it runs. Tests change `config` as they need
/// (`spec.config.spool.max_size = ByteSize::mib(4)`, `spec.config.sinks.push(..)`), then
/// [`start`](RelaySpec::start) it.
pub struct RelaySpec {
    /// Where the config, the logs and (by default) the data dir go.
    pub dir: PathBuf,
    /// File names: `<stem>.toml`, `<stem>.log` (then `<stem>-1.log`, ...), `<stem>-data/`.
    pub stem: String,
    pub config: RelayConfig,
    /// Extra environment for every life (test failpoints).
    pub env: Vec<(String, String)>,
}

impl RelaySpec {
    /// Forward over TLS with `tls` on a free loopback port, metrics on another, data in
    /// `dir/relay-data`; every other key the relay's own default. No sinks yet.
    pub fn new(dir: &Path, id: &str, tls: ServerTlsFiles) -> RelaySpec {
        let mut spec = RelaySpec::insecure(dir, id);
        spec.config.server.insecure = false;
        spec.config.server.tls = Some(tls);
        spec
    }

    /// As [`new`](RelaySpec::new), but plain TCP (`server.insecure = true`), for Forward
    /// clients that cannot do TLS.
    pub fn insecure(dir: &Path, id: &str) -> RelaySpec {
        let stem = "relay";
        RelaySpec {
            dir: dir.to_owned(),
            stem: stem.into(),
            config: RelayConfig {
                relay: with_defaults(json!({
                    "id": id,
                    "data_dir": dir.join(format!("{stem}-data")),
                })),
                server: with_defaults(json!({ "listen": loopback(), "insecure": true })),
                spool: SpoolSection::default(),
                metrics: MetricsSection {
                    listen: Some(loopback()),
                },
                sinks: Vec::new(),
            },
            env: Vec::new(),
        }
    }

    /// The relay of tests that need no Kafka or S3: TLS, acknowledgement after the spool, one
    /// `file` sink named "file" writing to `dir/relay-out.ndjson`.
    pub fn with_file_sink(dir: &Path, tls: ServerTlsFiles) -> RelaySpec {
        let mut spec = RelaySpec::new(dir, "relay-file", tls);
        spec.config.relay.shutdown_timeout = Span::secs(20);
        spec.config.server.ack = AckMode::Spool;
        spec.config.spool.segment_size = crate::ByteSize::mib(16);
        spec.config.spool.max_size = crate::ByteSize::gib(2);
        spec.config
            .sinks
            .push(file_sink("file", &dir.join("relay-out.ndjson")));
        spec
    }

    /// Other file names (`<stem>.toml`, `<stem>.log`, `<stem>-data/`), for several relays
    /// in one directory.
    pub fn stem(mut self, stem: &str) -> RelaySpec {
        self.stem = stem.into();
        self.config.relay.data_dir = self.dir.join(format!("{stem}-data"));
        self
    }

    /// Writes the config and starts the relay; returns once it accepts connections.
    pub fn start(self) -> Relay {
        let relay = self.spawn();
        relay.wait_listening();
        relay
    }

    /// Writes the config and starts the relay; returns at once.
    pub fn spawn(self) -> Relay {
        let metrics = self
            .config
            .metrics
            .listen
            .expect("the harness reads the relay's metrics: keep metrics.listen set");
        let config_path = self.dir.join(format!("{}.toml", self.stem));
        let mut lives = Lives::new("sluice-relay", self.dir, self.stem, config_path, metrics);
        lives.env = self.env;
        let mut relay = Relay {
            forward: self.config.server.listen,
            lives,
            config: self.config,
        };
        relay.write_config();
        relay.spawn_life();
        relay
    }
}

/// A sink with the common keys at their defaults.
pub fn sink(name: &str, kind: SinkKind) -> SinkConfig {
    SinkConfig {
        common: with_defaults(json!({ "name": name })),
        kind,
    }
}

/// A `file` sink: every event's JSON envelope, one a line, in `path`.
pub fn file_sink(name: &str, path: &Path) -> SinkConfig {
    // Through serde, like the kind's other defaults: the variant's Rust shape is the
    // relay's business (a struct variant, or a tuple of the sink's own config type).
    sink(name, with_defaults(json!({ "type": "file", "path": path })))
}

/// A `discard` sink: counts and forgets.
pub fn discard_sink(name: &str) -> SinkConfig {
    sink(name, with_defaults(json!({ "type": "discard" })))
}

impl Services {
    /// A Kafka sink named "kafka" to `topic` on the test broker; other keys default.
    pub fn kafka_sink(&self, topic: &str) -> SinkConfig {
        sink(
            "kafka",
            SinkKind::Kafka(with_defaults(
                json!({ "brokers": self.kafka, "topic": topic }),
            )),
        )
    }

    /// An object-store sink named "s3" to `bucket` on the test S3 server: prefix "logs",
    /// objects written after at most a second, so tests need not wait for the default.
    pub fn s3_sink(&self, bucket: &str) -> SinkConfig {
        sink(
            "s3",
            SinkKind::ObjectStore(with_defaults(json!({
                "url": format!("s3://{bucket}"),
                "prefix": "logs",
                "max_object_age": "1s",
                "options": {
                    "endpoint": self.s3_endpoint,
                    "allow_http": "true",
                    "region": "us-east-1",
                },
            }))),
        )
    }
}

/// Typed access to the keys of one sink type, for tweaks (`s3.object_store().prefix = ..`).
pub trait SinkKeys {
    /// The object-store keys; panics for another sink type.
    fn object_store(&mut self) -> &mut ObjectSink;
    /// The Kafka keys; panics for another sink type.
    fn kafka(&mut self) -> &mut KafkaSink;
}

impl SinkKeys for SinkConfig {
    fn object_store(&mut self) -> &mut ObjectSink {
        match &mut self.kind {
            SinkKind::ObjectStore(o) => o,
            other => panic!("sink {:?} is {other:?}, not object_store", self.common.name),
        }
    }

    fn kafka(&mut self) -> &mut KafkaSink {
        match &mut self.kind {
            SinkKind::Kafka(k) => k,
            other => panic!("sink {:?} is {other:?}, not kafka", self.common.name),
        }
    }
}

/// A `sluice-relay` child process and the config it runs with. Each start is a new life
/// with its own log file; the config file stays, so a restart after a kill finds the same
/// ports, spool and sinks. The process, its logs, its metrics and `wait` are [`Lives`]'.
pub struct Relay {
    pub config: RelayConfig,
    /// The Forward listener.
    pub forward: SocketAddr,
    lives: Lives,
}

impl std::ops::Deref for Relay {
    type Target = Lives;
    fn deref(&self) -> &Lives {
        &self.lives
    }
}

impl std::ops::DerefMut for Relay {
    fn deref_mut(&mut self) -> &mut Lives {
        &mut self.lives
    }
}

impl Relay {
    fn write_config(&self) {
        let text = toml::to_string(&self.config).expect("relay config serialises");
        // The relay's own parser and checks, so a bad tweak fails here with its message.
        if let Err(e) = RelayConfig::parse(&self.config_path, &text) {
            panic!("the test's relay config is invalid: {e}\n{text}");
        }
        std::fs::write(&self.config_path, text).expect("write relay config");
    }

    fn wait_listening(&self) {
        wait_listening(self.forward, self.process());
    }

    /// Starts the next life with the config as it is (after [`kill`](Relay::kill) or
    /// [`stop`](Relay::stop)); returns once it accepts connections.
    pub fn start(&mut self) {
        self.spawn_life();
        self.wait_listening();
    }

    /// Changes the config of a stopped relay and writes it; the next
    /// [`start`](Relay::start) runs with it.
    pub fn reconfigure(&mut self, change: impl FnOnce(&mut RelayConfig)) {
        assert!(!self.is_running(), "reconfigure a stopped relay");
        change(&mut self.config);
        self.write_config();
    }

    pub fn data_dir(&self) -> &Path {
        &self.config.relay.data_dir
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.config.spool_dir()
    }

    /// The output file of the `file` sink `name`.
    pub fn sink_file(&self, name: &str) -> PathBuf {
        let kind = self
            .config
            .sinks
            .iter()
            .find(|s| s.common.name == name)
            .map(|s| serde_json::to_value(&s.kind).expect("sink kind serialises"));
        match kind {
            Some(k) if k["type"] == "file" => PathBuf::from(k["path"].as_str().unwrap()),
            _ => panic!("the relay has no file sink {name:?}"),
        }
    }

    /// Whether sink `sink` is in the middle of a delivery: the last record of its state
    /// log (`<data_dir>/sink-state/<sink>/<n>.log`, newest generation) is the intent it
    /// saved before delivering, not the result after.
    pub fn sink_delivering(&self, sink: &str) -> bool {
        let state = self.data_dir().join("sink-state").join(sink);
        let newest = std::fs::read_dir(state)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let n: u64 = name.strip_suffix(".log")?.parse().ok()?;
                Some((n, e.path()))
            })
            .max();
        let Some((_, log)) = newest else {
            return false;
        };
        let Ok(bytes) = std::fs::read(log) else {
            return false;
        };
        let text = String::from_utf8_lossy(&bytes);
        text.rfind("\"resume\":")
            .is_some_and(|i| text[i..].starts_with("\"resume\":{\"in_flight\":true"))
    }

    /// Events sink `sink` delivered (`sluice_relay_sink_events_total`), this life.
    pub fn delivered(&self, sink: &str) -> u64 {
        self.counter("sluice_relay_sink_events_total", &sink_label(sink)) as u64
    }

    /// Events received from clients (`sluice_relay_events_received_total`), this life.
    pub fn received(&self) -> u64 {
        self.counter("sluice_relay_events_received_total", "") as u64
    }

    /// Connections refused for `reason` (`sluice_relay_connections_rejected_total`).
    pub fn rejected(&self, reason: &str) -> f64 {
        self.counter(
            "sluice_relay_connections_rejected_total",
            &format!("reason=\"{reason}\""),
        )
    }

    /// Bytes in the spool that sink `sink` has not delivered; `None` for no such sink.
    pub fn lag(&self, sink: &str) -> Option<f64> {
        self.metric("sluice_relay_sink_lag_bytes", &sink_label(sink))
    }

    /// Every one of `sinks` has delivered everything the spool holds.
    pub fn caught_up(&self, sinks: &[&str]) -> bool {
        sinks.iter().all(|s| self.lag(s) == Some(0.0))
    }

    /// Waits until sink `sink` delivered at least `n` events.
    pub fn wait_delivered(&self, sink: &str, n: u64, timeout: Duration) {
        self.wait(
            &format!("sink {sink} to deliver {n} events"),
            timeout,
            || self.delivered(sink) >= n,
        );
    }

    /// Waits until the relay received at least `n` events.
    pub fn wait_received(&self, n: u64, timeout: Duration) {
        self.wait(&format!("the relay to receive {n} events"), timeout, || {
            self.received() >= n
        });
    }
}

fn sink_label(sink: &str) -> String {
    format!("sink=\"{sink}\"")
}
