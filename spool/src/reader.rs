//! The reader side: follows committed batches across segments.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use crate::segment::{
    self, Format, Probe, BATCH_HEADER_LEN, BATCH_HEADER_LEN_V1, MAX_BATCH_BYTES, SEGMENT_HEADER_LEN,
};
use crate::shared::Shared;
use crate::{Acknowledged, Damage, Position, SpoolError};

/// Reads committed batches in order, from a start position given to [`crate::Spool::reader`].
///
/// Readers are `Send` and independent: each has its own file handle and position and
/// only briefly locks the writer's table of committed lengths. Reads use positioned
/// I/O bounded by the committed length, so bytes the writer has appended but not
/// committed (which a failed append may still cut off) are never looked at.
pub struct SpoolReader {
    shared: Arc<Shared>,
    pos: Position,
    /// The open segment `pos.segment` and its batch format, if opened yet.
    file: Option<(File, Format)>,
    /// Committed length of `pos.segment` as last seen.
    limit: u64,
    /// The segment after `pos.segment`, once the writer has moved on to it: `limit`
    /// is then final and need not be looked up again.
    next_segment: Option<u64>,
}

impl std::fmt::Debug for SpoolReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpoolReader")
            .field("position", &self.pos)
            .finish_non_exhaustive()
    }
}

impl SpoolReader {
    pub(crate) fn new(shared: Arc<Shared>, pos: Position) -> SpoolReader {
        SpoolReader {
            shared,
            pos,
            file: None,
            limit: 0,
            next_segment: None,
        }
    }

    /// Where the next [`next`](Self::next) reads from.
    pub fn position(&self) -> Position {
        self.pos
    }

    /// Moves back to `pos`, a position this reader returned before and whose segment is
    /// still kept (at or after the reader's persisted cursor), to read it again.
    pub fn seek(&mut self, pos: Position) {
        self.pos = pos;
        self.file = None;
        self.limit = 0;
        self.next_segment = None;
    }

    /// Reads the next committed batch into `buf` (cleared first). Returns its position
    /// and the position right after it (what a sink stores as its cursor once the batch
    /// is delivered), or None when caught up.
    ///
    /// Damage is never skipped silently. In a version 2 segment a damaged stretch is
    /// [`SpoolError::Damaged`], naming the segment, the byte range, the batches lost and
    /// whether they had been acknowledged; the reader has moved past it to the next
    /// valid batch, so the next call goes on. In a version 1 segment (no magic to
    /// resynchronise on) a damaged batch is [`SpoolError::Checksum`] or
    /// [`SpoolError::Corrupt`] and the reader stays where it is.
    pub fn next(&mut self, buf: &mut Vec<u8>) -> Result<Option<(Position, Position)>, SpoolError> {
        buf.clear();
        if !self.locate()? {
            return Ok(None);
        }
        match self.file.as_ref().map(|(_, format)| *format) {
            Some(Format::V2) => self.next_v2(buf),
            _ => self.next_v1(buf),
        }
    }

    fn next_v2(&mut self, buf: &mut Vec<u8>) -> Result<Option<(Position, Position)>, SpoolError> {
        let seg = self.pos.segment;
        let at = self.pos.offset;
        let path = segment::path(&self.shared.dir, seg);
        let (file, _) = self
            .file
            .as_ref()
            .expect("located reader has its segment open");
        let io = |e| SpoolError::io("read segment", &path, e);
        let found = segment::probe(file, seg, at, self.limit, buf, true).map_err(io)?;
        if let Probe::Batch { len, .. } = found {
            let start = self.pos;
            self.pos.offset = at + BATCH_HEADER_LEN + u64::from(len);
            return Ok(Some((start, self.pos)));
        }
        // Only committed data is read, and committed means acknowledged, unless recovery
        // found this damage first and could not confirm that.
        let resync = segment::resync(file, seg, at, found, self.limit, buf).map_err(io)?;
        buf.clear();
        let (first_report, acknowledged) = self.shared.note_damage(self.pos, Acknowledged::Yes);
        let damage = Damage {
            path,
            from: self.pos,
            to: Position {
                segment: seg,
                offset: resync.next,
            },
            batches: resync.batches,
            acknowledged,
            reason: found.reason(),
        };
        self.pos = damage.to;
        Err(SpoolError::Damaged {
            damage: Box::new(damage),
            first_report,
        })
    }

