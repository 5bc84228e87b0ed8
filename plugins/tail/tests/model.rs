//! Model-based test: random sequences of file system actions (write, rename rotation,
//! copytruncate, delete), restarts and polls are applied to the real `Tailer` on real
//! files and to a small model of which numbered line lives where and what was emitted
//! and committed. Afterwards:
//!
//! * every written line was emitted *and committed* (delivered) at least once; emissions
//!   still uncommitted at a restart count for nothing, as an agent's in-flight chunks.
//!   Excepted are the lines the model says may be lost: truncated away (copytruncate)
//!   before they were read and not kept in a copy next to the file that the tailer can
//!   recognise (it knew the stream's first bytes), or destroyed (truncated, or in a deleted file) and not yet
//!   committed when the agent restarted;
//! * if no restart happened with emitted-but-uncommitted lines, every line was emitted
//!   exactly once;
//! * the bytes the tailer reports lost to truncation are exactly the bytes of the lines
//!   the model saw destroyed unread, except for lines written after the tailer's last
//!   look (scan or read) and destroyed before its next one: it cannot know of those, so
//!   they may or may not be in its count.
//!
//! The harness calls `discover()` after every file system action, as if the agent's
//! periodic scan were always fast enough; the races that this hides (a file created and
//! deleted between two scans) are outside what the tailer can see at all. One action is
//! the exception on purpose: `CopyTruncateWhileWriting` truncates app.log while the
//! writer keeps writing, so that the file is longer than the tailer's old read position
//! again before the tailer looks (no `discover()`), as with logrotate's copytruncate on a
//! busy log. The lines written after the truncation must all be delivered, from offset 0
//! of the new generation, and none may be emitted twice.

use std::collections::{HashMap, HashSet};
use std::fs::{self, OpenOptions};
use std::io::Write;

use proptest::prelude::*;
use sluice_tail::{SourceId, TailConfig, Tailer};

#[derive(Clone, Debug)]
enum Op {
    Write {
        lines: u8,
        pad: u8,
    },
    /// app.log.1 -> app.log.2 (the old .2 is deleted), app.log -> app.log.1, new app.log.
    Rotate,
    /// Copy app.log away (outside the globs), then truncate it. `keep`: the copy stays
    /// next to app.log (as logrotate's `app.log.1`, but outside the globs), where the
    /// tailer must find it and read the rest of the old stream from it.
    CopyTruncate {
        keep: bool,
    },
    /// Copy app.log away and truncate it, then keep writing until it is longer than it
    /// was, plus `lines` more: the tailer only learns of it at its next poll or scan.
    CopyTruncateWhileWriting {
        lines: u8,
        keep: bool,
    },
    Delete,
    /// Drop the tailer and start a new one from its checkpoints.
    Restart,
    Poll {
        budget: u16,
        commit: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u8..5, 0u8..30).prop_map(|(lines, pad)| Op::Write { lines, pad }),
        1 => Just(Op::Rotate),
        1 => any::<bool>().prop_map(|keep| Op::CopyTruncate { keep }),
        2 => (0u8..5, any::<bool>())
            .prop_map(|(lines, keep)| Op::CopyTruncateWhileWriting { lines, keep }),
        1 => Just(Op::Delete),
        1 => Just(Op::Restart),
        4 => (1u16..200, any::<bool>()).prop_map(|(budget, commit)| Op::Poll { budget, commit }),
    ]
}

/// One physical file of the model.
struct ModelFile {
    /// Current name, `None` once deleted.
    name: Option<String>,
    /// Line numbers it holds (in order) with their size in bytes, newline included.
    lines: Vec<(u64, u64)>,
}

struct Harness {
    dir: tempfile::TempDir,
    cfg: TailConfig,
    tailer: Tailer,
    files: Vec<ModelFile>,
    next_line: u64,
    /// Emissions per line number over all tailer instances.
    emitted: HashMap<u64, u32>,
    /// Lines the current tailer instance has handed out (or resumed past).
    seen_by_current: HashSet<u64>,
    committed: HashSet<u64>,
    /// Lines whose bytes no longer exist in any followed file (truncated away).
    destroyed: HashSet<u64>,
    pending: Vec<(SourceId, u64, u64)>,
    may_be_lost: HashSet<u64>,
    expected_lost_bytes: u64,
    /// Lines written since the tailer last scanned (it may not have seen them at all).
    unseen: HashSet<u64>,
    /// Bytes of such lines destroyed unread: the tailer may or may not count them.
    unseen_lost_bytes: u64,
    /// Bytes destroyed unread by a truncation the tailer has not looked at yet: counted
    /// once it scans; a restart before may or may not have counted them.
    unnoticed_lost_bytes: u64,
    reported_lost_bytes: u64,
    clean: bool,
    copies: u32,
    /// The tailer has looked at app.log since its current stream began (it knows the
    /// stream's first bytes, so it can recognise the stream's copy).
    stream_known: bool,
}

