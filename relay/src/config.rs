//! The relay's configuration file (TOML). Every key, its default and its meaning are
//! declared once, here and (for sinks) in `sinks/*/`: `--check-config` and the tables in
//! docs/relay.md are generated from these structs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sluice_core::tls::ServerTlsFiles;
use sluice_core::units::{ByteSize, Span};

pub use crate::sinks::discard::DiscardSink;
pub use crate::sinks::file::FileSink;
pub use crate::sinks::kafka::{KafkaSink, KafkaValue};
pub use crate::sinks::object::ObjectSink;
pub use crate::sinks::{SinkCommon, SinkConfig, SinkKind, StartFrom};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    pub relay: RelaySection,
    pub server: ServerSection,
    #[serde(default)]
    pub spool: SpoolSection,
    #[serde(default)]
    pub metrics: MetricsSection,
    #[serde(default, rename = "sink")]
    pub sinks: Vec<SinkConfig>,
}

#[derive(Clone, Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RelaySection {
    /// Name of this relay node; part of every object key, so two relays never overwrite
    /// each other's objects. Letters, digits, '-' and '_'.
    pub id: String,
    /// Where the spool, sink cursors and the ledger live.
    pub data_dir: PathBuf,
    /// How long a graceful shutdown may take to flush the sinks.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout: Span,
    /// The ledger (received, offered, delivered, dropped per tag and hour) forgets hours
    /// that ended longer ago than this, and `reconcile` no longer reports them. Bounds
    /// the ledger, whose tags and hours come from the clients.
    #[serde(default = "default_ledger_retention")]
    pub ledger_retention: Span,
}

fn default_ledger_retention() -> Span {
    Span::secs(31 * 86_400)
}

fn default_shutdown_timeout() -> Span {
    Span::secs(30)
}

/// When the relay acknowledges a chunk to its sender.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum AckMode {
    /// After the chunk is durable in the spool (fsync, per the spool's policy).
    #[default]
    Spool,
    /// After every required sink has delivered the chunk.
    EndToEnd,
}

