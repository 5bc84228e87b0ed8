//! The first stage of the agent's pipeline: a [`Source`] produces lines, each belonging
//! to one byte stream ([`SourceId`]) with a position, and later learns which positions
//! the relay acknowledged.
//!
//! The contract every source keeps, and the pipeline relies on: lines of one `SourceId`
//! come in order with growing offsets; [`Source::commit`] is called only with positions
//! the relay acknowledged (the pipeline applies acks, nothing else), and
//! [`Source::checkpoints`] never reports a position past the last commit. So a crash at
//! any point re-reads from the last acknowledged line.
//!
//! Today the tailer is the one source ([`crate::inputs::tail`]); inputs that receive
//! (forward, HTTP, syslog) will implement the same trait with no checkpoints of their own.

pub use sluice_tail::{FileCheckpoint, Line, SourceId, TailStats as SourceStats};

/// Why reading a source failed this turn; the pipeline logs it and polls again.
pub type SourceError = Box<dyn std::error::Error + Send + Sync>;

pub trait Source: Send {
    /// Looks for new files (or whatever the source reads from); called every 250 ms.
    fn discover(&mut self) -> Result<(), SourceError>;

    /// Reads at most `max_bytes` and hands every line to `out`; returns the bytes read
    /// (0: nothing new).
    fn poll(
        &mut self,
        max_bytes: usize,
        out: &mut dyn FnMut(Line<'_>),
    ) -> Result<usize, SourceError>;

    /// The relay acknowledged everything of `source` up to `end`, and its events up to
    /// (not including) seq `next_seq`: both are saved in the checkpoint.
    fn commit(&mut self, source: &SourceId, end: u64, next_seq: u64);

    /// Calls `f` with every source this input may still hand out lines of.
    fn followed(&self, f: &mut dyn FnMut(&SourceId));

    /// The positions to persist: never past the last commit.
    fn checkpoints(&self) -> Vec<FileCheckpoint>;

    /// Counters and gauges for the agent's metrics.
    fn stats(&self) -> SourceStats;
}
