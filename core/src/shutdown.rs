//! SIGTERM / SIGINT handling shared by both binaries.

use tokio::signal::unix::{signal, Signal, SignalKind};

/// The stop signals, caught from the moment [`StopSignals::install`] returns.
///
/// Why install early: startup (replaying a spool, scanning thousands of files) can take
/// a while, and a SIGTERM that arrives before a handler exists kills the process where
/// it stands. Installed first thing, such a signal is kept and the process stops
/// cleanly right after startup.
pub struct StopSignals {
    term: Signal,
    int: Signal,
}

impl StopSignals {
    /// Must be called inside the tokio runtime.
    pub fn install() -> std::io::Result<StopSignals> {
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for SIGTERM or SIGINT (or returns at once if one came already).
    pub async fn wait(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
