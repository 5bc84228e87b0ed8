//! What an input type declares about itself (a leaf: the input modules and the dispatch
//! in `mod.rs` build on it).

use crate::metrics::AgentMetrics;
use crate::pipeline::Input;
use crate::source::FileCheckpoint;

/// What an input type declares about itself; implemented by each type's config struct.
pub trait InputSpec {
    /// Unique input name; part of every source id and checkpoint.
    fn name(&self) -> &str;

    /// Checks what serde cannot.
    fn validate(&self) -> Result<(), String>;

    /// What `--check-config` prints for this input after its name.
    fn describe(&self) -> String;

    /// The running input, resuming from the checkpoints saved for it.
    fn build(&self, saved: &[FileCheckpoint], metrics: &AgentMetrics) -> anyhow::Result<Input>;
}
