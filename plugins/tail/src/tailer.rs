//! The [`Tailer`]: discovery, identity, rotation, reading and commits.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::fingerprint::{read_full_at, read_head, Fingerprint, FINGERPRINT_BYTES};
use crate::lines::{LineCounts, LineCutter, LineState, Piece};
use crate::watch::{dirs_of, Watcher};
use crate::{FileCheckpoint, Line, SourceId, StartAt, TailConfig, TailError, TailStats};

/// How many bytes just before the read position are kept to tell that a file is still
/// the stream we were reading (see [`TrackedFile::guard`]).
const GUARD_BYTES: usize = 256;

/// The search for the rotated copy of a truncated stream (see [`TrackedFile::find_copy`])
/// looks at no more than this many directory entries,
const COPY_MAX_ENTRIES: usize = 4096;
/// opens no more than this many of them (regular, recent, long enough; newest first),
const COPY_MAX_CANDIDATES: usize = 64;
/// and considers only files changed in the last this many seconds.
const COPY_MAX_AGE_SECS: i64 = 60;

/// The rotated copy of a truncated stream: holds it at least up to the read position.
#[derive(Debug)]
struct Copy {
    key: FileKey,
    path: PathBuf,
    handle: File,
    size: u64,
}

/// Whether `file` holds `bytes` just before `end`.
fn holds_before(file: &File, bytes: &[u8], end: u64) -> io::Result<bool> {
    let g = bytes.len();
    if g == 0 {
        return Ok(true);
    }
    let mut buf = [0u8; GUARD_BYTES];
    let g = g.min(GUARD_BYTES);
    let n = read_full_at(file, &mut buf[..g], end - g as u64)?;
    Ok(n == g && buf[..g] == bytes[bytes.len() - g..])
}

/// Device and inode: what identifies a live file while we hold it open (the kernel does
/// not reuse an inode that has an open descriptor).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
}

