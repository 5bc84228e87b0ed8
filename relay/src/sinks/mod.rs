//! The relay's sinks: one folder per sink type, dispatched in one place.
//!
//! Each folder (`kafka/`, `object/`, `file/`, `discard/`) holds everything about its
//! type: the config struct (its keys, defaults and docs), validation, the one-line
//! summary `--check-config` prints, building the running [`Deliver`], and reading back
//! what really landed for `sluice-relay reconcile`. The config struct implements
//! [`SinkSpec`]; the [`sink_kinds!`] list below is the only place that names every type.
//!
//! Adding a sink type: a new folder with a config struct implementing [`SinkSpec`] and a
//! [`Deliver`], plus one line in [`sink_kinds!`]. The driver ([`run_sink`]), the ledger,
//! the docs tables and the report pick it up from there.
//!
//! Keys every sink has (`name`, `enabled`, `required`, `start_from`, retries) live once,
//! in [`SinkCommon`].

mod common;
mod driver;
mod spec;
pub mod state;

pub mod discard;
pub mod file;
pub mod kafka;
pub mod object;

use serde::{Deserialize, Serialize};

pub use common::{SinkCommon, StartFrom};
pub use driver::{lag_bytes, run_sink, SinkProgress, SinkRun};
pub use spec::{
    Deliver, DeliverError, DeliverFuture, Delivered, Gathered, ReadBackContext, SinkContext,
    SinkSpec,
};
pub use state::{SinkState, SinkStateFile};

/// Declares the sink types: the `SinkKind` enum (serde `type` key), the list of type
/// names, and the one dispatch to each type's [`SinkSpec`].
macro_rules! sink_kinds {
    ($( $(#[$doc:meta])* $variant:ident($config:ty) = $type_name:literal, )+) => {
        /// A sink's type and its type-specific keys (`type = "..."`).
        #[derive(Clone, Debug, Deserialize, Serialize, schemars::JsonSchema)]
        #[serde(tag = "type", deny_unknown_fields)]
        pub enum SinkKind {
            $( $(#[$doc])* #[serde(rename = $type_name)] $variant($config), )+
        }

        impl SinkKind {
            /// Every sink type, as written in `type = "..."`.
            pub const TYPES: &'static [&'static str] = &[$($type_name),+];

            pub fn type_name(&self) -> &'static str {
                match self { $(SinkKind::$variant(_) => $type_name,)+ }
            }

            /// The type's own declaration.
            pub fn spec(&self) -> &dyn SinkSpec {
                match self { $(SinkKind::$variant(c) => c,)+ }
            }

            /// The JSON schema of each type's keys (for the generated docs tables).
            pub fn schemas() -> Vec<(&'static str, schemars::Schema)> {
                vec![$(($type_name, schemars::schema_for!($config)),)+]
            }
        }
    };
}

sink_kinds! {
    /// Kafka, through librdkafka: one message per event.
    Kafka(kafka::KafkaSink) = "kafka",
    /// Object storage (S3, GCS, Azure, a local directory): gzip NDJSON per tag and hour.
    ObjectStore(object::ObjectSink) = "object_store",
    /// Appends the JSON envelopes to a local file; for debugging.
    File(file::FileSink) = "file",
    /// Counts and forgets; for benchmarks.
    Discard(discard::DiscardSink) = "discard",
}

/// One `[[sink]]`: the keys every sink has, then its type's keys.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(try_from = "toml::Table", into = "toml::Table")]
pub struct SinkConfig {
    pub common: SinkCommon,
    pub kind: SinkKind,
}

impl std::ops::Deref for SinkConfig {
    type Target = SinkCommon;
    fn deref(&self) -> &SinkCommon {
        &self.common
    }
}

// serde cannot combine `flatten` with `deny_unknown_fields`, and a typo in a sink key
// must be an error, so the table is split by hand: common keys, then the type's keys.
impl TryFrom<toml::Table> for SinkConfig {
    type Error = String;
    fn try_from(mut table: toml::Table) -> Result<Self, String> {
        let mut common = toml::Table::new();
        for key in SinkCommon::keys() {
            if let Some(v) = table.remove(&key) {
                common.insert(key, v);
            }
        }
        let name = common
            .get("name")
            .and_then(|v| v.as_str())
            .unwrap_or("?")
            .to_string();
        let common: SinkCommon = common
            .try_into()
            .map_err(|e: toml::de::Error| format!("sink {name:?}: {}", e.message()))?;
        if !table.contains_key("type") {
            return Err(format!(
                "sink {name:?}: missing key `type` (one of {})",
                SinkKind::TYPES.join(", ")
            ));
        }
        let kind: SinkKind = table
            .try_into()
            .map_err(|e: toml::de::Error| format!("sink {name:?}: {}", e.message()))?;
        Ok(SinkConfig { common, kind })
    }
}

impl From<SinkConfig> for toml::Table {
    fn from(s: SinkConfig) -> toml::Table {
        let mut t = toml::Table::try_from(&s.common).unwrap_or_default();
        if let Ok(kind) = toml::Table::try_from(&s.kind) {
            t.extend(kind);
        }
        t
    }
}
