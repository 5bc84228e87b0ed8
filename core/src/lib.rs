//! What the sluice agent and relay share.
//!
//! The Forward protocol codec lives in its own crate, `sluice-forward`, so that crates
//! needing only the wire format (parsers, tools) do not link TLS, HTTP and metrics.
//!
//! - [`tls`]: rustls server and client configuration from PEM files.
//! - [`metrics`]: the Prometheus registry and the HTTP endpoint for metrics,
//!   health and readiness.
//! - [`durable`]: atomic, crash-safe replacement of small state files.
//! - [`units`]: byte sizes and durations as users write them in configs.
//! - [`ranges`]: sets of seqs as ranges, what the agent's report and the relay's
//!   ledger and reconciliation keep per source instead of one entry per event.

pub mod configdoc;
pub mod durable;
pub mod logging;
pub mod metrics;
pub mod ranges;
pub mod shutdown;
pub mod tls;
pub mod units;
