//! The agent's configuration file (TOML). Every key, its default and its meaning are
//! declared here, once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sluice_core::tls::ClientTlsFiles;
use sluice_core::units::{ByteSize, Span};

pub use crate::inputs::tail::{MultilineConfig, TailInput};
pub use crate::inputs::{InputConfig, InputSpec};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub agent: AgentSection,
    #[serde(rename = "input")]
    pub inputs: Vec<InputConfig>,
    pub output: OutputConfig,
    #[serde(default)]
    pub metrics: MetricsSection,
}

#[derive(Clone, Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    /// Name of this agent; part of every source id (no ':').
    #[serde(default = "default_id")]
    #[schemars(extend("default" = "$HOSTNAME, else /etc/hostname, else /etc/machine-id; none: refused"))]
    pub id: String,
    /// Where the checkpoint file lives.
    pub data_dir: PathBuf,
    /// How long shutdown waits for in-flight chunks to be acknowledged.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout: Span,
}

/// The host's own name, else its machine id; "" when the host has neither, which
/// `validate` refuses: a constant fallback would give every such host the same source
/// ids, and the relays would trim one host's events as another's duplicates.
fn default_id() -> String {
    id_from(
        std::env::var("HOSTNAME").ok(),
        Path::new("/etc/hostname"),
        Path::new("/etc/machine-id"),
    )
}

/// [`default_id`] with its sources given: `hostname_env` ($HOSTNAME), else the file
/// `hostname_file`, else the file `machine_id_file`, each trimmed; a source that is
/// missing, unreadable or blank passes to the next; "" when all are.
fn id_from(hostname_env: Option<String>, hostname_file: &Path, machine_id_file: &Path) -> String {
    let read = |path: &Path| std::fs::read_to_string(path).ok();
    [hostname_env]
        .into_iter()
        .chain(std::iter::once_with(|| read(hostname_file)))
        .chain(std::iter::once_with(|| read(machine_id_file)))
        .flatten()
        .map(|h| h.trim().to_string())
        .find(|h| !h.is_empty())
        .unwrap_or_default()
}

fn default_shutdown_timeout() -> Span {
    Span::secs(10)
}