#[derive(Clone, Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Address for the Forward protocol listener, e.g. "0.0.0.0:24224".
    pub listen: SocketAddr,
    /// TLS files. Required unless `insecure = true`.
    #[serde(default)]
    pub tls: Option<ServerTlsFiles>,
    /// Accept plain TCP. Only for tests and for Fluentd clients that cannot do TLS.
    #[serde(default)]
    pub insecure: bool,
    /// Shared key for the HELO/PING/PONG handshake; when set, clients must authenticate.
    #[serde(default)]
    #[schemars(extend("x-secret" = true))]
    pub shared_key: Option<String>,
    /// Per-client shared keys, by the hostname a client sends in PING. A client named
    /// here must use its own key; others use `shared_key` (or are refused without one).
    #[serde(default)]
    #[schemars(extend("x-secret" = true))]
    pub client_keys: std::collections::BTreeMap<String, String>,
    /// Optional user authentication inside the handshake: username -> password. Clients
    /// then send a username and a salted password digest in PING as well.
    #[serde(default)]
    #[schemars(extend("x-secret" = true))]
    pub users: std::collections::BTreeMap<String, String>,
    /// Per-client (by IP address) ingest limit, enforced by not reading the socket.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// Host name the relay announces in PONG.
    #[serde(default = "default_hostname")]
    #[schemars(extend("default" = "$HOSTNAME, else sluice-relay"))]
    pub hostname: String,
    #[serde(default)]
    pub ack: AckMode,
    /// Largest frame accepted on the wire; a larger frame closes that connection.
    #[serde(default = "default_max_frame")]
    pub max_frame: ByteSize,
    /// Largest decompressed chunk.
    #[serde(default = "default_max_decompressed")]
    pub max_decompressed: ByteSize,
    /// Connections beyond this are closed at once and counted
    /// (`connections_rejected{reason="max_connections"}`).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections from one IP address beyond this are closed at once and counted
    /// (`connections_rejected{reason="max_connections_per_ip"}`), so one client cannot
    /// take every slot. Clients behind one NAT address share it.
    #[serde(default = "default_max_connections_per_ip")]
    pub max_connections_per_ip: usize,
    /// A connection that sends nothing for this long is closed.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: Span,
    /// A frame must arrive whole within this once its first byte came, or the connection
    /// is closed and counted (`connections_rejected{reason="frame_timeout"}`): bytes
    /// trickled to keep a connection alive do not count as progress.
    #[serde(default = "default_frame_timeout")]
    pub frame_timeout: Span,
    /// TLS handshake and HELO/PING/PONG together must finish within this, counted from
    /// the accept: one budget, not one per step.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: Span,
    /// After 3 refused frames in a row from one address (over `max_frame` or
    /// `max_decompressed`, or not Forward at all: a gzip bomb sent in a loop), its new
    /// connections are closed right after the accept for this long, doubling with each
    /// further refusal up to 60 s, counted as
    /// `connections_rejected{reason="refusal_backoff"}`. Its open connections go on; a
    /// connection from it that ends without a refusal clears it. "0s" turns it off.
    #[serde(default = "default_refusal_backoff")]
    pub refusal_backoff: Span,
    /// Memory for ingest, all connections together: frames being read (beyond each
    /// connection's first 64 KiB) and decoded chunks until the spool has them. A
    /// connection that needs more waits (TCP pushes back on its client). Must hold at
    /// least one `max_frame` plus one `max_decompressed`. The relay's worst-case ingest
    /// memory is this + max_connections × 128 KiB + (decode_threads + 1) ×
    /// max_decompressed (docs/relay.md, "Memory").
    #[serde(default = "default_max_inflight_bytes")]
    pub max_inflight_bytes: ByteSize,
    /// Threads that inflate and decode frames, off the threads that serve connections,
    /// so a client's gzip bomb delays only its own frames.
    #[serde(default)]
    #[schemars(extend("default" = "the number of CPUs"))]
    pub decode_threads: Option<usize>,
    /// With authentication on: refuse a chunk whose source id does not begin with the
    /// name the client authenticated as (its PING hostname, or the DNS name or common
    /// name of its certificate) followed by ':', counted as
    /// `connections_rejected{reason="source_identity"}`. A sluice agent's source ids
    /// begin with its `agent.id`, which is its PING hostname. Set false for a relay fed by
    /// another forwarder that sends other hosts' source ids; dedup then still keeps each
    /// client's sources apart.
    #[serde(default)]
    #[schemars(extend("default" = "true when clients authenticate (shared key or client certificates)"))]
    pub bind_sources: Option<bool>,
    /// Distinct tags one client may send. A chunk with a tag beyond it is refused (not
    /// acknowledged, the connection closed, `chunks_refused{reason="max_tags_per_client"}`,
    /// a warning naming the client and the tag); its other tags go on. A tag is forgotten
    /// once the client sent none of it for `relay.ledger_retention`. Tags and hours are
    /// chosen by clients, and the ledger counts every one.
    #[serde(default = "default_max_tags_per_client")]
    pub max_tags_per_client: usize,
}

/// Bytes a client (one IP address, all its connections together) may send per second.
/// Beyond it the relay stops reading that client's sockets for a while: TCP pushes back,
/// nothing is dropped, and other clients are not affected.
#[derive(Clone, Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained rate, per client IP address, all its connections together.
    pub bytes_per_sec: ByteSize,
    /// How much may arrive at once before the rate applies; defaults to one second's worth.
    #[serde(default)]
    pub burst: Option<ByteSize>,
}

impl ServerSection {
    /// Whether clients must pass the HELO/PING/PONG handshake.
    pub fn requires_auth(&self) -> bool {
        self.shared_key.is_some() || !self.client_keys.is_empty()
    }

    /// Whether every client must present a certificate (its name then identifies it).
    pub fn requires_client_cert(&self) -> bool {
        self.tls
            .as_ref()
            .is_some_and(|t| t.client_auth == sluice_core::tls::ClientAuth::Required)
    }

    /// `bind_sources` with its default applied.
    pub fn binds_sources(&self) -> bool {
        self.bind_sources
            .unwrap_or(self.requires_auth() || self.requires_client_cert())
    }

