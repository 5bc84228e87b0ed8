//! The writer side: open and recover, append, commit, roll, cursors, snapshots, gc.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, IoSlice, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::reader::SpoolReader;
use crate::segment::{
    self, Scan, ScanV1, ScanV2, BATCH_HEADER_LEN, MAX_BATCH_BYTES, SEGMENT_HEADER_LEN,
};
use crate::shared::Shared;
use crate::state::{self, SnapshotFile};
use crate::{Acknowledged, Damage, FsyncPolicy, Position, Recovery, SpoolConfig, SpoolError};

/// The spool's writer. See the crate docs for the guarantees.
pub struct Spool {
    dir: PathBuf,
    cfg: SpoolConfig,
    /// Held for the flock; closing it releases the lock.
    _lock: File,
    shared: Arc<Shared>,
    /// Live segments and their appended (not necessarily committed) length.
    segments: BTreeMap<u64, u64>,
    active: File,
    active_id: u64,
    active_len: u64,
    used: u64,
    /// Oldest segment whose length changed since the last publish.
    unpublished_from: u64,
    /// The end of the log at the last commit: everything before it was acknowledged.
    /// Written into every batch header, so that recovery can tell acknowledged damage
    /// from an interrupted commit.
    committed_end: Position,
    /// Appended data not yet synced.
    dirty: bool,
    last_sync: Instant,
    cursors: BTreeMap<String, Position>,
    snapshots: BTreeMap<String, Position>,
    /// Set when a failed write or fsync leaves the file state unknown.
    poisoned: Option<String>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.dir)
            .field("head", &self.head())
            .field("tail", &self.tail())
            .field("used", &self.used)
            .finish_non_exhaustive()
    }
}