#[derive(Clone, Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// Relays: "host:port", or `{ address = "host:port", weight = 1, standby = false }`.
    /// Each source (file) goes to one relay, the healthy one with the fewest sources per
    /// unit of weight, and stays there while that relay is healthy; standbys are used
    /// only while no other relay is. See docs/agent.md.
    pub relays: Vec<RelayEntry>,
    /// TLS files for talking to relays; without `ca` the public (Mozilla) roots are used.
    #[serde(default)]
    pub tls: ClientTlsFiles,
    /// Plain TCP without TLS (tests, or a Fluentd aggregator without TLS).
    #[serde(default)]
    pub insecure: bool,
    /// Shared key for the HELO/PING/PONG handshake, if the relay requires one.
    #[serde(default)]
    #[schemars(extend("x-secret" = true))]
    pub shared_key: Option<String>,
    /// User name, for a relay with `server.users` (with `password`, sent as a salted digest).
    #[serde(default)]
    pub username: Option<String>,
    /// The password of `username`.
    #[serde(default)]
    #[schemars(extend("x-secret" = true))]
    pub password: Option<String>,
    /// A chunk is sealed at this many (uncompressed) bytes ...
    #[serde(default = "default_chunk_size")]
    pub chunk_size: ByteSize,
    /// ... or when its oldest line waited this long.
    #[serde(default = "default_chunk_age")]
    pub chunk_age: Span,
    /// Chunks sent but not yet acknowledged on one relay connection, at most.
    #[serde(default = "default_in_flight")]
    pub in_flight: usize,
    /// Compressed bytes of chunks not yet acknowledged, at most, over all relays: the
    /// agent's memory for frames waiting for acks does not depend on how slow a relay is.
    /// One chunk is always allowed, however large. A relay connection carries at most
    /// about this much per round trip: 2 MiB over a 50 ms link is 40 MB/s of gzip, some
    /// 150 MB/s of log lines; raise it for links with longer round trips or a larger `chunk_size`.
    #[serde(default = "default_in_flight_bytes")]
    pub in_flight_bytes: ByteSize,
    /// When a relay has said nothing for this long while it owes an ack (or, on an idle
    /// connection, every `heartbeat_interval`), the agent sends a probe: an empty chunk
    /// the relay answers at once. New chunks wait until the relay is heard from again,
    /// so a relay that stopped answering is sent little that could be duplicated.
    #[serde(default = "default_probe_interval")]
    pub probe_interval: Span,
    /// A probe not answered within this means the relay (or the path to it) is gone:
    /// the connection is reset, and its unacknowledged chunks go to the other relays.
    /// `0s` turns probes off (for a server that does not answer empty chunks): then
    /// only `ack_timeout` leaves a relay.
    #[serde(default = "default_probe_timeout")]
    pub probe_timeout: Span,
    /// The oldest chunk not acknowledged within this, while the relay answers probes, is
    /// logged once (`sluice_agent_ack_waits_total`) and waited for on the same connection
    /// (in `end_to_end` mode its sinks may be slow; another relay would only spool a
    /// second copy). With probes off, such a relay is left.
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout: Span,
    /// A relay whose process is gone (connection refused) after taking chunks is retried
    /// this long before its unacknowledged chunks go to other relays: a relay that
    /// restarts in time deduplicates the resent chunks, another relay could not.
    #[serde(default = "default_failover_after")]
    pub failover_after: Span,
    /// TCP connect, TLS handshake and HELO/PING/PONG must finish within this.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Span,
    /// The first wait before reconnecting after a failure, doubling up to `retry_max`.
    #[serde(default = "default_retry_min")]
    pub retry_min: Span,
    /// The longest wait between reconnects.
    #[serde(default = "default_retry_max")]
    pub retry_max: Span,
    /// While there is nothing to send, a probe goes to the relay this often (a Forward
    /// heartbeat, `nil`, when probes are off): it keeps the connection from the relay's
    /// idle timeout and finds a dead relay before data needs it. `0s` turns it off.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_interval: Span,
    /// How often the agent sends its report to a relay: per tag, event-time hour and
    /// file, the seqs the relays acknowledged (reconcile's "agents" column; only when it
    /// changed). `0s` turns it off, for a relay that is not sluice-relay (Fluentd would
    /// store it as an event of tag `sluice.report`). See docs/reconcile.md.
    #[serde(default = "default_report_interval")]
    pub report_interval: Span,
}

fn default_report_interval() -> Span {
    Span::secs(10)
}

/// One entry of `output.relays`.
#[derive(Clone, Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum RelayEntry {
    /// "host:port", weight 1, not a standby.
    Address(String),
    Relay(RelaySpec),
}

#[derive(Clone, Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RelaySpec {
    /// "host:port".
    pub address: String,
    /// Relative share of the sources (1-100), as Fluentd's `<server> weight`.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Used only while no relay that is not a standby is healthy (Fluentd's `standby`).
    #[serde(default)]
    pub standby: bool,
}

fn default_weight() -> u32 {
    1
}

impl RelayEntry {
    pub fn spec(&self) -> RelaySpec {
        match self {
            RelayEntry::Address(a) => RelaySpec {
                address: a.clone(),
                weight: 1,
                standby: false,
            },
            RelayEntry::Relay(r) => r.clone(),
        }
    }

    pub fn address(&self) -> &str {
        match self {
            RelayEntry::Address(a) => a,
            RelayEntry::Relay(r) => &r.address,
        }
    }
}

impl std::fmt::Display for RelayEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.address())
    }
}

fn default_in_flight_bytes() -> ByteSize {
    // About six default chunks (1 MiB, ~350 KiB gzipped with their offsets); 8 MiB let a
    // slow relay hold 3 MiB more of the agent's memory (bench/RESULTS.md, issue 16).
    ByteSize::mib(2)
}
fn default_probe_interval() -> Span {
    Span::secs(1)
}
fn default_probe_timeout() -> Span {
    Span::secs(3)
}
fn default_failover_after() -> Span {
    Span::secs(5)
}