    /// `decode_threads` with its default applied.
    pub fn decode_threads(&self) -> usize {
        self.decode_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
            .max(1)
    }
}

fn default_hostname() -> String {
    std::env::var("HOSTNAME").unwrap_or_else(|_| "sluice-relay".into())
}
fn default_max_frame() -> ByteSize {
    ByteSize::mib(16)
}
fn default_max_decompressed() -> ByteSize {
    ByteSize::mib(64)
}
fn default_max_inflight_bytes() -> ByteSize {
    ByteSize::mib(256)
}
fn default_max_connections() -> usize {
    4096
}
fn default_max_connections_per_ip() -> usize {
    256
}
fn default_frame_timeout() -> Span {
    Span::secs(30)
}
fn default_idle_timeout() -> Span {
    Span::secs(300)
}
fn default_max_tags_per_client() -> usize {
    1000
}
fn default_refusal_backoff() -> Span {
    Span::secs(1)
}
fn default_handshake_timeout() -> Span {
    Span::secs(10)
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum FsyncMode {
    /// fsync every group commit before acknowledging (default; nothing acknowledged is lost).
    #[default]
    Always,
    /// fsync at most every `fsync_interval`; a power loss can lose the last interval.
    Interval,
    /// Leave it to the OS; a power loss can lose anything not yet written back.
    Never,
}

#[derive(Clone, Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SpoolSection {
    /// Where the spool segments live. Default: `<data_dir>/spool`.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// The spool is written in segments of about this size; a segment is deleted whole
    /// once every sink is past it.
    #[serde(default = "default_segment")]
    pub segment_size: ByteSize,
    /// When the spool holds this much, the relay stops acknowledging and reading.
    #[serde(default = "default_spool_max")]
    pub max_size: ByteSize,
    #[serde(default)]
    pub fsync: FsyncMode,
    /// With `fsync = "interval"`: the longest time between two fsyncs.
    #[serde(default = "default_fsync_interval")]
    pub fsync_interval: Span,
    /// A source (one agent input and file) is forgotten by dedup once it has sent
    /// nothing for this long and every sink has delivered its data. Every rotated file is
    /// a new source, so without this the table grows for good. Trade-off: a source silent
    /// for longer that then resends an old chunk gets it spooled again (a duplicate,
    /// never a loss).
    #[serde(default = "default_dedup_retention")]
    pub dedup_retention: Span,
}

impl Default for SpoolSection {
    fn default() -> Self {
        SpoolSection {
            dir: None,
            segment_size: default_segment(),
            max_size: default_spool_max(),
            fsync: FsyncMode::Always,
            fsync_interval: default_fsync_interval(),
            dedup_retention: default_dedup_retention(),
        }
    }
}

fn default_segment() -> ByteSize {
    ByteSize::mib(64)
}
fn default_spool_max() -> ByteSize {
    ByteSize::gib(10)
}
fn default_fsync_interval() -> Span {
    Span::secs(1)
}
fn default_dedup_retention() -> Span {
    Span::secs(7 * 86_400)
}

#[derive(Clone, Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// Prometheus `/metrics`, `/health`, `/ready`. Empty string disables it.
    #[serde(default = "default_metrics_listen")]
    pub listen: Option<SocketAddr>,
}

impl Default for MetricsSection {
    fn default() -> Self {
        MetricsSection {
            listen: default_metrics_listen(),
        }
    }
}

