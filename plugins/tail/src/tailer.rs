//! The [`Tailer`]: discovery, identity, rotation, reading and commits.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::fingerprint::{read_head, Fingerprint, FINGERPRINT_BYTES};
use crate::lines::{LineCounts, LineCutter, LineState, Piece};
use crate::watch::{dirs_of, Watcher};
use crate::{FileCheckpoint, Line, SourceId, StartAt, TailConfig, TailError, TailStats};

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
    /// Largest size seen; what a truncation can have destroyed.
    seen_size: u64,
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
        self.seen_size = 0;
        self.lines = LineState::default();
        self.partial_since = None;
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
    truncations: u64,
    bytes_lost_to_truncation: u64,
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
            truncations: 0,
            bytes_lost_to_truncation: 0,
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
                let turn = Turn {
                    input: &self.input,
                    key,
                    cfg: &self.cfg,
                    cutter: &self.cutter,
                    counts: &mut self.counts,
                    partial_lines_flushed: &mut self.partial_lines_flushed,
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
        Ok(total)
    }

    /// Records that every line of `source` ending at or before `end` is safe downstream.
    /// Commits only grow; an `end` beyond what was handed out is clamped to it. A commit
    /// for a stream that no longer exists (an old generation) is ignored. A file that was
    /// rotated away or deleted and is now fully read and committed is closed here.
    pub fn commit(&mut self, source: &SourceId, end: u64) {
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
        if file.gone && file.finished() {
            let key = *key;
            self.forget(key);
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
            truncations: self.truncations,
            bytes_lost_to_truncation: self.bytes_lost_to_truncation,
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
        for (key, (path, meta)) in &seen {
            if self.files.contains_key(key) {
                self.revisit(*key, path, meta);
            } else {
                let cp = saved.and_then(|s| s.get(key).copied());
                self.track(*key, path, cp, saved.is_some());
            }
        }
        for (key, f) in self.files.iter_mut() {
            if !seen.contains_key(key) && !f.gone {
                tracing::info!(path = %f.path.display(), "file rotated away or deleted; reading it to its end");
                f.gone = true;
            }
        }
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

    /// A followed file seen again: follow a rename, notice a truncation.
    fn revisit(&mut self, key: FileKey, path: &Path, meta: &Metadata) {
        let input = self.input.clone();
        let Some(f) = self.files.get_mut(&key) else {
            return;
        };
        if f.path != path {
            tracing::info!(from = %f.path.display(), to = %path.display(), "file renamed; following it");
            f.path = path.to_path_buf();
        }
        f.gone = false;
        let size = meta.len();
        let known = f.seen_size.max(f.read_pos);
        let mut truncated = size < known;
        if !truncated && size != f.seen_size {
            // Same size or larger, but rewritten from the start (truncated and written
            // again between two scans)? The first bytes tell.
            truncated = matches!(f.refresh_fingerprint(&input, key, false), Ok(false));
        }
        if truncated {
            let lost = known - f.consumed();
            self.truncations += 1;
            self.bytes_lost_to_truncation += lost;
            tracing::warn!(path = %path.display(), lost_bytes = lost, old_source = ?f.source,
                "file truncated (copytruncate?); reading it again from the start as a new stream");
            f.new_generation();
        }
        f.seen_size = f.seen_size.max(size);
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
            seen_size: size,
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
    now: Instant,
}

impl Turn<'_> {
    /// Reads up to one chunk and hands out its lines. Returns the bytes read and whether
    /// the file is at its end.
    fn run(
        self,
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
                // Rewritten since discover looked: let the next discover start the new generation.
                Ok(false) => return (0, true),
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
        let base = f.read_pos - have as u64;
        f.read_pos += n as u64;
        f.seen_size = f.seen_size.max(f.read_pos);
        let eof = n < want;

        let TrackedFile {
            source,
            path,
            lines,
            emitted,
            ..
        } = f;
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