fn default_heartbeat() -> Span {
    Span::secs(30)
}

fn default_chunk_size() -> ByteSize {
    ByteSize::mib(1)
}
fn default_chunk_age() -> Span {
    Span::secs(1)
}
fn default_in_flight() -> usize {
    8
}
fn default_ack_timeout() -> Span {
    Span::secs(30)
}
fn default_connect_timeout() -> Span {
    Span::secs(5)
}
fn default_retry_min() -> Span {
    Span::millis(100)
}
fn default_retry_max() -> Span {
    Span::secs(10)
}

#[derive(Clone, Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// Prometheus `/metrics`, `/health`, `/ready`.
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
    "127.0.0.1:24232".parse().ok()
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

impl AgentConfig {
    /// The sections of the file, as (title, schema), in the order of docs/agent.md. The
    /// tables there and the `--check-config` settings are generated from these.
    pub fn doc_sections() -> Vec<(String, schemars::Schema)> {
        let mut sections = vec![("[agent]".to_string(), schemars::schema_for!(AgentSection))];
        for (type_name, schema) in InputConfig::schemas() {
            sections.push((format!("[[input]] type = \"{type_name}\""), schema));
        }
        sections.push(("[output]".to_string(), schemars::schema_for!(OutputConfig)));
        sections.push((
            "[metrics]".to_string(),
            schemars::schema_for!(MetricsSection),
        ));
        sections
    }

    /// `section.key = value` for every key, as loaded (defaults filled in), secrets
    /// redacted: what `--check-config` prints.
    pub fn settings(&self) -> Vec<String> {
        use sluice_core::configdoc::{json, settings};
        let sections = Self::doc_sections();
        let schema = |title: &str| {
            sections
                .iter()
                .find(|(t, _)| t == title)
                .map(|(_, s)| s.clone())
                .unwrap_or_default()
        };
        let mut out = settings("agent", &schema("[agent]"), &json(&self.agent));
        for input in &self.inputs {
            // The input's table holds its `type` and its own keys.
            let value = json(input);
            let type_name = value.get("type").and_then(|t| t.as_str()).unwrap_or("");
            let title = format!("[[input]] type = \"{type_name}\"");
            let path = format!("input.{}", input.spec().name());
            out.extend(settings(&path, &schema(&title), &value));
        }
        out.extend(settings("output", &schema("[output]"), &json(&self.output)));
        out.extend(settings(
            "metrics",
            &schema("[metrics]"),
            &json(&self.metrics),
        ));
        out
    }

    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<AgentConfig, ConfigError> {
        let config: AgentConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
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
        if self.agent.id.is_empty() {
            return Err("agent.id is not set and this host has no name to take it from ($HOSTNAME, /etc/hostname and /etc/machine-id are empty or missing): set agent.id to a name unique in the fleet".into());
        }
        if self.agent.id.contains(':') {
            return Err(format!(
                "agent.id {:?} must be non-empty and contain no ':'",
                self.agent.id
            ));
        }
        if self.output.username.is_some() != self.output.password.is_some() {
            return Err(
                "output.username and output.password go together: set both or neither".into(),
            );
        }
        if self.output.username.is_some() && self.output.shared_key.is_none() {
            return Err("output.username needs output.shared_key: the user is checked inside the shared-key handshake".into());
        }
        if self.inputs.is_empty() {
            return Err("no [[input]] configured: add at least one, e.g. type = \"tail\" with include = [\"/var/log/app/*.log\"]".into());
        }
        let mut names = std::collections::BTreeSet::new();
        for input in &self.inputs {
            let name = input.spec().name();
            if name.is_empty() || name.contains(':') {
                return Err(format!(
                    "input name {name:?} must be non-empty and contain no ':'"
                ));
            }
            if !names.insert(name) {
                return Err(format!("two inputs are named {name:?}: input names must be unique (they key the checkpoints)"));
            }
            input.spec().validate()?;
        }
        if self.output.relays.is_empty() {
            return Err("output.relays is empty: list at least one relay as \"host:port\"".into());
        }
        let mut addresses = std::collections::BTreeSet::new();
        for relay in &self.output.relays {
            let spec = relay.spec();
            split_host_port(&spec.address)?;
            if !(1..=100).contains(&spec.weight) {
                return Err(format!("output.relays: {:?} has weight {}: use 1 to 100 (a relay that should only take over when the others are down is `standby = true`)", spec.address, spec.weight));
            }
            if !addresses.insert(spec.address.clone()) {
                return Err(format!("output.relays lists {:?} twice", spec.address));
            }
        }
        if self.output.relays.iter().all(|r| r.spec().standby) {
            return Err("output.relays: every relay is a standby: at least one must not be (standbys take over only while no other relay is healthy)".into());
        }
        if self.output.in_flight_bytes.as_usize() == 0 {
            return Err("output.in_flight_bytes must be more than 0".into());
        }
        if !self.output.probe_timeout.get().is_zero() && self.output.probe_interval.get().is_zero()
        {
            return Err("output.probe_interval must be more than 0s while probes are on (probe_timeout = \"0s\" turns them off)".into());
        }
        if self.output.in_flight == 0 {
            return Err("output.in_flight must be at least 1".into());
        }
        if !self.output.insecure && self.output.tls.ca.is_none() {
            // Allowed (public roots), but usually a mistake with private relays.
            tracing::info!("output.tls.ca not set: relay certificates are checked against the public Mozilla roots");
        }
        Ok(())
    }
}