fn default_metrics_listen() -> Option<SocketAddr> {
    "127.0.0.1:24231".parse().ok()
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl RelayConfig {
    /// The sections of the file, as (title, schema), in the order of docs/relay.md. The
    /// tables there and the `--check-config` settings are generated from these.
    pub fn doc_sections() -> Vec<(String, schemars::Schema)> {
        let mut sections = vec![
            ("[relay]".to_string(), schemars::schema_for!(RelaySection)),
            ("[server]".to_string(), schemars::schema_for!(ServerSection)),
            ("[spool]".to_string(), schemars::schema_for!(SpoolSection)),
            (
                "[metrics]".to_string(),
                schemars::schema_for!(MetricsSection),
            ),
            (
                format!(
                    "[[sink]] (every type; `type` is one of {})",
                    SinkKind::TYPES.join(", ")
                ),
                schemars::schema_for!(SinkCommon),
            ),
        ];
        for (type_name, schema) in SinkKind::schemas() {
            sections.push((format!("[[sink]] type = \"{type_name}\""), schema));
        }
        sections
    }

    /// `section.key = value` for every key, as loaded (defaults filled in), secrets
    /// redacted: what `--check-config` prints.
    pub fn settings(&self) -> Vec<String> {
        use sluice_core::configdoc::json as value;
        let mut out = Vec::new();
        let sections = Self::doc_sections();
        let fixed: [(&str, serde_json::Value); 4] = [
            ("relay", value(&self.relay)),
            ("server", value(&self.server)),
            ("spool", value(&self.spool)),
            ("metrics", value(&self.metrics)),
        ];
        for ((path, v), (_, schema)) in fixed.iter().zip(&sections) {
            out.extend(sluice_core::configdoc::settings(path, schema, v));
        }
        let common = &sections[4].1;
        for sink in &self.sinks {
            let path = format!("sink.{}", sink.name);
            out.extend(sluice_core::configdoc::settings(
                &path,
                common,
                &value(&sink.common),
            ));
            let kind = value(&sink.kind);
            if let Some((_, schema)) = SinkKind::schemas()
                .into_iter()
                .find(|(t, _)| *t == sink.kind.type_name())
            {
                out.extend(sluice_core::configdoc::settings(&path, &schema, &kind));
            }
        }
        out
    }

    pub fn load(path: &Path) -> Result<RelayConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<RelayConfig, ConfigError> {
        let config: RelayConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        config.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        let id_ok = !self.relay.id.is_empty()
            && self
                .relay
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !id_ok {
            return Err(format!(
                "relay.id {:?} must be non-empty and use only letters, digits, '-' and '_' (it is part of object keys)",
                self.relay.id
            ));
        }
        match (&self.server.tls, self.server.insecure) {
            (None, false) => {
                return Err("server.tls is missing: set server.tls.cert and server.tls.key, or set server.insecure = true to accept plain TCP (not for production)".into())
            }
            (Some(_), true) => {
                return Err("server.tls and server.insecure = true are both set: choose one".into())
            }
            _ => {}
        }
        if let Some(limit) = &self.server.rate_limit {
            let burst = limit.burst.unwrap_or(limit.bytes_per_sec).as_u64();
            if limit.bytes_per_sec.as_u64() == 0
                || limit.bytes_per_sec.as_u64() > u32::MAX as u64
                || burst == 0
                || burst > u32::MAX as u64
            {
                return Err(
                    "server.rate_limit: bytes_per_sec and burst must be between 1 byte and 4 GiB"
                        .into(),
                );
            }
        }
        if !self.server.users.is_empty() && !self.server.requires_auth() {
            return Err("server.users needs server.shared_key (or server.client_keys): user names and passwords are checked inside the shared-key handshake".into());
        }
        if self
            .server
            .users
            .iter()
            .any(|(u, p)| u.is_empty() || p.is_empty())
        {
            return Err("server.users: user names and passwords must not be empty".into());
        }
        if self.server.client_keys.values().any(String::is_empty)
            || self.server.shared_key.as_deref() == Some("")
        {
            return Err(
                "server.shared_key and server.client_keys must not be empty strings".into(),
            );
        }
        if self.sinks.is_empty() {
            return Err(format!("no [[sink]] configured: the relay would spool forever. Add at least one sink (type one of {})", SinkKind::TYPES.join(", ")));
        }
        let mut names = std::collections::BTreeSet::new();
        for sink in &self.sinks {
            if !names.insert(sink.name.as_str()) {
                return Err(format!(
                    "two sinks are named {:?}: sink names must be unique",
                    sink.name
                ));
            }
            // The name is a folder under <data_dir>/sink-state/ (`.removed` there holds
            // removed sinks' state) and a metric label.
            let bad = |c: char| c == '/' || c == '\\' || c.is_control();
            if sink.name.is_empty() || sink.name.starts_with('.') || sink.name.contains(bad) {
                return Err(format!(
                    "sink name {:?} must be non-empty, hold no '/', '\\' or control characters, and not start with '.'",
                    sink.name
                ));
            }
            sink.kind.spec().validate(&sink.name)?;
        }
        if self.server.ack == AckMode::EndToEnd
            && !self.sinks.iter().any(|s| s.enabled && s.required)
        {
            return Err(
                "server.ack = \"end_to_end\" needs at least one enabled sink with required = true"
                    .into(),
            );
        }
        if self.server.max_connections_per_ip == 0 {
            return Err(
                "server.max_connections_per_ip = 0 would refuse every client: set at least 1"
                    .into(),
            );
        }
        if self.server.frame_timeout.get() < std::time::Duration::from_secs(1) {
            return Err(format!(
                "server.frame_timeout ({}) must be at least 1s: a frame of max_frame ({}) must be able to arrive in it",
                self.server.frame_timeout, self.server.max_frame
            ));
        }
        let one_frame = self.server.max_frame.as_u64() + self.server.max_decompressed.as_u64();
        if self.server.max_inflight_bytes.as_u64() < one_frame {
            return Err(format!(
                "server.max_inflight_bytes ({}) must hold at least one frame: max_frame ({}) + max_decompressed ({})",
                self.server.max_inflight_bytes, self.server.max_frame, self.server.max_decompressed
            ));
        }
        if self.server.decode_threads == Some(0) {
            return Err("server.decode_threads = 0 would decode nothing: set at least 1 (or leave it out for one per CPU)".into());
        }
        if self.server.max_tags_per_client == 0 {
            return Err(
                "server.max_tags_per_client = 0 would refuse every chunk: set at least 1".into(),
            );
        }
        if self.spool.dedup_retention.get() < std::time::Duration::from_secs(3600) {
            return Err(format!(
                "spool.dedup_retention ({}) must be at least 1h: a source that resends after a longer pause than this gets duplicated",
                self.spool.dedup_retention
            ));
        }
        if self.relay.ledger_retention.get() < std::time::Duration::from_secs(2 * 3600) {
            return Err(format!(
                "relay.ledger_retention ({}) must be at least 2h: the hour being written must not be forgotten",
                self.relay.ledger_retention
            ));
        }
        if self.spool.max_size < self.spool.segment_size {
            return Err(format!(
                "spool.max_size ({}) is smaller than spool.segment_size ({})",
                self.spool.max_size, self.spool.segment_size
            ));
        }
        Ok(())
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.spool
            .dir
            .clone()
            .unwrap_or_else(|| self.relay.data_dir.join("spool"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/relay.md's config reference is generated from the structs above.
    #[test]
    fn config_docs_match_docs_relay_md() {
        let doc = sluice_core::configdoc::manifest_dir(env!("CARGO_MANIFEST_DIR"))
            .join("../docs/relay.md");
        let tables = sluice_core::configdoc::markdown(&RelayConfig::doc_sections());
        sluice_core::configdoc::check_docs(&doc, "relay config", &tables).unwrap();
    }

    #[test]
    fn settings_redact_secrets() {
        let text = r#"
            [relay]
            id = "r1"
            data_dir = "/tmp/x"
            [server]
            listen = "127.0.0.1:24224"
            insecure = true
            shared_key = "hunter2"
            users = { alice = "pw1" }
            [[sink]]
            name = "d"
            type = "discard"
        "#;
        let config = RelayConfig::parse(Path::new("t.toml"), text).unwrap();
        let all = config.settings().join("\n");
        assert!(!all.contains("hunter2") && !all.contains("pw1"), "{all}");
        assert!(
            all.contains("server.users = {\"alice\":\"<redacted>\"}"),
            "{all}"
        );
        assert!(all.contains("server.max_frame = \"16 MiB\""), "{all}");
        assert!(all.contains("sink.d.retry_max = \"30s\""), "{all}");
    }
}
