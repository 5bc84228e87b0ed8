//! The agent's inputs: one module per input type, dispatched in one place.
//!
//! Each input type declares its config struct (keys, defaults, docs) and implements
//! [`InputSpec`]: validation, the `--check-config` summary, and building its running
//! [`Input`] — a [`Source`] plus the transform chain its events go through. The
//! [`input_kinds!`] list is the only place that names every type.
//!
//! Adding an input type: a new module with a config struct implementing [`InputSpec`]
//! and a [`Source`], plus one line in [`input_kinds!`].

mod spec;
pub mod tail;

use serde::{Deserialize, Serialize};

pub use spec::InputSpec;

/// Declares the input types: the `InputConfig` enum (serde `type` key), the list of
/// type names, and the one dispatch to each type's [`InputSpec`].
macro_rules! input_kinds {
    ($( $(#[$doc:meta])* $variant:ident($config:ty) = $type_name:literal, )+) => {
        /// An input's type and its keys (`type = "..."`).
        #[derive(Clone, Debug, Deserialize, Serialize, schemars::JsonSchema)]
        #[serde(deny_unknown_fields, tag = "type")]
        pub enum InputConfig {
            $( $(#[$doc])* #[serde(rename = $type_name)] $variant($config), )+
        }

        impl InputConfig {
            /// Every input type, as written in `type = "..."`.
            pub const TYPES: &'static [&'static str] = &[$($type_name),+];

            /// The type's own declaration.
            pub fn spec(&self) -> &dyn InputSpec {
                match self { $(InputConfig::$variant(c) => c,)+ }
            }

            /// The JSON schema of each type's keys (for the generated docs tables).
            pub fn schemas() -> Vec<(&'static str, schemars::Schema)> {
                vec![$(($type_name, schemars::schema_for!($config)),)+]
            }
        }
    };
}

input_kinds! {
    /// Follows files matched by globs, rotation-safe, with checkpoints.
    Tail(tail::TailInput) = "tail",
}
