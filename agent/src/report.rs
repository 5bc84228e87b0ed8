//! The agent's report: per (tag, event-time hour, source), the seqs of the events the
//! relays acknowledged. `sluice-relay reconcile` shows it as the "agents" column, so an
//! event the agent sent and no relay kept is named by source and seq.
//!
//! An acknowledgement adds its chunk's seqs ([`Sent`]); the report is saved with the
//! checkpoints, in the same atomic write, so after a crash it holds exactly what the
//! checkpoints do: lines acknowledged but not yet saved are read and sent again, with
//! the same seqs, and acknowledged again. Every `output.report_interval` the agent
//! sends it to a relay as one event of the reserved tag [`REPORT_TAG`], acknowledged
//! like a chunk and never spooled. A report is cumulative (a set of ranges per cell),
//! so sending it twice, to two relays or after a lost one, changes nothing: the relays
//! keep the union. It holds the last [`REPORT_HOURS`] hours; each send carries the
//! cells of the last [`RECENT_HOURS`] hours, and the first after a start all of them.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sluice_core::ranges::SeqRanges;
use sluice_forward::{encode_compressed_packed_forward, gzip_entries, write_entry, EventTime};

use crate::transform::HourRun;

pub use sluice_forward::REPORT_TAG;

/// Hours the report keeps, back from the newest hour in it.
pub const REPORT_HOURS: u64 = 48;
/// Hours each send carries, back from the newest (older cells rarely change).
pub const RECENT_HOURS: u64 = 3;

/// One cell as it is saved and sent.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Cell {
    pub tag: String,
    /// Hours since the epoch.
    pub hour: u64,
    pub source: String,
    pub seqs: SeqRanges,
}

/// What is sent: the record's `report` field holds this as JSON.
#[derive(Debug, Serialize, Deserialize)]
pub struct Wire {
    pub version: u32,
    pub agent: String,
    pub cells: Vec<Cell>,
}

#[derive(Debug, Default)]
pub struct Report {
    cells: BTreeMap<(String, u64, String), SeqRanges>,
    /// Cells added to since the last send.
    changed: bool,
    /// The next send carries every cell (after a start).
    send_all: bool,
}

impl Report {
    /// The report saved with the checkpoints (`sent`), if any.
    pub fn restore(saved: Option<serde_json::Value>) -> Report {
        let mut report = Report {
            send_all: true,
            ..Report::default()
        };
        if let Some(v) = saved {
            match serde_json::from_value::<Vec<Cell>>(v) {
                Ok(cells) => {
                    for c in cells {
                        report.cells.insert((c.tag, c.hour, c.source), c.seqs);
                    }
                    report.changed = !report.cells.is_empty();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the report saved with the checkpoints is unreadable; it starts empty (reconcile's agents column misses what was sent before)")
                }
            }
        }
        report
    }

    /// Adds an acknowledgement of `source`'s events of input `tag` (the chunks' runs).
    pub fn add(&mut self, tag: &str, source: &str, hours: &[HourRun]) {
        for run in hours.iter().filter(|r| r.events > 0) {
            let key = (tag.to_string(), run.hour, source.to_string());
            self.cells
                .entry(key)
                .or_default()
                .insert_range(run.first_seq, run.first_seq + run.events - 1);
            self.changed = true;
        }
        if let Some(newest) = self.newest() {
            let oldest = newest.saturating_sub(REPORT_HOURS);
            self.cells.retain(|(_, hour, _), _| *hour >= oldest);
        }
    }

    fn newest(&self) -> Option<u64> {
        self.cells.keys().map(|(_, hour, _)| *hour).max()
    }

    fn cells(&self, from_hour: u64) -> Vec<Cell> {
        self.cells
            .iter()
            .filter(|((_, hour, _), _)| *hour >= from_hour)
            .map(|((tag, hour, source), seqs)| Cell {
                tag: tag.clone(),
                hour: *hour,
                source: source.clone(),
                seqs: seqs.clone(),
            })
            .collect()
    }

    /// The chunk of the last [`chunk`](Self::chunk) could not be handed over: send again.
    pub fn send_later(&mut self) {
        self.changed = true;
    }

    /// What is saved with the checkpoints.
    pub fn saved(&self) -> Option<serde_json::Value> {
        if self.cells.is_empty() {
            return None;
        }
        serde_json::to_value(self.cells(0)).ok()
    }

    /// The frame to send and its chunk id, if something changed since the last one (or
    /// none was sent yet).
    pub fn frame(&mut self, agent: &str) -> Option<(String, Bytes)> {
        if !self.changed || self.cells.is_empty() {
            return None;
        }
        let from = if self.send_all {
            0
        } else {
            self.newest().unwrap_or(0).saturating_sub(RECENT_HOURS)
        };
        let wire = Wire {
            version: 1,
            agent: agent.to_string(),
            cells: self.cells(from),
        };
        let json = serde_json::to_vec(&wire).ok()?;
        let mut entries = Vec::with_capacity(json.len() + 32);
        write_entry(&mut entries, EventTime::now(), &[("report", &json)]);
        let id_bytes: [u8; 16] = rand::random();
        let id = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, id_bytes);
        let mut frame = Vec::with_capacity(json.len() / 2 + 128);
        encode_compressed_packed_forward(
            REPORT_TAG,
            &gzip_entries(&entries),
            1,
            &id,
            None,
            &mut frame,
        );
        self.changed = false;
        self.send_all = false;
        Some((id, Bytes::from(frame)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(runs: &[(u64, u64, u64)]) -> Vec<HourRun> {
        runs.iter()
            .map(|&(hour, first_seq, events)| HourRun {
                hour,
                first_seq,
                events,
            })
            .collect()
    }

    #[test]
    fn acknowledgements_add_ranges_that_survive_a_restart_and_old_hours_go() {
        let mut r = Report::restore(None);
        r.add("app", "a:1", &sent(&[(100, 0, 10), (101, 10, 5)]));
        r.add("app", "a:1", &sent(&[(101, 15, 5)]));
        // Acknowledged again after a crash: nothing new.
        r.add("app", "a:1", &sent(&[(100, 0, 10)]));
        let saved = r.saved().unwrap();
        let back = Report::restore(Some(saved));
        assert_eq!(back.cells, r.cells);
        assert_eq!(
            back.cells[&("app".into(), 101, "a:1".into())],
            SeqRanges::from_ranges([[10, 19]])
        );
        let mut r = back;
        r.add("app", "a:1", &sent(&[(100 + REPORT_HOURS + 1, 20, 1)]));
        assert!(r.cells.keys().all(|(_, h, _)| *h > 100), "{:?}", r.cells);
    }

    #[test]
    fn a_report_is_sent_when_it_changed_and_carries_recent_hours_after_the_first() {
        let mut r = Report::restore(None);
        assert!(r.frame("a").is_none());
        r.add("app", "a:1", &sent(&[(100, 0, 1), (110, 1, 1)]));
        let (_, first) = r.frame("a").unwrap();
        assert!(
            first
                .windows(REPORT_TAG.len())
                .any(|w| w == REPORT_TAG.as_bytes()),
            "a frame of the report tag"
        );
        assert!(r.frame("a").is_none(), "nothing changed");
        r.add("app", "a:1", &sent(&[(110, 2, 1)]));
        assert_eq!(r.cells(110 - RECENT_HOURS).len(), 1);
        assert!(r.frame("a").is_some());
    }
}