impl Spool {
    /// Opens or creates the spool in `dir`, taking its exclusive lock, and recovers from
    /// an unclean stop: the newest segment's torn tail is truncated, damaged segments
    /// and state files are set aside as `*.corrupt`. Fails only on I/O errors (or the lock).
    pub fn open(dir: &Path, cfg: SpoolConfig) -> Result<(Spool, Recovery), SpoolError> {
        fs::create_dir_all(dir).map_err(|e| SpoolError::io("create spool directory", dir, e))?;
        let lock = state::lock(dir)?;
        let names = list(dir)?;
        state::remove_temp_files(dir, &names);

        let mut ids: Vec<u64> = names
            .iter()
            .filter_map(|n| segment::parse_name(n))
            .collect();
        ids.sort_unstable();
        // Never reuse the id of a segment set aside earlier: its .corrupt file keeps the name.
        let highest_seen = names
            .iter()
            .filter_map(|n| {
                n.split_once(".seg.corrupt")
                    .and_then(|(id, _)| segment::parse_name(&format!("{id}.seg")))
            })
            .chain(ids.iter().copied())
            .max();

        let mut rec = Recovery::default();
        let mut segments = BTreeMap::new();
        let mut dir_changed = false;
        let newest = ids.last().copied();
        // Whether the newest segment has today's batch format (the writer appends to no other).
        let mut newest_is_v2 = false;
        let mut v2: Vec<(u64, PathBuf, ScanV2)> = Vec::new();
        for &id in &ids {
            let path = segment::path(dir, id);
            let damage = match segment::scan(&path, id)? {
                Scan::V2(scan) => {
                    v2.push((id, path, scan));
                    continue;
                }
                Scan::V1(ScanV1::Clean { len, batches }) => {
                    segments.insert(id, len);
                    rec.batches += batches;
                    continue;
                }
                Scan::V1(ScanV1::Torn {
                    valid_len,
                    file_len,
                    batches,
                }) if Some(id) == newest => {
                    truncate_torn(&path, id, valid_len)?;
                    tracing::warn!(segment = id, path = %path.display(), offset = valid_len, bytes = file_len - valid_len,
                        "spool: truncated the torn tail of the newest segment (appends interrupted by a crash; with fsync = always they were never acknowledged)");
                    rec.torn_bytes_truncated += file_len - valid_len;
                    rec.batches += batches;
                    segments.insert(id, valid_len.max(SEGMENT_HEADER_LEN));
                    // A header rewritten by the repair is a version 2 header.
                    newest_is_v2 = valid_len < SEGMENT_HEADER_LEN;
                    continue;
                }
                // Older segments were synced when the writer rolled past them: an
                // incomplete tail there is damage, not an interrupted append.
                Scan::V1(ScanV1::Torn { valid_len, .. }) => (
                    valid_len,
                    "incomplete batch at the end of a segment that is not the newest".to_string(),
                ),
                Scan::V1(ScanV1::Corrupt { offset, reason }) => (offset, reason),
                Scan::BadHeader { reason } => (0, reason),
            };
            let aside = state::set_aside(&path)?;
            tracing::error!(segment = id, offset = damage.0, reason = %damage.1, moved_to = %aside.display(),
                "spool: damaged segment set aside; its batches are not delivered");
            rec.corrupt_segments.push(aside);
            dir_changed = true;
        }

        let cursors_path = dir.join(state::CURSORS_FILE);
        let (cursors, committed_at_close) = match state::load_cursors(&cursors_path) {
            Ok(c) => c.unwrap_or_default(),
            Err(e @ SpoolError::StateFile { .. }) => {
                let aside = state::set_aside(&cursors_path)?;
                tracing::error!(error = %e, moved_to = %aside.display(), "spool: cursors file unreadable; starting without persisted cursors");
                rec.corrupt_state_files.push(aside);
                (BTreeMap::new(), None)
            }
            Err(e) => return Err(e),
        };
        // Committed marks only grow along the log, so the last valid batch holds the
        // highest: damage that ends before it had been committed, and so acknowledged.
        // The cursors file records the committed end when it was last written (at every
        // cursor change and at a clean close), which covers the last commit group too.
        let last_committed = v2
            .iter()
            .rev()
            .find_map(|(_, _, s)| s.last_committed)
            .max(committed_at_close);
        for (id, path, scan) in v2 {
            let (len, batches) = resolve_damage(&path, id, scan, newest, last_committed, &mut rec)?;
            segments.insert(id, len);
            rec.batches += batches;
            newest_is_v2 |= Some(id) == newest;
        }

        // Keep appending to the newest segment if it survived and has today's format;
        // otherwise start a new one.
        let (active, active_id, active_len) = match segments.last_key_value() {
            Some((&id, &len)) if Some(id) == newest && newest_is_v2 => {
                let path = segment::path(dir, id);
                let mut f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| SpoolError::io("open segment for appending", &path, e))?;
                f.seek(SeekFrom::Start(len))
                    .map_err(|e| SpoolError::io("seek in segment", &path, e))?;
                (f, id, len)
            }
            _ => {
                let id = highest_seen.map_or(0, |h| h + 1);
                let f = create_segment(dir, id)?;
                segments.insert(id, SEGMENT_HEADER_LEN);
                dir_changed = true;
                (f, id, SEGMENT_HEADER_LEN)
            }
        };
        if dir_changed {
            // Makes renames and the new segment's directory entry durable before
            // anything is appended to it.
            state::sync_dir(dir)?;
        }

        let mut snapshots = BTreeMap::new();
        for name in names.iter().filter_map(|n| state::parse_snapshot_name(n)) {
            let path = state::snapshot_path(dir, name);
            match state::read_snapshot_file(&path) {
                Ok(Some(SnapshotFile::V1 { at, .. })) => {
                    snapshots.insert(name.to_string(), at);
                }
                Ok(None) => {}
                Err(e @ SpoolError::StateFile { .. }) => {
                    let aside = state::set_aside(&path)?;
                    tracing::error!(error = %e, moved_to = %aside.display(), "spool: snapshot unreadable; treated as absent");
                    rec.corrupt_state_files.push(aside);
                }
                Err(e) => return Err(e),
            }
        }