impl FileKey {
    fn of(meta: &Metadata) -> FileKey {
        FileKey {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// One open file.
#[derive(Debug)]
struct TrackedFile {
    path: PathBuf,
    handle: File,
    fingerprint: Fingerprint,
    generation: u64,
    /// Assigned once the current generation has bytes (its fingerprint is part of it).
    source: Option<SourceId>,
    /// Next byte to read from the file.
    read_pos: u64,
    /// Bytes `[read_pos - leftover.len(), read_pos)`: the start of an incomplete line.
    leftover: Vec<u8>,
    /// End of the last line handed out.
    emitted: u64,
    /// End of the last line committed.
    committed: u64,
    /// The seq of the first event read from where this stream was resumed (its
    /// checkpoint's, or 0 from a stream's first byte): the pipeline numbers the events of
    /// a source from here, one per event (multiline events count once).
    start_seq: u64,
    /// The seq after the last committed event: saved with `committed` in the checkpoint.
    committed_seq: u64,
    /// Largest size seen; what a truncation can have destroyed.
    seen_size: u64,
    /// The last `min(GUARD_BYTES, read_pos)` bytes before `read_pos`, as read. A
    /// truncation is noticed by the file no longer holding them there: that also catches
    /// a file truncated and written past `read_pos` again before we looked, which
    /// "size < read position" cannot see (reading on from the old position would skip the
    /// new stream's first bytes and hand out the rest under the old source id).
    guard: Vec<u8>,
    lines: LineState,
    /// When the leftover was first seen at end of file.
    partial_since: Option<Instant>,
    /// No longer matched by the globs (rotated away or deleted).
    gone: bool,
    /// Size, if the file is deleted (no links left) and we hold it open.
    deleted_size: Option<u64>,
}

impl TrackedFile {
    fn consumed(&self) -> u64 {
        self.read_pos - self.leftover.len() as u64
    }

    /// Forget the current byte stream and start the next generation at offset 0.
    fn new_generation(&mut self) {
        self.generation += 1;
        self.source = None;
        self.fingerprint = Fingerprint::default();
        self.read_pos = 0;
        self.leftover = Vec::new();
        self.emitted = 0;
        self.committed = 0;
        self.start_seq = 0;
        self.committed_seq = 0;
        self.seen_size = 0;
        self.guard.clear();
        self.lines = LineState::default();
        self.partial_since = None;
    }

    /// The file was truncated since we last looked. With `copy` (its rotated copy, see
    /// [`find_copy`](Self::find_copy)) the old stream goes on in the copy: returned as a
    /// gone file that continues at the same position under the same source id, with the
    /// incomplete line we held; only what we saw past the copy's end is lost. Without,
    /// everything of the old stream past what was consumed is gone for us (bytes we knew
    /// of but had not read, and the incomplete line we held). Counts and logs the loss,
    /// and starts the next generation at offset 0, so whatever the file holds now is read
    /// from its first byte.
    fn start_over_after_truncation(
        &mut self,
        counts: &mut Truncations,
        noticed: &str,
        copy: Option<Copy>,
    ) -> Option<(FileKey, TrackedFile)> {
        let known_end = self.seen_size.max(self.read_pos);
        counts.seen += 1;
        let continued = match copy {
            Some(c) => {
                let lost = known_end.saturating_sub(c.size);
                counts.bytes_lost += lost;
                tracing::info!(path = %self.path.display(), copy = %c.path.display(),
                    lost_bytes = lost, source = ?self.source, offset = self.read_pos,
                    copy_size = c.size, noticed,
                    "file truncated (copytruncate); reading the rest of the old stream from its rotated copy");
                Some((
                    c.key,
                    TrackedFile {
                        path: c.path,
                        handle: c.handle,
                        fingerprint: self.fingerprint,
                        generation: self.generation,
                        source: self.source.clone(),
                        read_pos: self.read_pos,
                        leftover: std::mem::take(&mut self.leftover),
                        emitted: self.emitted,
                        committed: self.committed,
                        start_seq: self.start_seq,
                        committed_seq: self.committed_seq,
                        seen_size: c.size,
                        guard: std::mem::take(&mut self.guard),
                        lines: std::mem::take(&mut self.lines),
                        partial_since: self.partial_since,
                        gone: true,
                        deleted_size: None,
                    },
                ))
            }
            None => {
                let lost = known_end - self.consumed();
                counts.bytes_lost += lost;
                tracing::warn!(path = %self.path.display(), lost_bytes = lost, old_source = ?self.source,
                    old_offset = self.read_pos, noticed,
                    "file truncated (copytruncate?), no rotated copy found; reading it again from the start as a new stream");
                None
            }
        };
        self.new_generation();
        continued
    }

    /// Looks for the rotated copy of this stream after a truncation (logrotate's
    /// `copytruncate` copies the file, e.g. to `app.log.1`, then truncates it): a regular
    /// file in the same directory, not `live` (this file) and not `known` (followed or
    /// matched by the globs: another stream, or this one read already), changed in the last
    /// minute, that starts with the bytes the fingerprint covers and holds the guard just
    /// before the read position, and goes on past what was consumed. Identified by
    /// content, never by name. Bounded: one directory, [`COPY_MAX_ENTRIES`] entries,
    /// [`COPY_MAX_CANDIDATES`] opened, newest (by change time) first; cheap checks (type,
    /// age, size) before any read.
    /// A copy compressed already does not match (its first bytes differ).
    fn find_copy(&self, live: FileKey, known: &dyn Fn(FileKey) -> bool) -> Option<Copy> {
        if self.fingerprint.is_empty() {
            return None;
        }
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let entries = std::fs::read_dir(dir).ok()?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        // Cheap checks (type, identity, size, age) on the directory entries, then the
        // newest first: the copy was made just before the truncation we noticed.
        let mut candidates: Vec<(i64, FileKey, u64, PathBuf)> = Vec::new();
        for entry in entries.take(COPY_MAX_ENTRIES) {
            let Ok(entry) = entry else { continue };
            // Not following symlinks: a copy is a regular file.
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let key = FileKey::of(&meta);
            let size = meta.len();
            let changed = meta.mtime().max(meta.ctime());
            if key == live
                || size < self.read_pos
                || size <= self.consumed()
                || now - changed > COPY_MAX_AGE_SECS
                || known(key)
            {
                continue;
            }
            let nanos = meta.ctime() * 1_000_000_000 + meta.ctime_nsec();
            candidates.push((nanos, key, size, entry.path()));
        }
        candidates.sort_unstable_by_key(|c| std::cmp::Reverse(c.0));
        for (_, key, size, path) in candidates.into_iter().take(COPY_MAX_CANDIDATES) {
            let Ok(handle) = File::open(&path) else {
                continue;
            };
            // Replaced between stat and open: identity is the handle's.
            match handle.metadata() {
                Ok(m) if FileKey::of(&m) == key => {}
                _ => continue,
            }
            let mut head = [0u8; FINGERPRINT_BYTES];
            match read_head(&handle, &mut head) {
                Ok(n) if self.fingerprint.matches(&head[..n]) => {}
                _ => continue,
            }
            if !matches!(holds_before(&handle, &self.guard, self.read_pos), Ok(true)) {
                continue;
            }
            // Its size now: the copy may have been in the making when we looked.
            let size = handle.metadata().map_or(size, |m| m.len());
            return Some(Copy {
                key,
                path,
                handle,
                size,
            });
        }
        None
    }

    /// At a scan, `size` being the file's size now: if it was truncated since we last
    /// looked, starts over (see [`start_over_after_truncation`](Self::start_over_after_truncation)).
    /// Returns the rotated copy that continues the old stream, if one was found.
    fn notice_truncation(
        &mut self,
        input: &str,
        key: FileKey,
        size: u64,
        counts: &mut Truncations,
        known: &dyn Fn(FileKey) -> bool,
    ) -> Option<(FileKey, TrackedFile)> {
        let mut truncated = size < self.seen_size.max(self.read_pos);
        if !truncated {
            // As long as or longer, but truncated and written again since we read (past
            // our position: the bytes before it changed; or not that far yet: the first
            // bytes changed)?
            truncated = matches!(self.same_stream(), Ok(false))
                || (size != self.seen_size
                    && matches!(self.refresh_fingerprint(input, key, false), Ok(false)));
        }
        if truncated {
            let copy = self.find_copy(key, known);
            let continued = self.start_over_after_truncation(counts, "by a scan", copy);
            // What the new stream holds now is known to be there (stat again: `size` may
            // be from before the truncation), and its first bytes are fingerprinted now:
            // with an empty fingerprint and nothing read yet, a second truncation before
            // the next read would go unnoticed (and its bytes uncounted).
            self.seen_size = self.handle.metadata().map_or(0, |m| m.len());
            if let Err(e) = self.refresh_fingerprint(input, key, false) {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot read file");
            }
            continued
        } else {
            self.seen_size = self.seen_size.max(size);
            None
        }
    }

    /// Whether the file still holds, just before `read_pos`, the bytes read there
    /// (false: it was truncated since, and maybe written past `read_pos` again).
    fn guard_holds(&self) -> io::Result<bool> {
        holds_before(&self.handle, &self.guard, self.read_pos)
    }

    /// Whether the file is still the stream we were reading: the bytes before `read_pos`
    /// are still there, and so are the first bytes the fingerprint covers where we have
    /// not read that far yet (with nothing read, the fingerprint is all we know of it).
    fn same_stream(&self) -> io::Result<bool> {
        if !self.guard_holds()? {
            return Ok(false);
        }
        if self.read_pos >= u64::from(self.fingerprint.len) {
            return Ok(true);
        }
        let mut head = [0u8; FINGERPRINT_BYTES];
        let n = read_head(&self.handle, &mut head)?;
        Ok(self.fingerprint.matches(&head[..n]))
    }

    /// `new` was just read and ends at `read_pos`: keep the last bytes as the guard.
    fn extend_guard(&mut self, new: &[u8]) {
        if new.len() >= GUARD_BYTES {
            self.guard.clear();
            self.guard
                .extend_from_slice(&new[new.len() - GUARD_BYTES..]);
        } else {
            self.guard.extend_from_slice(new);
            let excess = self.guard.len().saturating_sub(GUARD_BYTES);
            self.guard.drain(..excess);
        }
    }

    /// Takes the guard from the file, for a position we did not read up to ourselves
    /// (a checkpoint, `start_at = end`). A file shorter than that gets none; the size
    /// check notices it.
    fn load_guard(&mut self) -> io::Result<()> {
        let g = (self.read_pos as usize).min(GUARD_BYTES);
        let mut buf = [0u8; GUARD_BYTES];
        let n = read_full_at(&self.handle, &mut buf[..g], self.read_pos - g as u64)?;
        self.guard.clear();
        if n == g {
            self.guard.extend_from_slice(&buf[..g]);
        }
        Ok(())
    }

    /// Takes or extends the fingerprint from the file's first bytes, and names the stream
    /// once its first line is complete (or `force`: it waited `partial_line_timeout`).
    /// Returns false if the file no longer starts with the bytes the fingerprint covered
    /// (it was rewritten).
    fn refresh_fingerprint(&mut self, input: &str, key: FileKey, force: bool) -> io::Result<bool> {
        let mut head = [0u8; FINGERPRINT_BYTES];
        let n = read_head(&self.handle, &mut head)?;
        if n < self.fingerprint.len as usize {
            return Ok(false);
        }
        if !self.fingerprint.matches(&head[..n]) {
            return Ok(false);
        }
        self.fingerprint = Fingerprint::of(&head[..n]);
        if self.source.is_none() && n > 0 {
            // The id must come out the same whenever it is computed: a restart after a
            // crash that came before the first checkpoint of this file computes it again,
            // and the relay recognises resent lines only under the same id. So it covers
            // the first line (or the first FINGERPRINT_BYTES), never "what was there".
            let head = &head[..n];
            let settled = match head.iter().position(|&b| b == b'\n') {
                Some(i) => Some(i + 1),
                None if n >= FINGERPRINT_BYTES => Some(n),
                None => None,
            };
            let cover = match settled {
                Some(c) => c,
                None if force => n,
                None => return Ok(true),
            };
            self.source = Some(SourceId(format!(
                "{input}:{}:{}:{:08x}:{}",
                key.dev,
                key.ino,
                crc32fast::hash(&head[..cover]),
                self.generation
            )));
        }
        Ok(true)
    }

    /// Fully read and every handed-out line committed: nothing left to do for a file
    /// that is gone.
    fn finished(&self) -> bool {
        self.leftover.is_empty()
            && self.committed >= self.emitted
            && self
                .handle
                .metadata()
                .map(|m| m.len() <= self.read_pos)
                .unwrap_or(true)
    }
}

/// Truncations noticed and the bytes they cost, over all files of a [`Tailer`].
#[derive(Debug, Default)]
struct Truncations {
    seen: u64,
    bytes_lost: u64,
}

/// Follows the files of one input. See the crate documentation for the guarantees.
#[derive(Debug)]
pub struct Tailer {
    input: String,
    cfg: TailConfig,
    include: Vec<String>,
    exclude: Vec<glob::Pattern>,
    cutter: LineCutter,
    files: BTreeMap<FileKey, TrackedFile>,
    /// The file that had the last turn in `poll`, for round robin.
    cursor: Option<FileKey>,
    /// Shared read buffer: leftover of the file whose turn it is + one read chunk.
    scratch: Vec<u8>,
    counts: LineCounts,
    partial_lines_flushed: u64,
    truncations: Truncations,
    deleted_alarm: bool,
    /// Opens new files the moment they appear (see `watch`); `None` without inotify or
    /// with `TailConfig::watch` off.
    watcher: Option<Watcher>,
    /// Files forgotten in the last minute, with the watcher's clock at that moment: a
    /// handle opened earlier is that very file, not a new one.
    forgotten: HashMap<FileKey, (u64, Instant)>,
    /// No checkpoint of this input existed at creation: its very first start, the only
    /// time `start_at = end` applies. After that, a file without checkpoint was created
    /// while the agent was stopped and is read from its beginning.
    first_start: bool,
}

impl Tailer {
    /// Creates the tailer of input `input` and scans the globs once. Files found now
    /// continue from their checkpoint in `saved` (found by identity, whatever their path
    /// now) or, without one, start at `cfg.start_at`. Checkpoints whose file is gone are
    /// dropped.
    pub fn new(
        input: &str,
        cfg: TailConfig,
        saved: &[FileCheckpoint],
    ) -> Result<Tailer, TailError> {
        if cfg.max_line_bytes == 0 {
            return Err(TailError::Config(
                "max_line_bytes must be at least 1".into(),
            ));
        }
        if cfg.read_chunk_bytes == 0 {
            return Err(TailError::Config(
                "read_chunk_bytes must be at least 1".into(),
            ));
        }
        for pattern in &cfg.include {
            glob::Pattern::new(pattern).map_err(|source| TailError::Pattern {
                pattern: pattern.clone(),
                source,
            })?;
        }
        let include_patterns = cfg
            .include
            .iter()
            .map(|p| glob::Pattern::new(p))
            .collect::<Result<Vec<_>, _>>()
            .unwrap_or_default();
        let exclude = cfg
            .exclude
            .iter()
            .map(|p| {
                glob::Pattern::new(p).map_err(|source| TailError::Pattern {
                    pattern: p.clone(),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut tailer = Tailer {
            input: input.to_string(),
            include: cfg.include.clone(),
            exclude,
            cutter: LineCutter {
                max: cfg.max_line_bytes,
                long_lines: cfg.long_lines,
            },
            files: BTreeMap::new(),
            cursor: None,
            scratch: Vec::with_capacity(
                cfg.read_chunk_bytes.min(1 << 20) + cfg.max_line_bytes.min(1 << 20) + 2,
            ),
            counts: LineCounts::default(),
            partial_lines_flushed: 0,
            truncations: Truncations::default(),
            deleted_alarm: false,
            watcher: None,
            forgotten: HashMap::new(),
            first_start: !saved.iter().any(|c| c.input == input),
            cfg,
        };
        if tailer.cfg.watch {
            // Before the first scan, so that no file created from now on is missed.
            tailer.watcher = Watcher::start(input, &include_patterns, &tailer.exclude);
        }
        let saved: HashMap<FileKey, &FileCheckpoint> = saved
            .iter()
            .filter(|c| c.input == input)
            .map(|c| {
                (
                    FileKey {
                        dev: c.dev,
                        ino: c.ino,
                    },
                    c,
                )
            })
            .collect();
        tailer.scan(Some(&saved));
        // A checkpointed file rotated out of the globs while we were stopped: finish it
        // from its last known path if it is still the same file there.
        for (key, cp) in &saved {
            if tailer.files.contains_key(key) {
                continue;
            }
            match std::fs::metadata(&cp.path) {
                Ok(meta) if FileKey::of(&meta) == *key => {
                    tailer.track(*key, &cp.path, Some(cp), true);
                    if let Some(f) = tailer.files.get_mut(key) {
                        f.gone = true;
                    }
                }
                _ => tracing::info!(path = %cp.path.display(), source = %cp.source,
                    "checkpointed file no longer exists; dropping its checkpoint"),
            }
        }
        tailer.account_gone_files();
        Ok(tailer)
    }

    /// Rescans the globs: picks up new files, follows renames, notices truncations and
    /// files that were rotated away or deleted. Cheap enough to call every ~250 ms.
    /// Problems with single files are logged, not returned.
    pub fn discover(&mut self) -> Result<(), TailError> {
        self.scan(None);
        self.account_gone_files();
        let done: Vec<FileKey> = self
            .files
            .iter()
            .filter(|(_, f)| f.gone && f.finished())
            .map(|(k, _)| *k)
            .collect();
        for key in done {
            self.forget(key);
        }
        Ok(())
    }

    /// Reads at most `max_bytes`, `read_chunk_bytes` per file per turn in round robin, and
    /// calls `out` for every complete line (and every last line without newline older
    /// than `partial_line_timeout`). Returns the number of bytes read; 0 means nothing new.
    pub fn poll(
        &mut self,
        max_bytes: usize,
        out: &mut dyn FnMut(Line<'_>),
    ) -> Result<usize, TailError> {
        let keys: Vec<FileKey> = self.files.keys().copied().collect();
        if keys.is_empty() {
            return Ok(0);
        }
        let start = match self.cursor {
            Some(c) => keys.partition_point(|k| *k <= c) % keys.len(),
            None => 0,
        };
        let now = Instant::now();
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut total = 0;
        let mut idle = vec![false; keys.len()];
        let mut continued = Vec::new();
        'rounds: loop {
            let mut progress = false;
            for i in 0..keys.len() {
                let at = (start + i) % keys.len();
                if idle[at] {
                    continue;
                }
                let budget = max_bytes - total;
                if budget == 0 {
                    break 'rounds;
                }
                let key = keys[at];
                let Some(file) = self.files.get_mut(&key) else {
                    continue;
                };
                let mut turn = Turn {
                    input: &self.input,
                    key,
                    cfg: &self.cfg,
                    cutter: &self.cutter,
                    counts: &mut self.counts,
                    partial_lines_flushed: &mut self.partial_lines_flushed,
                    truncations: &mut self.truncations,
                    followed: &keys,
                    continued: &mut continued,
                    now,
                };
                let (n, eof) = turn.run(file, &mut scratch, budget, out);
                self.cursor = Some(key);
                total += n;
                progress |= n > 0;
                idle[at] = eof;
            }
            if !progress {
                break;
            }
        }
        self.scratch = scratch;
        // Read from the next poll on; found by their source id for commits from now on.
        self.files.extend(continued);
        Ok(total)
    }

    /// Records that every line of `source` ending at or before `end` is safe downstream.
    /// Commits only grow; an `end` beyond what was handed out is clamped to it. A commit
    /// for a stream that no longer exists (an old generation) is ignored. A file that was
    /// rotated away or deleted and is now fully read and committed is closed here.
    pub fn commit(&mut self, source: &SourceId, end: u64) {
        self.commit_seq(source, end, None)
    }

    /// [`commit`](Self::commit), and the seq after the last event committed, which the
    /// checkpoint saves so that events are numbered on from there after a restart.
    pub fn commit_seq(&mut self, source: &SourceId, end: u64, next_seq: Option<u64>) {
        let Some((key, file)) = self
            .files
            .iter_mut()
            .find(|(_, f)| f.source.as_ref() == Some(source))
        else {
            tracing::debug!(%source, end, "commit for a stream no longer followed; ignored");
            return;
        };
        if end > file.emitted {
            tracing::warn!(%source, end, emitted = file.emitted, "commit beyond the lines handed out; clamped");
        }
        file.committed = file.committed.max(end.min(file.emitted));
        if let Some(seq) = next_seq {
            file.committed_seq = file.committed_seq.max(seq);
        }
        if file.gone && file.finished() {
            let key = *key;
            self.forget(key);
        }
    }

    /// Calls `f` with the source of every file held (followed, or gone and not finished):
    /// the streams lines may still come from.
    pub fn followed(&self, f: &mut dyn FnMut(&SourceId)) {
        for file in self.files.values() {
            if let Some(source) = &file.source {
                f(source);
            }
        }
    }

    /// The committed position of every followed file, for the checkpoint file. Never
    /// includes lines read but not committed. Files whose current generation has no
    /// bytes yet have no checkpoint (there is nothing to resume).
    pub fn checkpoints(&self) -> Vec<FileCheckpoint> {
        self.files
            .iter()
            .filter_map(|(key, f)| {
                let source = f.source.clone()?;
                // When everything handed out is committed, bytes consumed after it were
                // deliberately skipped (LongLines::Truncate); do not read them again.
                let offset = if f.committed >= f.emitted {
                    f.consumed().max(f.committed)
                } else {
                    f.committed
                };
                Some(FileCheckpoint {
                    input: self.input.clone(),
                    source,
                    path: f.path.clone(),
                    dev: key.dev,
                    ino: key.ino,
                    fingerprint: f.fingerprint,
                    generation: f.generation,
                    offset,
                    seq: Some(f.committed_seq),
                })
            })
            .collect()
    }

    /// Counters and gauges for metrics.
    pub fn stats(&self) -> TailStats {
        TailStats {
            files_open: self.files.len() as u64,
            files_gone: self.files.values().filter(|f| f.gone).count() as u64,
            deleted_bytes_held: self.deleted_bytes_held(),
            deleted_bytes_alarm: self.deleted_alarm,
            lines_truncated: self.counts.lines_truncated,
            lines_split: self.counts.lines_split,
            bytes_skipped: self.counts.bytes_skipped,
            partial_lines_flushed: self.partial_lines_flushed,
            truncations: self.truncations.seen,
            bytes_lost_to_truncation: self.truncations.bytes_lost,
        }
    }

    fn deleted_bytes_held(&self) -> u64 {
        self.files.values().filter_map(|f| f.deleted_size).sum()
    }

    /// Globs every include pattern; at startup (`saved` given) new files resume from their
    /// checkpoint or `start_at`, later they start at 0.
    fn scan(&mut self, saved: Option<&HashMap<FileKey, &FileCheckpoint>>) {
        self.adopt_opened(saved);
        let mut seen: BTreeMap<FileKey, (PathBuf, Metadata)> = BTreeMap::new();
        for pattern in &self.include {
            let paths = match glob::glob(pattern) {
                Ok(paths) => paths,
                Err(e) => {
                    tracing::warn!(pattern, error = %e, "invalid glob pattern");
                    continue;
                }
            };
            for entry in paths {
                let path = match entry {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot read a directory while globbing");
                        continue;
                    }
                };
                if self.exclude.iter().any(|p| p.matches_path(&path)) {
                    continue;
                }
                let meta = match std::fs::metadata(&path) {
                    Ok(m) if m.is_file() => m,
                    _ => continue,
                };
                // Identity decides: two paths of one file (rotated names matched by the
                // same glob, hard links, symlinks) are read once, under the first path.
                seen.entry(FileKey::of(&meta)).or_insert((path, meta));
            }
        }
        let followed: Vec<FileKey> = seen
            .keys()
            .filter(|k| self.files.contains_key(k))
            .copied()
            .collect();
        for (key, (path, _)) in &seen {
            if !self.files.contains_key(key) {
                let cp = saved.and_then(|s| s.get(key).copied());
                self.track(*key, path, cp, saved.is_some());
            }
        }
        // Not the rotated copy of a truncated stream: every file followed (another
        // stream, or that copy already) or matched by the globs (it is followed as a file
        // of its own). Files finished and forgotten are not excluded by identity (their
        // inode may be reused by the copy); their content is another stream's.
        let mut known: HashSet<FileKey> = self.files.keys().chain(seen.keys()).copied().collect();
        let mut continued = Vec::new();
        for key in followed {
            let (path, meta) = &seen[&key];
            if let Some(c) = self.revisit(key, path, meta, &|k| known.contains(&k)) {
                known.insert(c.0);
                continued.push(c);
            }
        }
        for (key, f) in self.files.iter_mut() {
            if seen.contains_key(key) {
                continue;
            }
            if !f.gone {
                tracing::info!(path = %f.path.display(), "file rotated away or deleted; reading it to its end");
                f.gone = true;
            }
            // Truncated (and maybe deleted) after it left the globs, through a handle
            // someone still holds.
            if let Ok(meta) = f.handle.metadata() {
                if let Some(c) = f.notice_truncation(
                    &self.input,
                    *key,
                    meta.len(),
                    &mut self.truncations,
                    &|k| known.contains(&k),
                ) {
                    known.insert(c.0);
                    continued.push(c);
                }
            }
        }
        self.files.extend(continued);
    }

    /// Starts following the files the watcher opened since the last scan, unless they are
    /// followed already or are files this tailer finished and forgot.
    fn adopt_opened(&mut self, saved: Option<&HashMap<FileKey, &FileCheckpoint>>) {
        let Some(watcher) = &self.watcher else {
            return;
        };
        for pattern in &self.include {
            for dir in dirs_of(pattern) {
                watcher.watch_dir(&dir);
            }
        }
        let opened = watcher.take();
        for o in opened {
            let key = FileKey {
                dev: o.dev,
                ino: o.ino,
            };
            let forgotten_after_open = self
                .forgotten
                .get(&key)
                .is_some_and(|&(t, _)| t > o.opened_at);
            if self.files.contains_key(&key) || forgotten_after_open {
                continue;
            }
            let cp = saved.and_then(|s| s.get(&key).copied());
            self.adopt(key, &o.path, o.handle, cp, saved.is_some());
        }
        // A handle is queued right after its open, so old forgets stop mattering quickly;
        // keeping them a minute covers a watcher thread that was descheduled in between.
        self.forgotten
            .retain(|_, (_, at)| at.elapsed() < std::time::Duration::from_secs(60));
    }

    /// A followed file seen again: follow a rename, notice a truncation. Returns the
    /// rotated copy that continues the old stream of a truncated file.
    fn revisit(
        &mut self,
        key: FileKey,
        path: &Path,
        meta: &Metadata,
        known: &dyn Fn(FileKey) -> bool,
    ) -> Option<(FileKey, TrackedFile)> {
        let input = self.input.clone();
        let f = self.files.get_mut(&key)?;
        if f.path != path {
            tracing::info!(from = %f.path.display(), to = %path.display(), "file renamed; following it");
            f.path = path.to_path_buf();
        }
        f.gone = false;
        f.notice_truncation(&input, key, meta.len(), &mut self.truncations, known)
    }

    /// Starts following a file.
    fn track(&mut self, key: FileKey, path: &Path, cp: Option<&FileCheckpoint>, startup: bool) {
        let handle = match File::open(path) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot open file; will retry");
                return;
            }
        };
        self.adopt(key, path, handle, cp, startup);
    }

    /// Starts following an open file that was found at `path`.
    fn adopt(
        &mut self,
        key: FileKey,
        path: &Path,
        handle: File,
        cp: Option<&FileCheckpoint>,
        startup: bool,
    ) {
        // The path may have been replaced between stat and open: identity is the handle's.
        let meta = match handle.metadata() {
            Ok(m) if FileKey::of(&m) == key => m,
            _ => {
                tracing::debug!(path = %path.display(), "file replaced while opening; next scan picks it up");
                return;
            }
        };
        let size = meta.len();
        let mut f = TrackedFile {
            path: path.to_path_buf(),
            handle,
            fingerprint: Fingerprint::default(),
            generation: 0,
            source: None,
            read_pos: 0,
            leftover: Vec::new(),
            emitted: 0,
            committed: 0,
            start_seq: 0,
            committed_seq: 0,
            seen_size: size,
            guard: Vec::new(),
            lines: LineState::default(),
            partial_since: None,
            gone: false,
            deleted_size: None,
        };
        let mut start = 0;
        if let Some(cp) = cp {
            f.generation = cp.generation;
            f.fingerprint = cp.fingerprint;
            match f.refresh_fingerprint(&self.input, key, false) {
                Ok(true) if size >= cp.offset => {
                    f.source = Some(cp.source.clone());
                    start = cp.offset;
                    // A version 1 checkpoint has no seq: its events were numbered by byte
                    // offset, all below the file's size, and the relay's dedup holds marks
                    // that high. Numbering on from the size keeps every new event above
                    // them (from the offset, events sent but not acknowledged before the
                    // upgrade could hide new ones under their numbers).
                    f.start_seq = cp.seq.unwrap_or(size);
                    f.committed_seq = f.start_seq;
                    tracing::info!(path = %path.display(), offset = start, "resuming from checkpoint");
                }
                Ok(_) => {
                    // Same inode, other content: truncated (or the inode reused) while we
                    // were stopped. Whatever is there now is new: read it all, as a new stream.
                    tracing::warn!(path = %path.display(), "file rewritten since its checkpoint; reading it from the start as a new stream");
                    f.new_generation();
                    f.seen_size = size;
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read file; will retry");
                    return;
                }
            }
        } else if startup && self.first_start && self.cfg.start_at == StartAt::End {
            start = size;
        }
        f.read_pos = start;
        f.emitted = start;
        f.committed = start;
        if let Err(e) = f.load_guard() {
            tracing::warn!(path = %path.display(), error = %e, "cannot read file; will retry");
            return;
        }
        if f.source.is_none() {
            if let Err(e) = f.refresh_fingerprint(&self.input, key, false) {
                tracing::warn!(path = %path.display(), error = %e, "cannot read file; will retry");
                return;
            }
        }
        tracing::debug!(path = %path.display(), offset = start, "following file");
        self.files.insert(key, f);
    }

    /// Updates which gone files are deleted and how many bytes they hold; raises or
    /// clears the alarm.
    fn account_gone_files(&mut self) {
        for f in self.files.values_mut().filter(|f| f.gone) {
            f.deleted_size = match f.handle.metadata() {
                Ok(m) if m.nlink() == 0 => Some(m.len()),
                _ => None,
            };
        }
        let held = self.deleted_bytes_held();
        let alarm = held > self.cfg.max_deleted_bytes;
        if alarm && !self.deleted_alarm {
            tracing::warn!(
                held_bytes = held,
                max = self.cfg.max_deleted_bytes,
                "deleted files held open (not yet read and committed) exceed max_deleted_bytes; \
                 the disk space is not freed until they are"
            );
        }
        self.deleted_alarm = alarm;
    }

    fn forget(&mut self, key: FileKey) {
        if let Some(w) = &self.watcher {
            self.forgotten.insert(key, (w.clock(), Instant::now()));
        }
        if let Some(f) = self.files.remove(&key) {
            tracing::info!(path = %f.path.display(), "rotated-away file fully read and committed; closing it");
        }
    }
}

/// One file's turn in `poll`.
struct Turn<'t> {
    input: &'t str,
    key: FileKey,
    cfg: &'t TailConfig,
    cutter: &'t LineCutter,
    counts: &'t mut LineCounts,
    partial_lines_flushed: &'t mut u64,
    truncations: &'t mut Truncations,
    /// The files followed when the poll began (sorted): not the rotated copy of a
    /// truncated stream.
    followed: &'t [FileKey],
    /// Rotated copies found in this poll, continuing the old streams of truncated files.
    continued: &'t mut Vec<(FileKey, TrackedFile)>,
    now: Instant,
}

impl Turn<'_> {
    /// `f` was truncated: look for its rotated copy and start over.
    fn start_over(&mut self, f: &mut TrackedFile, noticed: &str) {
        let copy = {
            let known = |k: FileKey| {
                self.followed.binary_search(&k).is_ok()
                    || self.continued.iter().any(|(c, _)| *c == k)
            };
            f.find_copy(self.key, &known)
        };
        if let Some(c) = f.start_over_after_truncation(self.truncations, noticed, copy) {
            self.continued.push(c);
        }
    }

    /// Reads up to one chunk and hands out its lines. Returns the bytes read and whether
    /// the file is at its end. A truncation noticed here starts the new generation and
    /// reads it from offset 0 in the same turn.
    fn run(
        &mut self,
        f: &mut TrackedFile,
        scratch: &mut Vec<u8>,
        budget: usize,
        out: &mut dyn FnMut(Line<'_>),
    ) -> (usize, bool) {
        if f.source.is_none() {
            // A first line without newline gets its name when it is old enough to be
            // handed out without one.
            let force = f
                .partial_since
                .is_some_and(|t| self.now.duration_since(t) >= self.cfg.partial_line_timeout);
            match f.refresh_fingerprint(self.input, self.key, force) {
                Ok(true) => {}
                Ok(false) => {
                    // Rewritten from the start since we took the fingerprint.
                    self.start_over(f, "by the first bytes");
                    return self.run(f, scratch, budget, out);
                }
                Err(e) => {
                    tracing::warn!(path = %f.path.display(), error = %e, "cannot read file");
                    return (0, true);
                }
            }
            if f.source.is_none() {
                // Still empty, or the first line is incomplete.
                if !f.fingerprint.is_empty() {
                    f.partial_since.get_or_insert(self.now);
                }
                return (0, true);
            }
        }
        let want = budget.min(self.cfg.read_chunk_bytes);
        // The size before the read is trusted only once the guard below holds.
        let size = f.handle.metadata().map_or(0, |m| m.len());
        scratch.clear();
        scratch.extend_from_slice(&f.leftover);
        let have = scratch.len();
        scratch.resize(have + want, 0);
        let n = loop {
            match f.handle.read_at(&mut scratch[have..], f.read_pos) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(path = %f.path.display(), error = %e, "cannot read file");
                    scratch.truncate(have);
                    return (0, true);
                }
            }
        };
        scratch.truncate(have + n);
        // Checked after the read, not before: if the bytes before `read_pos` (and the
        // fingerprinted first bytes) are still there now, the file was not truncated before now, so what was just read is the
        // continuation of this stream (a check before the read could pass, and a
        // truncation and new writes come between it and the read).
        match f.same_stream() {
            Ok(true) => {}
            Ok(false) => {
                self.start_over(f, "at a read");
                return self.run(f, scratch, budget, out);
            }
            Err(e) => {
                tracing::warn!(path = %f.path.display(), error = %e, "cannot read file");
                scratch.truncate(have);
                return (0, true);
            }
        }
        let base = f.read_pos - have as u64;
        f.read_pos += n as u64;
        f.seen_size = f.seen_size.max(f.read_pos).max(size);
        f.extend_guard(&scratch[have..]);
        let eof = n < want;

        let TrackedFile {
            source,
            path,
            lines,
            emitted,
            start_seq,
            ..
        } = f;
        let start_seq = *start_seq;
        let Some(source) = source.as_ref() else {
            return (n, eof);
        };
        let mut emit = |p: Piece| {
            *emitted = base + p.end as u64;
            out(Line {
                source,
                path,
                offset: base + p.start as u64,
                end: base + p.end as u64,
                bytes: &scratch[p.start..p.content_end],
                truncated: p.truncated,
                start_seq,
            });
        };
        let consumed = self.cutter.cut(scratch, lines, self.counts, &mut emit);
        let mut rest = consumed;
        if eof && consumed < scratch.len() {
            let since = *f.partial_since.get_or_insert(self.now);
            if self.now.duration_since(since) >= self.cfg.partial_line_timeout {
                self.cutter
                    .flush(&scratch[consumed..], lines, self.counts, &mut |p| {
                        emit(Piece {
                            start: consumed + p.start,
                            content_end: consumed + p.content_end,
                            end: consumed + p.end,
                            truncated: p.truncated,
                        })
                    });
                *self.partial_lines_flushed += 1;
                rest = scratch.len();
            }
        }
        if rest == scratch.len() {
            f.partial_since = None;
        }
        // Keep only the incomplete line; give back memory a burst left behind.
        f.leftover.clear();
        f.leftover.extend_from_slice(&scratch[rest..]);
        if f.leftover.is_empty() && f.leftover.capacity() > 4096 {
            f.leftover = Vec::new();
        }
        (n, eof)
    }
}