    fn next_v1(&mut self, buf: &mut Vec<u8>) -> Result<Option<(Position, Position)>, SpoolError> {
        let seg = self.pos.segment;
        let at = self.pos.offset;
        let path = || segment::path(&self.shared.dir, seg);
        let corrupt = |reason: String| SpoolError::Corrupt {
            segment: seg,
            offset: at,
            path: path(),
            reason,
        };
        if at + BATCH_HEADER_LEN_V1 > self.limit {
            return Err(corrupt(format!(
                "a batch header at this offset would cross the committed end {} (is the start position a batch boundary?)",
                self.limit
            )));
        }
        let (file, _) = self
            .file
            .as_ref()
            .expect("located reader has its segment open");
        let mut header = [0u8; BATCH_HEADER_LEN_V1 as usize];
        file.read_exact_at(&mut header, at)
            .map_err(|e| SpoolError::io("read segment", &path(), e))?;
        let (len, crc) = segment::parse_batch_header_v1(&header);
        let end = at + BATCH_HEADER_LEN_V1 + u64::from(len);
        if len > MAX_BATCH_BYTES || end > self.limit {
            return Err(corrupt(format!(
                "batch length {len} runs past the committed end {} of the segment",
                self.limit
            )));
        }
        buf.resize(len as usize, 0);
        file.read_exact_at(buf, at + BATCH_HEADER_LEN_V1)
            .map_err(|e| SpoolError::io("read segment", &path(), e))?;
        if segment::batch_crc_v1(len, buf) != crc {
            buf.clear();
            return Err(SpoolError::Checksum {
                segment: seg,
                offset: at,
                path: path(),
            });
        }
        let start = self.pos;
        self.pos.offset = end;
        Ok(Some((start, self.pos)))
    }

    /// Moves to committed data if there is any: crosses into the next segment at the end
    /// of a closed one and opens the current segment. Returns false when caught up.
    fn locate(&mut self) -> Result<bool, SpoolError> {
        loop {
            if self.next_segment.is_none() {
                self.refresh()?;
            }
            if self.pos.offset < self.limit {
                if self.file.is_none() {
                    self.open()?;
                }
                return Ok(true);
            }
            match self.next_segment {
                Some(next) => {
                    self.pos = Position {
                        segment: next,
                        offset: SEGMENT_HEADER_LEN,
                    };
                    self.file = None;
                    self.limit = 0;
                    self.next_segment = None;
                }
                None => return Ok(false),
            }
        }
    }

    /// Looks up the committed length of the current segment and whether a later one exists.
    fn refresh(&mut self) -> Result<(), SpoolError> {
        let seg = self.pos.segment;
        let segments = self.shared.segments();
        let next = segments.range(seg + 1..).next().map(|(&id, _)| id);
        match segments.get(&seg) {
            Some(&len) => {
                self.limit = len;
                self.next_segment = next;
            }
            // Not published yet: the writer created it but has not committed into it.
            None if segments
                .last_key_value()
                .is_none_or(|(&last, _)| seg > last) => {}
            None => {
                drop(segments);
                let Some((file, _)) = &self.file else {
                    return Err(SpoolError::SegmentMissing {
                        segment: seg,
                        path: segment::path(&self.shared.dir, seg),
                    });
                };
                // Collected while we read it (our handle keeps the data). It was closed,
                // so all of it is committed: its size is its final length.
                let path = segment::path(&self.shared.dir, seg);
                self.limit = file
                    .metadata()
                    .map_err(|e| SpoolError::io("stat segment", &path, e))?
                    .len();
                self.next_segment = next;
            }
        }
        Ok(())
    }

    fn open(&mut self) -> Result<(), SpoolError> {
        let seg = self.pos.segment;
        let path = segment::path(&self.shared.dir, seg);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SpoolError::SegmentMissing { segment: seg, path });
            }
            Err(e) => return Err(SpoolError::io("open segment", &path, e)),
        };
        let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
        file.read_exact_at(&mut header, 0)
            .map_err(|e| SpoolError::io("read segment header", &path, e))?;
        let format = segment::check_header(&header, seg).map_err(|reason| SpoolError::Corrupt {
            segment: seg,
            offset: 0,
            path: path.clone(),
            reason,
        })?;
        self.file = Some((file, format));
        Ok(())
    }
}