        let used = segments.values().sum();
        rec.segments = segments.len();
        rec.bytes = used;
        let shared = Arc::new(Shared::new(dir.to_path_buf(), segments.clone()));
        for d in &rec.damaged {
            shared.note_damage(d.from, d.acknowledged);
        }
        let spool = Spool {
            dir: dir.to_path_buf(),
            cfg,
            _lock: lock,
            shared,
            segments,
            active,
            active_id,
            active_len,
            used,
            unpublished_from: active_id,
            // What recovery kept was committed before, or is now: nothing of it will be
            // resent as unacknowledged.
            committed_end: Position {
                segment: active_id,
                offset: active_len,
            },
            dirty: false,
            last_sync: Instant::now(),
            cursors,
            snapshots,
            poisoned: None,
        };
        Ok((spool, rec))
    }

    /// The spool's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends one batch and returns its position. The batch becomes visible to readers
    /// (and, per the fsync policy, durable) at the next [`commit`](Self::commit).
    ///
    /// Rolls to a new segment first if the batch would push the active one past
    /// `segment_bytes`. One vectored write per batch, no allocation. If the write fails
    /// (e.g. disk full), the partial bytes are cut off again and the spool stays usable.
    pub fn append(&mut self, payload: &[u8]) -> Result<Position, SpoolError> {
        self.check_poisoned()?;
        if payload.len() > MAX_BATCH_BYTES as usize {
            return Err(SpoolError::BatchTooLarge {
                len: payload.len(),
                max: MAX_BATCH_BYTES,
            });
        }
        let size = BATCH_HEADER_LEN + payload.len() as u64;
        if self.active_len > SEGMENT_HEADER_LEN && self.active_len + size > self.cfg.segment_bytes {
            self.roll()?;
        }
        let pos = Position {
            segment: self.active_id,
            offset: self.active_len,
        };
        let header = segment::batch_header(pos, self.committed_end, payload);
        // A crash during this write leaves an incomplete batch at the end of the newest
        // segment: recovery truncates it, and since it was never committed, it was never
        // acknowledged nor seen by a reader.
        if let Err(e) = write_all_2(&mut self.active, &header, payload) {
            self.undo_partial_write();
            return Err(SpoolError::io(
                "append to segment",
                &segment::path(&self.dir, self.active_id),
                e,
            ));
        }
        self.active_len += size;
        self.used += size;
        self.segments.insert(self.active_id, self.active_len);
        self.dirty = true;
        Ok(pos)
    }

    /// Makes every appended batch durable per the policy (`Always`: fdatasync now;
    /// `Interval`: if due; `Never`: no sync) and then visible to readers. Returns
    /// whether it synced.
    ///
    /// If fdatasync fails, the spool is poisoned: after a failed fsync Linux may have
    /// dropped the dirty pages, so retrying could report success for lost data. The
    /// batches are not published; reopening the spool recovers what reached the disk.
    pub fn commit(&mut self) -> Result<bool, SpoolError> {
        self.check_poisoned()?;
        let due = match self.cfg.fsync {
            FsyncPolicy::Always => true,
            FsyncPolicy::Interval(every) => self.last_sync.elapsed() >= every,
            FsyncPolicy::Never => false,
        };
        let synced = due && self.dirty && self.sync_active()?;
        self.publish();
        Ok(synced)
    }

    /// fdatasyncs the active segment now, whatever the policy (e.g. at shutdown with
    /// `Interval`), and publishes what was appended. Closed segments were synced when the
    /// writer rolled past them, except under `Never`. Returns whether it synced.
    pub fn sync(&mut self) -> Result<bool, SpoolError> {
        self.check_poisoned()?;
        let synced = self.dirty && self.sync_active()?;
        self.publish();
        Ok(synced)
    }

    /// Bytes on disk in live segments (headers and uncommitted batches included).
    pub fn used_bytes(&self) -> u64 {
        self.used
    }

    /// Whether live segments reached `max_bytes`: stop accepting until [`gc`](Self::gc) frees space.
    pub fn is_full(&self) -> bool {
        self.used >= self.cfg.max_bytes
    }

    /// Position of the oldest live batch (where a reader starting at "oldest" begins).
    pub fn head(&self) -> Position {
        let first = self
            .segments
            .keys()
            .next()
            .copied()
            .unwrap_or(self.active_id);
        Position {
            segment: first,
            offset: SEGMENT_HEADER_LEN,
        }
    }

    /// The end of the log including uncommitted appends: the position the next batch
    /// gets unless the writer rolls first. A reader starting here sees only new batches.
    pub fn tail(&self) -> Position {
        Position {
            segment: self.active_id,
            offset: self.active_len,
        }
    }

    /// Segment of the current tail; changes when the writer rolls.
    pub fn active_segment(&self) -> u64 {
        self.active_id
    }

    /// A reader of committed batches starting at `from`. A position before
    /// [`head`](Self::head) starts at the head; one past [`tail`](Self::tail) (a cursor
    /// saved before a power loss took unsynced data) starts at the tail; one in a segment
    /// that was set aside starts at the next live segment. The last two are logged.
    pub fn reader(&self, from: Position) -> Result<SpoolReader, SpoolError> {
        let mut pos = from;
        pos.offset = pos.offset.max(SEGMENT_HEADER_LEN);
        let head = self.head();
        let tail = self.tail();
        if pos < head {
            pos = head;
        } else if pos > tail {
            tracing::warn!(from = %from, tail = %tail, "spool reader asked to start past the end of the spool (data lost by a crash with fsync off?); starting at the end");
            pos = tail;
        } else {
            match self.segments.get(&pos.segment) {
                // The end of a closed segment is the start of the next one; moving there
                // means the reader does not need the old segment's file at all.
                Some(&len) if pos.offset >= len && pos.segment != self.active_id => {
                    let next = self
                        .segments
                        .range(pos.segment + 1..)
                        .next()
                        .map(|(&id, _)| id);
                    pos = Position {
                        segment: next.unwrap_or(self.active_id),
                        offset: SEGMENT_HEADER_LEN,
                    };
                }
                Some(_) => {}
                None => {
                    let next = self.segments.range(pos.segment..).next().map(|(&id, _)| id);
                    let next = Position {
                        segment: next.unwrap_or(self.active_id),
                        offset: SEGMENT_HEADER_LEN,
                    };
                    tracing::warn!(from = %from, start = %next, "spool reader asked to start in a segment that was set aside as damaged; starting at the next live segment");
                    pos = next;
                }
            }
        }
        Ok(SpoolReader::new(self.shared.clone(), pos))
    }

    /// The persisted cursors, by sink name.
    pub fn cursors(&self) -> BTreeMap<String, Position> {
        self.cursors.clone()
    }

    /// Sets and persists a sink's cursor (the position after the last delivered batch).
    /// Garbage collection keeps every segment from the oldest cursor's segment on.
    pub fn set_cursor(&mut self, sink: &str, pos: Position) -> Result<(), SpoolError> {
        if sink.is_empty() {
            return Err(SpoolError::InvalidName {
                what: "cursor",
                name: String::new(),
                rule: "must not be empty",
            });
        }
        if self.cursors.get(sink) == Some(&pos) {
            return Ok(());
        }
        let mut next = self.cursors.clone();
        next.insert(sink.to_string(), pos);
        self.persist_cursors(next)
    }

    /// Removes a sink's cursor (e.g. the sink was removed from the config), so its
    /// unread data can be collected.
    pub fn remove_cursor(&mut self, sink: &str) -> Result<(), SpoolError> {
        if !self.cursors.contains_key(sink) {
            return Ok(());
        }
        let mut next = self.cursors.clone();
        next.remove(sink);
        self.persist_cursors(next)
    }

    fn persist_cursors(&mut self, next: BTreeMap<String, Position>) -> Result<(), SpoolError> {
        // The in-memory cursors (which bound gc) change only once the file is durable:
        // if gc used a cursor that a crash then rolled back, it could delete segments
        // the restarted sink still needs.
        let path = self.dir.join(state::CURSORS_FILE);
        let bytes = state::encode_cursors(&next, Some(self.committed_end));
        state::write_atomically(&self.dir, &path, &bytes)?;
        self.cursors = next;
        Ok(())
    }

    /// Syncs everything appended and records the committed end with the cursors, so
    /// that the next recovery can tell that the last commit group had been acknowledged
    /// (no later batch header can say so). Call it at a clean stop; a crash without it
    /// loses nothing, recovery is only more careful with damage in the last commit.
    pub fn close(&mut self) -> Result<(), SpoolError> {
        self.sync()?;
        self.persist_cursors(self.cursors.clone())
    }

    /// Persists a named snapshot taken "at" `at` (e.g. the relay's dedup table as of the
    /// start of a segment). Segments at or after the oldest snapshot's segment are kept.
    /// The previous snapshot of that name is replaced atomically.
    pub fn write_snapshot(
        &mut self,
        name: &str,
        at: Position,
        bytes: &[u8],
    ) -> Result<(), SpoolError> {
        state::check_name("snapshot", name)?;
        let path = state::snapshot_path(&self.dir, name);
        state::write_atomically(&self.dir, &path, &state::encode_snapshot(at, bytes))?;
        self.snapshots.insert(name.to_string(), at);
        Ok(())
    }

    /// The named snapshot and its position, or None if there is none.
    pub fn read_snapshot(&self, name: &str) -> Result<Option<(Position, Vec<u8>)>, SpoolError> {
        state::check_name("snapshot", name)?;
        let path = state::snapshot_path(&self.dir, name);
        Ok(state::read_snapshot_file(&path)?.map(|SnapshotFile::V1 { at, bytes }| (at, bytes)))
    }

    /// Deletes, oldest first, the segments that every cursor and every snapshot is past
    /// (never the active one), and returns the bytes freed. With no cursors and no
    /// snapshots every closed segment is collected.
    ///
    /// A reader that already opened a collected segment keeps reading it (the open file
    /// outlives the name); a reader without a cursor that is behind gets
    /// [`SpoolError::SegmentMissing`].
    pub fn gc(&mut self) -> Result<u64, SpoolError> {
        let bound = self
            .cursors
            .values()
            .chain(self.snapshots.values())
            .map(|p| p.segment)
            .chain([self.active_id])
            .min()
            .unwrap_or(self.active_id);
        let victims: Vec<(u64, u64)> = self
            .segments
            .range(..bound)
            .map(|(&id, &len)| (id, len))
            .collect();
        let mut freed = 0;
        for (id, len) in victims {
            // Unpublish first so no reader starts opening a file that is about to go.
            self.shared.segments().remove(&id);
            let path = segment::path(&self.dir, id);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    self.shared.segments().insert(id, len);
                    return Err(SpoolError::io("delete collected segment", &path, e));
                }
            }
            // No directory fsync: if a crash undoes the unlink, the segment is simply
            // found again at the next open and collected again.
            self.segments.remove(&id);
            self.used -= len;
            freed += len;
            tracing::debug!(segment = id, bytes = len, "spool segment collected");
        }
        self.shared.forget_damage_before(bound.min(self.active_id));
        Ok(freed)
    }

    fn check_poisoned(&self) -> Result<(), SpoolError> {
        match &self.poisoned {
            Some(cause) => Err(SpoolError::Poisoned {
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    fn sync_active(&mut self) -> Result<bool, SpoolError> {
        let path = segment::path(&self.dir, self.active_id);
        if let Err(e) = self.active.sync_data() {
            let err = SpoolError::io("fdatasync segment", &path, e);
            self.poisoned = Some(err.to_string());
            return Err(err);
        }
        self.dirty = false;
        self.last_sync = Instant::now();
        Ok(true)
    }

    /// Makes everything appended so far visible to readers: committed. The caller
    /// acknowledges it next.
    fn publish(&mut self) {
        let mut shared = self.shared.segments();
        for (&id, &len) in self.segments.range(self.unpublished_from..) {
            shared.insert(id, len);
        }
        self.unpublished_from = self.active_id;
        self.committed_end = Position {
            segment: self.active_id,
            offset: self.active_len,
        };
    }

    /// Closes the active segment and starts the next.
    ///
    /// Unless the policy is `Never`, the old segment is fdatasynced first: recovery
    /// treats an incomplete tail in any segment but the newest as damage, so an older
    /// segment must be complete on disk before a newer one can receive data.
    fn roll(&mut self) -> Result<(), SpoolError> {
        if self.cfg.fsync != FsyncPolicy::Never && self.dirty {
            self.sync_active()?;
        }
        let id = self.active_id + 1;
        let file = create_segment(&self.dir, id)?;
        if self.cfg.fsync != FsyncPolicy::Never {
            // The new file's directory entry must be durable before data synced into it
            // is acknowledged; its header is covered by the next fdatasync.
            if let Err(e) = state::sync_dir(&self.dir) {
                // Stay on the old segment; remove the new file so the next roll can create it again.
                drop(file);
                let _ = fs::remove_file(segment::path(&self.dir, id));
                return Err(e);
            }
        }
        self.active = file;
        self.active_id = id;
        self.active_len = SEGMENT_HEADER_LEN;
        self.used += SEGMENT_HEADER_LEN;
        self.segments.insert(id, SEGMENT_HEADER_LEN);
        tracing::debug!(segment = id, "spool rolled to a new segment");
        Ok(())
    }

    /// Cuts off what a failed append left behind, so the next batch starts at a batch
    /// boundary. If even that fails, the file state is unknown: poison the spool.
    fn undo_partial_write(&mut self) {
        let len = self.active_len;
        let undo = self
            .active
            .set_len(len)
            .and_then(|()| self.active.seek(SeekFrom::Start(len)).map(|_| ()));
        if let Err(e) = undo {
            let path = segment::path(&self.dir, self.active_id);
            let cause = format!("cannot cut a failed append off {}: {e}", path.display());
            tracing::error!(%cause, "spool poisoned");
            self.poisoned = Some(cause);
        }
    }
}

/// Decides what recovery does with the damaged stretches of a version 2 segment and
/// returns the segment's length and valid batches after it.
///
/// Damage that ends at or before `last_committed` (the committed mark of the spool's
/// last valid batch) had been committed, and so acknowledged: it is kept in place (the
/// file stays as it is, for inspection), readers skip it, and the batches after it are
/// kept. Damage past that mark lies in the last commit group, which a crash may have
/// interrupted with its pages written out of order. In the newest segment it is cut off
/// with everything after it, as a torn tail: if the commit did not complete, the
/// senders resend every chunk of it, and a valid later batch of the same source left in
/// the spool would make dedup discard the resend of the damaged one. In an older
/// segment (a group that spanned a roll) it is kept and reported as not known to have
/// been acknowledged.
fn resolve_damage(
    path: &Path,
    id: u64,
    scan: ScanV2,
    newest: Option<u64>,
    last_committed: Option<Position>,
    rec: &mut Recovery,
) -> Result<(u64, u64), SpoolError> {
    for gap in &scan.gaps {
        let end = Position {
            segment: id,
            offset: gap.to,
        };
        let confirmed = last_committed.is_some_and(|c| c >= end);
        if !confirmed && Some(id) == newest {
            truncate_torn(path, id, gap.from)?;
            let bytes = scan.file_len - gap.from;
            let dropped = scan.batches - gap.batches_before;
            rec.torn_bytes_truncated += bytes;
            rec.torn_batches_dropped += dropped;
            if dropped == 0 {
                tracing::warn!(segment = id, path = %path.display(), offset = gap.from, bytes,
                    "spool: truncated the torn tail of the newest segment (appends interrupted by a crash; with fsync = always they were never acknowledged)");
            } else {
                tracing::error!(segment = id, path = %path.display(), offset = gap.from, bytes, valid_batches_dropped = dropped, reason = gap.reason,
                    "spool: damage inside the newest segment's last commit group; cut off with the valid batches after it, because that commit is not confirmed (if it completed they had been acknowledged and are lost; if not, their senders resend them)");
            }
            return Ok((gap.from, gap.batches_before));
        }
        let damage = Damage {
            path: path.to_path_buf(),
            from: Position {
                segment: id,
                offset: gap.from,
            },
            to: end,
            batches: gap.batches,
            acknowledged: if confirmed {
                Acknowledged::Yes
            } else {
                Acknowledged::NotKnown
            },
            reason: gap.reason,
        };
        tracing::error!(segment = id, path = %path.display(), offset = gap.from, end = gap.to, bytes = damage.bytes(),
            batches = damage.batches, acknowledged = %damage.acknowledged, reason = gap.reason,
            "spool: damaged batches found at recovery; every valid batch around them is kept, these are lost");
        rec.damaged.push(damage);
    }
    Ok((scan.file_len, scan.batches))
}

fn list(dir: &Path) -> Result<Vec<String>, SpoolError> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| SpoolError::io("list spool directory", dir, e))? {
        let entry = entry.map_err(|e| SpoolError::io("list spool directory", dir, e))?;
        match entry.file_name().into_string() {
            Ok(n) => names.push(n),
            Err(n) => {
                tracing::debug!(name = ?n, "ignoring a non-UTF-8 file name in the spool directory")
            }
        }
    }
    Ok(names)
}

/// Creates a segment file holding only its header. A crash before the header is
/// complete leaves a short newest segment, which recovery rewrites.
fn create_segment(dir: &Path, id: u64) -> Result<File, SpoolError> {
    let path = segment::path(dir, id);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| SpoolError::io("create segment", &path, e))?;
    if let Err(e) = f.write_all(&segment::header(id)) {
        let _ = fs::remove_file(&path);
        return Err(SpoolError::io("write segment header", &path, e));
    }
    Ok(f)
}

/// Cuts a torn tail off the newest segment (rewriting the header if even that was
/// incomplete) and syncs, so the repaired length is what later appends build on.
fn truncate_torn(path: &Path, id: u64, valid_len: u64) -> Result<(), SpoolError> {
    let mut f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| SpoolError::io("open segment for repair", path, e))?;
    let repair = (|| {
        if valid_len < SEGMENT_HEADER_LEN {
            f.set_len(0)?;
            f.write_all(&segment::header(id))?;
        } else {
            f.set_len(valid_len)?;
        }
        f.sync_all()
    })();
    repair.map_err(|e| SpoolError::io("truncate torn segment tail", path, e))
}

/// Writes `a` then `b` with as few syscalls as possible (normally one `writev`),
/// without copying them into one buffer.
fn write_all_2(f: &mut File, a: &[u8], b: &[u8]) -> io::Result<()> {
    let total = a.len() + b.len();
    let mut done = 0;
    while done < total {
        let n = if done < a.len() {
            f.write_vectored(&[IoSlice::new(&a[done..]), IoSlice::new(b)])
        } else {
            f.write(&b[done - a.len()..])
        };
        match n {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "write returned 0 bytes",
                ))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
