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
//! keep the union. It holds the hours from [`REPORT_HOURS`] before the clock's to
//! [`FUTURE_HOURS`] after it (an event dated far off is sent, not reported); each send
//! carries the cells of the last [`RECENT_HOURS`] hours, and the first after a start and
//! every [`FULL_EVERY`]th all of them, in frames of at most [`CELLS_PER_FRAME`] cells.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sluice_core::ranges::SeqRanges;
use sluice_forward::{encode_compressed_packed_forward, gzip_entries, write_entry, EventTime};

use crate::transform::HourRun;

pub use sluice_forward::REPORT_TAG;

/// Hours the report keeps, back from the clock's hour ...
pub const REPORT_HOURS: u64 = 48;
/// ... and ahead of it.
pub const FUTURE_HOURS: u64 = 2;
/// Every this many sends carries the whole report (a relay that lost its copy gets it back).
pub const FULL_EVERY: u32 = 30;
/// Cells per report frame, at most (a frame stays far below the relay's `max_frame`).
pub const CELLS_PER_FRAME: usize = 5_000;
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
    /// Sends since the last whole one.
    sends: u32,
}

/// The clock's hour (hours since the epoch).
fn clock_hour() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 3600)
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
        self.add_at(tag, source, hours, clock_hour());
    }

    fn add_at(&mut self, tag: &str, source: &str, hours: &[HourRun], now_hour: u64) {
        let (oldest, newest) = (
            now_hour.saturating_sub(REPORT_HOURS),
            now_hour + FUTURE_HOURS,
        );
        for run in hours
            .iter()
            .filter(|r| r.events > 0 && (oldest..=newest).contains(&r.hour))
        {
            let key = (tag.to_string(), run.hour, source.to_string());
            self.cells
                .entry(key)
                .or_default()
                .insert_range(run.first_seq, run.first_seq + run.events - 1);
            self.changed = true;
        }
        self.cells.retain(|(_, hour, _), _| *hour >= oldest);
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

    /// The frames of the last [`frames`](Self::frames) could not all be handed over:
    /// the next send carries the whole report.
    pub fn send_later(&mut self) {
        self.changed = true;
        self.send_all = true;
    }

    /// What is saved with the checkpoints.
    pub fn saved(&self) -> Option<serde_json::Value> {
        if self.cells.is_empty() {
            return None;
        }
        serde_json::to_value(self.cells(0)).ok()
    }

    /// The frames to send, each with its chunk id, if something changed since the last
    /// send (or none was sent yet).
    pub fn frames(&mut self, agent: &str) -> Vec<(String, Bytes)> {
        if !self.changed || self.cells.is_empty() {
            return Vec::new();
        }
        let all = self.send_all || self.sends + 1 >= FULL_EVERY;
        let from = if all {
            0
        } else {
            self.newest().unwrap_or(0).saturating_sub(RECENT_HOURS)
        };
        let cells = self.cells(from);
        let mut frames = Vec::new();
        let mut cells = cells.into_iter().peekable();
        while cells.peek().is_some() {
            let wire = Wire {
                version: 1,
                agent: agent.to_string(),
                cells: cells.by_ref().take(CELLS_PER_FRAME).collect(),
            };
            if let Some(f) = Self::encode(&wire) {
                frames.push(f);
            }
        }
        self.changed = false;
        if all {
            self.send_all = false;
            self.sends = 0;
        } else {
            self.sends += 1;
        }
        frames
    }

    fn encode(wire: &Wire) -> Option<(String, Bytes)> {
        let json = serde_json::to_vec(wire).ok()?;
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
        r.add_at("app", "a:1", &sent(&[(100, 0, 10), (101, 10, 5)]), 101);
        r.add_at("app", "a:1", &sent(&[(101, 15, 5)]), 101);
        // Acknowledged again after a crash: nothing new.
        r.add_at("app", "a:1", &sent(&[(100, 0, 10)]), 101);
        // An event dated far ahead (a parsed time) is not reported, and empties nothing.
        r.add_at("app", "a:1", &sent(&[(9_000_000, 20, 1)]), 101);
        assert_eq!(r.cells.len(), 2);
        let saved = r.saved().unwrap();
        let back = Report::restore(Some(saved));
        assert_eq!(back.cells, r.cells);
        assert_eq!(
            back.cells[&("app".into(), 101, "a:1".into())],
            SeqRanges::from_ranges([[10, 19]])
        );
        let mut r = back;
        r.add_at(
            "app",
            "a:1",
            &sent(&[(101 + REPORT_HOURS, 20, 1)]),
            101 + REPORT_HOURS,
        );
        assert!(r.cells.keys().all(|(_, h, _)| *h > 100), "{:?}", r.cells);
    }

    #[test]
    fn a_report_is_sent_when_it_changed_and_carries_recent_hours_after_the_first() {
        let mut r = Report::restore(None);
        assert!(r.frames("a").is_empty());
        r.add_at("app", "a:1", &sent(&[(100, 0, 1), (110, 1, 1)]), 110);
        let frames = r.frames("a");
        assert_eq!(frames.len(), 1);
        let (_, first) = &frames[0];
        assert!(
            first
                .windows(REPORT_TAG.len())
                .any(|w| w == REPORT_TAG.as_bytes()),
            "a frame of the report tag"
        );
        assert!(r.frames("a").is_empty(), "nothing changed");
        r.add_at("app", "a:1", &sent(&[(110, 2, 1)]), 110);
        assert_eq!(r.cells(110 - RECENT_HOURS).len(), 1);
        assert_eq!(r.frames("a").len(), 1);
        // Many cells: several frames, each bounded.
        for i in 0..(CELLS_PER_FRAME as u64 * 2 + 1) {
            r.add_at("app", &format!("a:{i}"), &sent(&[(110, 0, 1)]), 110);
        }
        r.send_later();
        assert_eq!(r.frames("a").len(), 3);
    }
}
