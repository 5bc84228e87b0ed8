//! The agent of a test: [`AgentSpec`] is its config (the real [`AgentConfig`]) with test
//! defaults, [`Agent`] the running `sluice-agent` built from it, over as many lives
//! (kill -9, restart) as the test needs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
pub use sluice_agent::config::{
    AgentConfig, AgentSection, InputConfig, MetricsSection as AgentMetricsSection, MultilineConfig,
    OutputConfig, TailInput,
};
pub use sluice_parsers::ParserKind;

use crate::lives::Lives;
use crate::{loopback, with_defaults, ClientTlsFiles};

/// An agent config for a test, before it runs: one `tail` input named "app" (tag
/// "app.log"), output over TLS to the given relays, metrics on a free loopback port.
/// Tests change `config` as they need (`spec.config.output.chunk_age = Span::millis(200)`,
/// `spec.tail().parser = ParserKind::Json`), then [`start`](AgentSpec::start) it.
pub struct AgentSpec {
    /// Where the config, the logs and (by default) the data dir go.
    pub dir: PathBuf,
    /// File names: `<stem>.toml`, `<stem>.log` (then `<stem>-1.log`, ...).
    pub stem: String,
    pub config: AgentConfig,
}

impl AgentSpec {
    /// Tails the files matching `include`; checkpoints in `dir/agent-data`.
    pub fn new(
        dir: &Path,
        id: &str,
        relays: &[SocketAddr],
        tls: ClientTlsFiles,
        include: &str,
    ) -> AgentSpec {
        let mut output: OutputConfig = with_defaults(json!({
            "relays": relays.iter().map(ToString::to_string).collect::<Vec<_>>(),
        }));
        output.tls = tls;
        AgentSpec {
            dir: dir.to_owned(),
            stem: "agent".into(),
            config: AgentConfig {
                agent: with_defaults(json!({ "id": id, "data_dir": dir.join("agent-data") })),
                inputs: vec![InputConfig::Tail(with_defaults(json!({
                    "name": "app",
                    "tag": "app.log",
                    "include": [include],
                })))],
                output,
                // Never the default port: tests run in parallel.
                metrics: AgentMetricsSection {
                    listen: Some(loopback()),
                },
            },
        }
    }

    /// The first (in most tests the only) tail input.
    pub fn tail(&mut self) -> &mut TailInput {
        match self.config.inputs.first_mut() {
            Some(InputConfig::Tail(t)) => t,
            None => panic!("the agent has no input"),
        }
    }

    /// Writes the config and starts the agent; returns once it logged "agent started"
    /// (metrics listening, files scanned, output running).
    pub fn start(self) -> Agent {
        let agent = self.spawn();
        agent.wait_started();
        agent
    }

    /// Writes the config and starts the agent; returns at once.
    pub fn spawn(self) -> Agent {
        let mut agent = self.write();
        agent.spawn_life();
        agent
    }

    /// Writes the config; the agent is not started.
    pub fn write(self) -> Agent {
        let metrics = self
            .config
            .metrics
            .listen
            .expect("the harness reads the agent's metrics: keep metrics.listen set");
        let config_path = self.dir.join(format!("{}.toml", self.stem));
        let agent = Agent {
            lives: Lives::new("sluice-agent", self.dir, self.stem, config_path, metrics),
            config: self.config,
        };
        let text = toml::to_string(&agent.config).expect("agent config serialises");
        // The agent's own parser and checks, so a bad tweak fails here with its message.
        if let Err(e) = AgentConfig::parse(&agent.config_path, &text) {
            panic!("the test's agent config is invalid: {e}\n{text}");
        }
        std::fs::write(&agent.config_path, text).expect("write agent config");
        agent
    }
}

/// A `sluice-agent` child process and the config it runs with. Each start is a new life
/// with its own log file, on the same config and checkpoints; the process, its logs, its
/// metrics and `wait` are [`Lives`]'.
pub struct Agent {
    pub config: AgentConfig,
    lives: Lives,
}

impl std::ops::Deref for Agent {
    type Target = Lives;
    fn deref(&self) -> &Lives {
        &self.lives
    }
}

impl std::ops::DerefMut for Agent {
    fn deref_mut(&mut self) -> &mut Lives {
        &mut self.lives
    }
}

impl Agent {
    fn wait_started(&self) {
        self.wait("the agent to start", Duration::from_secs(30), || {
            self.log_text().contains("agent started")
        });
    }

    /// Starts the next life (after [`kill`](Agent::kill) or [`stop`](Agent::stop), or
    /// the first after [`AgentSpec::write`]); returns once it logged "agent started".
    pub fn start(&mut self) {
        self.spawn_life();
        self.wait_started();
    }

    pub fn data_dir(&self) -> &Path {
        &self.config.agent.data_dir
    }

    /// The checkpoint file's text, "" before the first save.
    pub fn checkpoints(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("checkpoints.json")).unwrap_or_default()
    }

    /// Events the relay acknowledged (`sluice_agent_events_acked_total`), this life.
    pub fn acked(&self) -> u64 {
        self.counter("sluice_agent_events_acked_total", "") as u64
    }

    /// Chunks sent (`sluice_agent_chunks_sent_total`), this life.
    pub fn chunks_sent(&self) -> u64 {
        self.counter("sluice_agent_chunks_sent_total", "") as u64
    }

    /// Waits until at least `n` events were acknowledged.
    pub fn wait_acked(&self, n: u64, timeout: Duration) {
        self.wait(
            &format!("the agent to have {n} events acknowledged"),
            timeout,
            || self.acked() >= n,
        );
    }
}
