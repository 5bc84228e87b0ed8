//! Joining the lines of one event (a stack trace, a pretty-printed message) into one
//! record: a line matching the start pattern begins an event, every other line continues
//! the open one. The open event is finished by the next start line, by `timeout` without
//! a new line, or when it would grow past `max_bytes`.
//!
//! An event keeps the byte range of its lines: `offset` of its first line (the event's
//! sequence number) and `end` after its last. The caller must treat lines held in a
//! [`Pending`] as not yet delivered (for the agent: no checkpoint passes them), so a
//! crash while an event is open reads its lines again.

use std::time::{Duration, Instant};

use regex::bytes::Regex;

use crate::config::ParserError;

/// A line going in, or a finished event coming out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event<'a> {
    /// Offset of the (event's first) line.
    pub offset: u64,
    /// Offset just after the (event's last) line.
    pub end: u64,
    /// The line; for an event, its lines joined with `\n`.
    pub bytes: &'a [u8],
}

/// The open event of one byte stream; empty when there is none.
#[derive(Debug, Default)]
pub struct Pending {
    bytes: Vec<u8>,
    offset: u64,
    end: u64,
    lines: usize,
    last: Option<Instant>,
    /// The last line taken was a piece of a split over-long line: the next piece is glued
    /// on without a newline, and is never a start.
    continues: bool,
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.lines == 0
    }

    fn take(&mut self, line: &[u8], offset: u64, end: u64, continues: bool, now: Instant) {
        self.bytes.clear();
        self.bytes.extend_from_slice(line);
        self.offset = offset;
        self.end = end;
        self.lines = 1;
        self.last = Some(now);
        self.continues = continues;
    }

    fn emit(&mut self, emit: &mut dyn FnMut(Event<'_>)) {
        if self.is_empty() {
            return;
        }
        emit(Event {
            offset: self.offset,
            end: self.end,
            bytes: &self.bytes,
        });
        self.lines = 0;
        self.continues = false;
        // Give back what one huge event took.
        if self.bytes.capacity() > 64 * 1024 {
            self.bytes = Vec::new();
        }
    }
}

/// The joining rule of one input.
#[derive(Debug)]
pub struct Multiline {
    start: Regex,
    timeout: Duration,
    max_bytes: usize,
}

impl Multiline {
    /// `start`: a regex that matches the first line of every event.
    pub fn new(start: &str, timeout: Duration, max_bytes: usize) -> Result<Multiline, ParserError> {
        Ok(Multiline {
            start: Regex::new(start)?,
            timeout,
            max_bytes: max_bytes.max(1),
        })
    }

