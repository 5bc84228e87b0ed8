//! What the relay and agent handles share: a child process over as many lives as a test
//! needs (each start is a new process with its own log file, on the same config file),
//! its metrics endpoint, and waiting on a condition while it runs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use crate::{metric, plain_log, wait_for, Proc};

pub struct Lives {
    /// `sluice-relay` or `sluice-agent`.
    binary: &'static str,
    pub config_path: PathBuf,
    /// The metrics endpoint.
    pub metrics: SocketAddr,
    dir: PathBuf,
    /// Log files: `<stem>.log`, then `<stem>-1.log`, ...
    stem: String,
    proc_: Option<Proc>,
    logs: Vec<PathBuf>,
    /// Extra environment for the next lives (test failpoints such as
    /// `SLUICE_TEST_CRASH_AFTER_UPLOAD`).
    pub env: Vec<(String, String)>,
}

impl Lives {
    pub(crate) fn new(
        binary: &'static str,
        dir: PathBuf,
        stem: String,
        config_path: PathBuf,
        metrics: SocketAddr,
    ) -> Lives {
        Lives {
            binary,
            config_path,
            metrics,
            dir,
            stem,
            proc_: None,
            logs: Vec::new(),
            env: Vec::new(),
        }
    }

    /// Starts the next life; returns at once.
    pub(crate) fn spawn_life(&mut self) {
        assert!(!self.is_running(), "{} is already running", self.binary);
        let log = match self.logs.len() {
            0 => self.dir.join(format!("{}.log", self.stem)),
            n => self.dir.join(format!("{}-{n}.log", self.stem)),
        };
        self.proc_ = Some(Proc::start_with_env(
            self.binary,
            &self.config_path,
            &log,
            &self.env,
        ));
        self.logs.push(log);
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(p) = self.proc_.as_mut() {
            p.kill();
        }
    }

    /// SIGTERM; panics unless it exits with status 0 within `timeout`.
    pub fn stop(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.proc_.as_mut().and_then(|p| p.stop(timeout))
    }

    /// The process of the current (or last) life.
    pub fn process(&self) -> &Proc {
        self.proc_
            .as_ref()
            .unwrap_or_else(|| panic!("{} was never started", self.binary))
    }

    pub fn process_mut(&mut self) -> &mut Proc {
        let binary = self.binary;
        self.proc_
            .as_mut()
            .unwrap_or_else(|| panic!("{binary} was never started"))
    }

    pub fn is_running(&self) -> bool {
        self.proc_.as_ref().is_some_and(Proc::is_running)
    }

    /// Panics with the log when the process has exited.
    pub fn assert_running(&self) {
        self.process().assert_running();
    }

    pub fn pid(&self) -> i32 {
        self.process().pid()
    }

    /// The log file of the current (or last) life.
    pub fn log_path(&self) -> &Path {
        self.logs
            .last()
            .unwrap_or_else(|| panic!("{} was never started", self.binary))
    }

    /// The log files of every life, first to last.
    pub fn logs(&self) -> &[PathBuf] {
        &self.logs
    }

    /// Every life's log, first to last, as one text.
    pub fn all_logs_text(&self) -> String {
        self.logs
            .iter()
            .map(|l| std::fs::read_to_string(l).unwrap_or_default())
            .collect()
    }

    /// The current life's log as written.
    pub fn log_text(&self) -> String {
        self.process().log_text()
    }

    /// The current life's log without colour codes.
    pub fn plain_log(&self) -> String {
        plain_log(self.log_path())
    }

    /// Sum of the metric's samples whose labels contain `labels`; `None` when absent.
    pub fn metric(&self, name: &str, labels: &str) -> Option<f64> {
        metric(self.metrics, name, labels)
    }

    /// As [`metric`](Lives::metric), 0 when absent (a counter nobody incremented yet).
    pub fn counter(&self, name: &str, labels: &str) -> f64 {
        self.metric(name, labels).unwrap_or(0.0)
    }

    /// Waits for `cond`, and fails at once (with the log) if the process exits meanwhile.
    pub fn wait(&self, what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
        wait_for(what, timeout, || {
            self.assert_running();
            cond()
        });
    }
}
