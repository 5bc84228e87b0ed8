//! What the sluice agent and relay share.
//!
//! - [`forward`]: the Fluentd Forward protocol v1 codec (all four modes, gzip,
//!   chunk/ack, HELO/PING/PONG) with sluice's provenance in the option map.
//! - [`tls`]: rustls server and client configuration from PEM files.
//! - [`metrics`]: the Prometheus registry and the HTTP endpoint for metrics,
//!   health and readiness.
//! - [`durable`]: atomic, crash-safe replacement of small state files.
//! - [`units`]: byte sizes and durations as users write them in configs.

pub mod configdoc;
pub mod durable;
pub mod forward;
pub mod logging;
pub mod metrics;
pub mod shutdown;
pub mod tls;
pub mod units;