    /// Feeds the next `line` of the stream whose open event is `p`; `continues` says the
    /// line is a piece of a split over-long line with more to come (no newline consumed).
    /// Calls `emit` with the event this line finishes, if any.
    pub fn push(
        &self,
        p: &mut Pending,
        line: Event<'_>,
        continues: bool,
        now: Instant,
        emit: &mut dyn FnMut(Event<'_>),
    ) {
        let Event {
            offset,
            end,
            bytes: line,
        } = line;
        if p.is_empty() {
            p.take(line, offset, end, continues, now);
            return;
        }
        let glue = usize::from(!p.continues);
        let starts = !p.continues && self.start.is_match(line);
        if starts || p.bytes.len() + glue + line.len() > self.max_bytes {
            p.emit(emit);
            p.take(line, offset, end, continues, now);
            return;
        }
        if glue == 1 {
            p.bytes.push(b'\n');
        }
        p.bytes.extend_from_slice(line);
        p.end = end;
        p.lines += 1;
        p.last = Some(now);
        p.continues = continues;
    }

    /// Finishes the open event if no line came for `timeout`. Returns whether it did.
    pub fn flush_expired(
        &self,
        p: &mut Pending,
        now: Instant,
        emit: &mut dyn FnMut(Event<'_>),
    ) -> bool {
        let expired = p
            .last
            .is_some_and(|t| now.saturating_duration_since(t) >= self.timeout);
        if expired && !p.is_empty() {
            p.emit(emit);
            return true;
        }
        false
    }

    /// Finishes the open event now (shutdown).
    pub fn flush(&self, p: &mut Pending, emit: &mut dyn FnMut(Event<'_>)) {
        p.emit(emit);
    }

    /// When the open event `p` expires, if there is one.
    pub fn deadline(&self, p: &Pending) -> Option<Instant> {
        if p.is_empty() {
            return None;
        }
        p.last.map(|t| t + self.timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Got = Vec<(u64, u64, String)>;

    fn feed(m: &Multiline, lines: &[&str]) -> (Got, Pending) {
        let now = Instant::now();
        let mut p = Pending::default();
        let mut got = Vec::new();
        let mut offset = 0;
        for line in lines {
            let end = offset + line.len() as u64 + 1;
            m.push(
                &mut p,
                Event {
                    offset,
                    end,
                    bytes: line.as_bytes(),
                },
                false,
                now,
                &mut |e| {
                    got.push((
                        e.offset,
                        e.end,
                        String::from_utf8_lossy(e.bytes).into_owned(),
                    ))
                },
            );
            offset = end;
        }
        (got, p)
    }

    #[test]
    fn stack_traces_are_joined_and_ranges_kept() {
        let m = Multiline::new(r"^\d{4}-", Duration::from_secs(1), 1 << 20).unwrap();
        let (got, mut p) = feed(
            &m,
            &[
                "2026-11-23 ERROR boom",
                "  at a.b(C.java:1)",
                "  at d.e(F.java:2)",
                "2026-11-23 INFO fine",
                "2026-11-23 WARN open",
                "  continued",
            ],
        );
        assert_eq!(
            got,
            [
                (
                    0,
                    60,
                    "2026-11-23 ERROR boom\n  at a.b(C.java:1)\n  at d.e(F.java:2)".into()
                ),
                (60, 81, "2026-11-23 INFO fine".into()),
            ]
        );
        // The last event stays open until the next start, the timeout or a flush.
        let mut rest = Vec::new();
        assert!(!m.flush_expired(&mut p, Instant::now(), &mut |e| rest.push(e.offset)));
        m.flush(&mut p, &mut |e| {
            rest.push(e.offset);
            assert_eq!(e.bytes, b"2026-11-23 WARN open\n  continued");
            assert_eq!(e.end, 81 + 21 + 12);
        });
        assert_eq!(rest, [81]);
        assert!(p.is_empty());
    }

    #[test]
    fn timeout_finishes_an_event_and_a_leading_continuation_is_its_own_event() {
        let m = Multiline::new(r"^START", Duration::from_millis(10), 1 << 20).unwrap();
        let (got, mut p) = feed(&m, &["orphan", "  more", "START x"]);
        assert_eq!(got, [(0, 14, "orphan\n  more".into())]);
        let mut out = Vec::new();
        let later = Instant::now() + Duration::from_millis(20);
        assert!(m.deadline(&p).is_some());
        assert!(m.flush_expired(&mut p, later, &mut |e| out.push(e.offset)));
        assert_eq!(out, [14]);
        assert!(m.deadline(&p).is_none());
    }

    #[test]
    fn max_bytes_cuts_events_and_split_pieces_are_glued_without_newline() {
        let m = Multiline::new(r"^S", Duration::from_secs(1), 10).unwrap();
        let (got, _) = feed(&m, &["S1234", "abcd", "efgh"]);
        // "S1234\nabcd" is 10 bytes; adding "\nefgh" would pass max_bytes.
        assert_eq!(got, [(0, 11, "S1234\nabcd".into())]);

        let now = Instant::now();
        let mut p = Pending::default();
        let mut got = Vec::new();
        let m = Multiline::new(r"^S", Duration::from_secs(1), 100).unwrap();
        // A split line: "S-lo" + "ng" (pieces, no newline consumed), then "S next".
        m.push(
            &mut p,
            Event {
                offset: 0,
                end: 4,
                bytes: b"S-lo",
            },
            true,
            now,
            &mut |_| {},
        );
        m.push(
            &mut p,
            Event {
                offset: 4,
                end: 8,
                bytes: b"Sng",
            },
            false,
            now,
            &mut |_| {},
        );
        m.push(
            &mut p,
            Event {
                offset: 8,
                end: 15,
                bytes: b"S next",
            },
            false,
            now,
            &mut |e| got.push(String::from_utf8_lossy(e.bytes).into_owned()),
        );
        // "Sng" continued a split piece: glued, and not taken as a start.
        assert_eq!(got, ["S-loSng"]);
    }
}
