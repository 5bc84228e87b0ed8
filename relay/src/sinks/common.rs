//! The keys every sink has, whatever its type (Vector's `SinkOuter`): declared once.

use serde::{Deserialize, Serialize};
use sluice_core::units::Span;

/// Where a newly added sink starts reading the spool.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum StartFrom {
    /// The oldest data still in the spool.
    #[default]
    Oldest,
    /// Only data that arrives from now on.
    Now,
}

/// The keys every sink has, whatever its type.
#[derive(Clone, Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SinkCommon {
    /// Unique name; the sink's cursor and ledger counts are kept under it.
    pub name: String,
    /// A disabled sink keeps its cursor (and holds spool data) but delivers nothing.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// In `end_to_end` ack mode, chunks are acknowledged once every required sink has them.
    #[serde(default = "yes")]
    pub required: bool,
    /// Where a newly added sink starts: `oldest` (everything still spooled) or `now`.
    #[serde(default)]
    pub start_from: StartFrom,
    /// How long to wait after a failed delivery, doubling up to `retry_max`.
    #[serde(default = "default_retry_min")]
    pub retry_min: Span,
    /// The longest wait between retries; also the wait after a permanent error.
    #[serde(default = "default_retry_max")]
    pub retry_max: Span,
}

impl SinkCommon {
    /// The common keys, as written in a `[[sink]]` table.
    pub(crate) fn keys() -> Vec<String> {
        let schema = schemars::schema_for!(SinkCommon);
        schema
            .get("properties")
            .and_then(|p| p.as_object())
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default()
    }
}

fn yes() -> bool {
    true
}
fn default_retry_min() -> Span {
    Span::millis(200)
}
fn default_retry_max() -> Span {
    Span::secs(30)
}
