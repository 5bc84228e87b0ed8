//! Log setup shared by both binaries.

use std::io::IsTerminal;

/// Logs to stderr at the level in `SLUICE_LOG` (default `info`). Colours only on a
/// terminal and without `NO_COLOR`: under systemd or with stderr redirected to a file,
/// escape codes would end up in journald and in log files.
pub fn init() {
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(colour)
        .with_writer(std::io::stderr)
        .init();
}
