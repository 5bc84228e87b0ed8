//! The state the spool's writer publishes to its readers. In a module of its own so that
//! the writer (`spool.rs`, which makes readers) and the readers (`reader.rs`) both
//! depend on it and not on each other.

use std::collections::BTreeMap;

use crate::{Acknowledged, Position};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

/// What the writer shares with readers: the live segments and how many bytes of each
/// are committed. The newest entry's length is the committed end of the log. A batch
/// becomes visible only when [`Spool::commit`](crate::Spool::commit) publishes it here.
pub(crate) struct Shared {
    pub dir: PathBuf,
    segments: Mutex<BTreeMap<u64, u64>>,
    /// Damaged stretches reported so far, by where they start, so each is counted once
    /// and keeps the acknowledgement state recovery found for it.
    damage: Mutex<BTreeMap<Position, Acknowledged>>,
}

impl Shared {
    pub(crate) fn new(dir: PathBuf, segments: BTreeMap<u64, u64>) -> Self {
        Shared {
            dir,
            segments: Mutex::new(segments),
            damage: Mutex::new(BTreeMap::new()),
        }
    }

    pub(crate) fn segments(&self) -> MutexGuard<'_, BTreeMap<u64, u64>> {
        // The map is only ever replaced entry by entry; a panic elsewhere cannot leave it
        // half-updated, so a poisoned lock is still usable.
        self.segments.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records damage starting at `from`. Returns whether it is new, and the
    /// acknowledgement state to report (the one recorded first).
    pub(crate) fn note_damage(&self, from: Position, ack: Acknowledged) -> (bool, Acknowledged) {
        let mut damage = self.damage.lock().unwrap_or_else(|e| e.into_inner());
        match damage.get(&from) {
            Some(&known) => (false, known),
            None => {
                damage.insert(from, ack);
                (true, ack)
            }
        }
    }

    /// Forgets damage in segments before `segment` (they were collected).
    pub(crate) fn forget_damage_before(&self, segment: u64) {
        let mut damage = self.damage.lock().unwrap_or_else(|e| e.into_inner());
        damage.retain(|p, _| p.segment >= segment);
    }
}