/// "host:port" or "[v6]:port".
pub fn split_host_port(addr: &str) -> Result<(String, u16), String> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("relay {addr:?} must be \"host:port\""))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("relay {addr:?}: port {port:?} is not a number"))?;
    Ok((
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent config with one tail input and one relay, and these `[agent]` lines.
    fn minimal_config(agent: &[&str]) -> String {
        format!(
            "[agent]\n{}\n[[input]]\ntype = \"tail\"\nname = \"app\"\ntag = \"app\"\ninclude = [\"/var/log/app.log\"]\n[output]\nrelays = [\"127.0.0.1:24224\"]\n",
            agent.join("\n")
        )
    }

    /// docs/agent.md's config reference is generated from the structs above.
    #[test]
    fn config_docs_match_docs_agent_md() {
        let doc = sluice_core::configdoc::manifest_dir(env!("CARGO_MANIFEST_DIR"))
            .join("../docs/agent.md");
        let tables = sluice_core::configdoc::markdown(&AgentConfig::doc_sections());
        sluice_core::configdoc::check_docs(&doc, "agent config", &tables).unwrap();
    }

    #[test]
    fn settings_redact_secrets() {
        let text = r#"
            [agent]
            id = "a1"
            data_dir = "/tmp/x"
            [[input]]
            type = "tail"
            name = "app"
            tag = "app"
            include = ["/var/log/app.log"]
            [output]
            relays = ["127.0.0.1:24224"]
            shared_key = "hunter2"
            username = "alice"
            password = "pw1"
        "#;
        let config = AgentConfig::parse(Path::new("t.toml"), text).unwrap();
        let all = config.settings().join("\n");
        assert!(!all.contains("hunter2") && !all.contains("pw1"), "{all}");
        assert!(all.contains("output.username = \"alice\""), "{all}");
        assert!(all.contains("input.app.max_line = \"64 KiB\""), "{all}");
        assert!(all.contains("output.chunk_size = \"1 MiB\""), "{all}");
    }

    /// No constant fallback: an agent without a name refuses to start, saying how to fix it.
    #[test]
    fn an_empty_agent_id_is_refused() {
        let text = &minimal_config(&["id = \"\"", "data_dir = \"/tmp/x\""]);
        let e = AgentConfig::parse(Path::new("t.toml"), text)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("agent.id is not set") && e.contains("/etc/machine-id"),
            "{e}"
        );
    }

    /// A temp dir with `hostname` and `machine-id` files holding what is given (no file
    /// for `None`), and their paths.
    fn id_sources(
        hostname: Option<&str>,
        machine_id: Option<&str>,
    ) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let (h, m) = (dir.path().join("hostname"), dir.path().join("machine-id"));
        for (path, text) in [(&h, hostname), (&m, machine_id)] {
            if let Some(text) = text {
                std::fs::write(path, text).unwrap();
            }
        }
        (dir, h, m)
    }

    fn id_with(env: Option<&str>, hostname: Option<&str>, machine_id: Option<&str>) -> String {
        let (_dir, h, m) = id_sources(hostname, machine_id);
        id_from(env.map(str::to_string), &h, &m)
    }

    /// $HOSTNAME, else /etc/hostname, else /etc/machine-id: each source is taken when the
    /// ones before it are missing or blank, and only then.
    #[test]
    fn the_default_id_falls_back_in_order() {
        let all = (Some("env-host"), Some("file-host\n"), Some("0123abcd\n"));
        assert_eq!(id_with(all.0, all.1, all.2), "env-host");
        assert_eq!(id_with(None, all.1, all.2), "file-host", "no $HOSTNAME");
        assert_eq!(
            id_with(Some(""), all.1, all.2),
            "file-host",
            "$HOSTNAME empty"
        );
        assert_eq!(
            id_with(Some(" \t"), all.1, all.2),
            "file-host",
            "$HOSTNAME blank"
        );
        assert_eq!(id_with(None, None, all.2), "0123abcd", "no /etc/hostname");
        assert_eq!(
            id_with(None, Some("\n"), all.2),
            "0123abcd",
            "/etc/hostname blank"
        );
        assert_eq!(id_with(Some(""), Some(""), all.2), "0123abcd", "both blank");
        assert_eq!(
            id_with(Some("env-host"), None, None),
            "env-host",
            "files not needed"
        );
    }

    #[test]
    fn the_default_id_is_trimmed() {
        assert_eq!(id_with(Some("  env-host \n"), None, None), "env-host");
        assert_eq!(id_with(None, Some(" file-host\r\n"), None), "file-host");
        assert_eq!(id_with(None, None, Some("\t0123abcd\n\n")), "0123abcd");
    }

    /// No source at all: the default is empty, and validation refuses it, naming every
    /// source it looked at and what to do.
    #[test]
    fn a_host_without_a_name_is_refused_at_validation() {
        for (env, hostname, machine_id) in [
            (None, None, None),
            (Some(" "), Some("\n"), Some("  \n")),
            (None, Some(""), None),
        ] {
            let id = id_with(env, hostname, machine_id);
            assert_eq!(id, "", "{env:?} {hostname:?} {machine_id:?}");
            let text = &minimal_config(&["id = \"placeholder\"", "data_dir = \"/tmp/x\""]);
            let mut config = AgentConfig::parse(Path::new("t.toml"), text).unwrap();
            config.agent.id = id;
            let e = config.validate().unwrap_err();
            assert!(
                e.contains("agent.id is not set")
                    && e.contains("$HOSTNAME")
                    && e.contains("/etc/hostname")
                    && e.contains("/etc/machine-id")
                    && e.contains("set agent.id"),
                "{e}"
            );
        }
    }

    /// What the config uses when `agent.id` is left out: the real sources, in that order.
    #[test]
    fn the_default_id_reads_the_hosts_own_sources() {
        let expected = id_from(
            std::env::var("HOSTNAME").ok(),
            Path::new("/etc/hostname"),
            Path::new("/etc/machine-id"),
        );
        assert_eq!(default_id(), expected);
        let text = &minimal_config(&["data_dir = \"/tmp/x\""]);
        match AgentConfig::parse(Path::new("t.toml"), text) {
            Ok(config) => assert_eq!(config.agent.id, expected),
            Err(e) => {
                assert_eq!(expected, "", "refused although the host has a name: {e}");
                assert!(e.to_string().contains("agent.id is not set"), "{e}");
            }
        }
    }
}
