//! SIGTERM / SIGINT handling shared by both binaries.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::signal::unix::{signal, Signal, SignalKind};

/// Set by our own handler for every SIGTERM / SIGINT, from the moment it is installed.
static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

/// The stop signals, caught from the moment [`StopSignals::install`] returns.
///
/// Why install early: startup (replaying a spool, scanning thousands of files) can take
/// a while, and a SIGTERM that arrives before a handler exists kills the process where
/// it stands. Installed first thing, such a signal is kept and the process stops
/// cleanly right after startup.
///
/// Why a flag besides tokio's `Signal`: tokio turns the OS handler on and only then
/// subscribes the listener (`signal_with_handle`), and a signal its driver broadcasts in
/// between is lost to that listener. The loaded-machine runs of the suite hit it: a
/// SIGTERM sent the moment the handler existed was ignored and the agent ran on. Our
/// handler is installed first and only sets an atomic flag (async-signal-safe), which
/// [`StopSignals::wait`] checks before it waits on tokio's listeners, which are
/// subscribed by then.
pub struct StopSignals {
    term: Signal,
    int: Signal,
}

impl StopSignals {
    /// Must be called inside the tokio runtime.
    pub fn install() -> std::io::Result<StopSignals> {
        for sig in [libc::SIGTERM, libc::SIGINT] {
            // SAFETY: the action only stores to an atomic, which is async-signal-safe.
            unsafe {
                signal_hook_registry::register(sig, || {
                    STOP_REQUESTED.store(true, Ordering::SeqCst)
                })?;
            }
        }
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for SIGTERM or SIGINT (or returns at once if one came already).
    pub async fn wait(&mut self) {
        if STOP_REQUESTED.load(Ordering::SeqCst) {
            return;
        }
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A SIGTERM that reached our handler but not tokio's listener (the window inside
    /// tokio's `signal()`) still ends the wait.
    #[tokio::test]
    async fn a_signal_tokio_missed_still_stops() {
        let mut signals = StopSignals::install().unwrap();
        STOP_REQUESTED.store(true, Ordering::SeqCst); // what our handler does
        tokio::time::timeout(Duration::from_secs(5), signals.wait())
            .await
            .expect("wait returns at once when a stop signal came");
    }

    /// A real SIGTERM to this process is caught (not fatal) and ends the wait.
    #[tokio::test]
    async fn a_real_sigterm_is_caught() {
        let mut signals = StopSignals::install().unwrap();
        // SAFETY: raising a signal this process handles.
        unsafe {
            libc::raise(libc::SIGTERM);
        }
        tokio::time::timeout(Duration::from_secs(5), signals.wait())
            .await
            .expect("the SIGTERM ends the wait");
        assert!(STOP_REQUESTED.load(Ordering::SeqCst));
    }
}