impl Harness {
    fn new(read_chunk_bytes: usize) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("copies")).unwrap();
        let cfg = TailConfig {
            include: vec![format!("{}/app.log*", dir.path().display())],
            read_chunk_bytes,
            max_line_bytes: 1024,
            ..TailConfig::default()
        };
        let tailer = Tailer::new("model", cfg.clone(), &[]).unwrap();
        Harness {
            dir,
            cfg,
            tailer,
            files: Vec::new(),
            next_line: 0,
            emitted: HashMap::new(),
            seen_by_current: HashSet::new(),
            committed: HashSet::new(),
            destroyed: HashSet::new(),
            pending: Vec::new(),
            may_be_lost: HashSet::new(),
            expected_lost_bytes: 0,
            unseen: HashSet::new(),
            unseen_lost_bytes: 0,
            unnoticed_lost_bytes: 0,
            reported_lost_bytes: 0,
            clean: true,
            copies: 0,
            stream_known: true,
        }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    fn named(&self, name: &str) -> Option<usize> {
        self.files
            .iter()
            .position(|f| f.name.as_deref() == Some(name))
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Write { lines, pad } => {
                self.write(lines, pad);
            }
            Op::Rotate => {
                if let Some(i) = self.named("app.log.2") {
                    fs::remove_file(self.path("app.log.2")).unwrap();
                    self.files[i].name = None;
                }
                for (from, to) in [("app.log.1", "app.log.2"), ("app.log", "app.log.1")] {
                    if let Some(i) = self.named(from) {
                        fs::rename(self.path(from), self.path(to)).unwrap();
                        self.files[i].name = Some(to.into());
                    }
                }
                fs::File::create(self.path("app.log")).unwrap();
                self.files.push(ModelFile {
                    name: Some("app.log".into()),
                    lines: Vec::new(),
                });
            }
            Op::CopyTruncate { keep } => self.copy_truncate(keep),
            Op::CopyTruncateWhileWriting { lines, keep } => {
                // (A file the tailer was never told of is only a write.)
                if let Some(i) = self.named("app.log") {
                    let before = self.size(i);
                    let expected = self.expected_lost_bytes;
                    self.copy_truncate(keep);
                    // A new stream the tailer has not looked at yet.
                    self.stream_known = false;
                    // Not noticed yet.
                    self.unnoticed_lost_bytes += self.expected_lost_bytes - expected;
                    self.expected_lost_bytes = expected;
                    let first = self.next_line;
                    let mut after = 0;
                    while after <= before {
                        after += self.write(1, 0);
                    }
                    self.write(lines, 3);
                    self.unseen.extend(first..self.next_line);
                    // No discover(): the tailer finds out when it next reads or scans.
                    return;
                }
                self.write(lines, 3);
            }
            Op::Delete => {
                if let Some(i) = self.named("app.log") {
                    fs::remove_file(self.path("app.log")).unwrap();
                    self.files[i].name = None;
                }
            }
            Op::Restart => {
                self.reported_lost_bytes += self.tailer.stats().bytes_lost_to_truncation;
                if !self.pending.is_empty() {
                    self.clean = false;
                }
                self.pending.clear();
                // Closing a deleted file loses what was not committed from it; what was
                // truncated away and not committed cannot be read again either.
                let deleted = self.files.iter().filter(|f| f.name.is_none());
                let gone = deleted.flat_map(|f| f.lines.iter().map(|(no, _)| *no));
                for no in gone.chain(self.destroyed.iter().copied()) {
                    if !self.committed.contains(&no) {
                        self.may_be_lost.insert(no);
                    }
                }
                self.unseen.clear();
                // A truncation the old instance did not notice: the new one sees only that
                // the file differs from its checkpoint, not what the old stream held.
                self.unseen_lost_bytes += std::mem::take(&mut self.unnoticed_lost_bytes);
                let cps = self.tailer.checkpoints();
                let fresh = Tailer::new("model", self.cfg.clone(), &cps).unwrap();
                self.tailer = fresh;
                self.stream_known = true;
                // The new instance resumes right after the committed lines.
                self.seen_by_current = self.committed.clone();
                return; // Tailer::new scans by itself
            }
            Op::Poll { budget, commit } => {
                self.poll(budget as usize);
                if commit {
                    self.commit_all();
                }
                return;
            }
        }
        self.scanned();
    }

    /// After `discover()`: the tailer has seen every file as it is now.
    fn scanned(&mut self) {
        self.tailer.discover().unwrap();
        self.unseen.clear();
        self.stream_known = true;
        self.expected_lost_bytes += std::mem::take(&mut self.unnoticed_lost_bytes);
    }

    /// Appends `lines` numbered lines to app.log (creating it); returns the bytes written.
    fn write(&mut self, lines: u8, pad: u8) -> u64 {
        let idx = match self.named("app.log") {
            Some(i) => i,
            None => {
                self.files.push(ModelFile {
                    name: Some("app.log".into()),
                    lines: Vec::new(),
                });
                self.files.len() - 1
            }
        };
        let mut text = Vec::new();
        for _ in 0..lines {
            let no = self.next_line;
            self.next_line += 1;
            let line = format!("line-{no:06}-{}\n", "x".repeat(pad as usize));
            self.files[idx].lines.push((no, line.len() as u64));
            text.extend_from_slice(line.as_bytes());
        }
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("app.log"))
            .unwrap();
        f.write_all(&text).unwrap();
        text.len() as u64
    }

    fn size(&self, idx: usize) -> u64 {
        self.files[idx].lines.iter().map(|(_, len)| len).sum()
    }

    /// Copies app.log away (outside the globs) and truncates it. Lines the current tailer
    /// has not read are lost, and must be counted as lost; unless the copy is kept next
    /// to app.log and the tailer knows the stream: then they are read from the copy
    /// (delivered, not counted), except after a restart that came before the tailer
    /// noticed the truncation (the new instance only sees a file that differs from its
    /// checkpoint: lost, and covered by `destroyed`).
    fn copy_truncate(&mut self, keep: bool) {
        let Some(i) = self.named("app.log") else {
            return;
        };
        self.copies += 1;
        let copy = if keep {
            self.dir.path().join(format!("rotated-{}", self.copies))
        } else {
            self.dir.path().join(format!("copies/{}", self.copies))
        };
        let recoverable = keep && self.stream_known;
        fs::copy(self.path("app.log"), copy).unwrap();
        OpenOptions::new()
            .write(true)
            .open(self.path("app.log"))
            .unwrap()
            .set_len(0)
            .unwrap();
        for (no, len) in std::mem::take(&mut self.files[i].lines) {
            self.destroyed.insert(no);
            if !self.seen_by_current.contains(&no) && !recoverable {
                if self.unseen.contains(&no) {
                    self.unseen_lost_bytes += len;
                } else {
                    self.expected_lost_bytes += len;
                }
                if !self.committed.contains(&no) {
                    self.may_be_lost.insert(no);
                }
            }
        }
    }

    fn poll(&mut self, budget: usize) -> usize {
        let mut got = Vec::new();
        let n = self
            .tailer
            .poll(budget, &mut |l| {
                let text = std::str::from_utf8(l.bytes).unwrap();
                let no: u64 = text[5..11].parse().unwrap();
                assert!(!l.truncated);
                got.push((l.source.clone(), l.end, no));
            })
            .unwrap();
        for (source, end, no) in got {
            *self.emitted.entry(no).or_default() += 1;
            self.seen_by_current.insert(no);
            self.pending.push((source, end, no));
        }
        n
    }

    fn commit_all(&mut self) {
        for (source, end, no) in self.pending.drain(..) {
            self.tailer.commit(&source, end);
            self.committed.insert(no);
        }
    }

    fn finish(mut self) {
        self.scanned();
        while self.poll(1 << 20) > 0 {
            self.commit_all();
        }
        self.commit_all();
        self.reported_lost_bytes += self.tailer.stats().bytes_lost_to_truncation;
        for no in 0..self.next_line {
            let count = self.emitted.get(&no).copied().unwrap_or(0);
            if !self.may_be_lost.contains(&no) {
                assert!(
                    self.committed.contains(&no),
                    "line {no} never delivered (emitted {count} times)"
                );
            }
            if self.clean {
                assert!(
                    count <= 1,
                    "line {no} emitted {count} times without an unclean restart"
                );
            }
        }
        assert!(
            self.expected_lost_bytes <= self.reported_lost_bytes
                && self.reported_lost_bytes <= self.expected_lost_bytes + self.unseen_lost_bytes,
            "bytes lost to truncation: reported {}, expected {} (+ up to {} unseen)",
            self.reported_lost_bytes,
            self.expected_lost_bytes,
            self.unseen_lost_bytes
        );
        // Everything is read and committed: only files still matched by the globs stay open.
        let live = self.files.iter().filter(|f| f.name.is_some()).count() as u64;
        assert_eq!(self.tailer.stats().files_open, live);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn tailer_agrees_with_model(ops in proptest::collection::vec(op(), 1..60), chunk in 7usize..64) {
        let mut h = Harness::new(chunk);
        for op in &ops {
            h.apply(op);
        }
        h.finish();
    }
}
