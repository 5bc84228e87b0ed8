//! Behaviour of the Tailer on real files: rotation kinds, identity, lines, restarts.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sluice_tail::{FileCheckpoint, Fingerprint, LongLines, SourceId, StartAt, TailConfig, Tailer};

#[derive(Clone, Debug, PartialEq)]
struct Got {
    source: SourceId,
    path: PathBuf,
    offset: u64,
    end: u64,
    text: Vec<u8>,
    truncated: bool,
    start_seq: u64,
}

fn cfg(dir: &Path, glob: &str) -> TailConfig {
    TailConfig {
        include: vec![format!("{}/{glob}", dir.display())],
        ..TailConfig::default()
    }
}

fn append(path: &Path, bytes: &[u8]) {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    f.write_all(bytes).unwrap();
}

fn drain(t: &mut Tailer) -> Vec<Got> {
    let mut got = Vec::new();
    loop {
        let n = t
            .poll(1 << 20, &mut |l| {
                got.push(Got {
                    source: l.source.clone(),
                    path: l.path.to_path_buf(),
                    offset: l.offset,
                    end: l.end,
                    text: l.bytes.to_vec(),
                    truncated: l.truncated,
                    start_seq: l.start_seq,
                })
            })
            .unwrap();
        if n == 0 {
            return got;
        }
    }
}

fn texts(got: &[Got]) -> Vec<String> {
    got.iter()
        .map(|g| String::from_utf8_lossy(&g.text).into_owned())
        .collect()
}

fn commit_all(t: &mut Tailer, got: &[Got]) {
    for g in got {
        t.commit(&g.source, g.end);
    }
}

#[test]
fn reads_lines_with_offsets_and_resumes_from_committed_only() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    append(&log, b"one\ntwo\nthree\n");
    let mut t = Tailer::new("in", cfg(dir.path(), "*.log"), &[]).unwrap();
    let got = drain(&mut t);
    assert_eq!(texts(&got), ["one", "two", "three"]);
    assert_eq!((got[1].offset, got[1].end), (4, 8));
    assert!(got[0].source.0.starts_with("in:"));
    // Only "one" and "two" acknowledged: "three" comes again after a restart.
    t.commit(&got[1].source, got[1].end);
    let cps = t.checkpoints();
    assert_eq!(cps.len(), 1);
    assert_eq!(cps[0].offset, 8);
    drop(t);
    let mut t = Tailer::new("in", cfg(dir.path(), "*.log"), &cps).unwrap();
    let again = drain(&mut t);
    assert_eq!(texts(&again), ["three"]);
    assert_eq!(again[0].source, got[2].source);
    assert_eq!(again[0].offset, got[2].offset);
}

#[test]
fn the_seq_committed_with_a_position_is_where_numbering_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    append(&log, b"one\ntwo\nthree\n");
    let mut t = Tailer::new("in", cfg(dir.path(), "*.log"), &[]).unwrap();
    let got = drain(&mut t);
    assert!(
        got.iter().all(|g| g.start_seq == 0),
        "a new stream numbers from 0"
    );
    // The reader made two events of "one" and "two" (seqs 0 and 1): next is 2.
    t.commit_seq(&got[1].source, got[1].end, Some(2));
    // A later commit without a seq, or with a lower one, keeps it.
    t.commit_seq(&got[1].source, got[1].end, Some(1));
    t.commit(&got[1].source, got[1].end);
    let cps = t.checkpoints();
    assert_eq!((cps[0].offset, cps[0].seq), (8, Some(2)));
    drop(t);
    let mut t = Tailer::new("in", cfg(dir.path(), "*.log"), &cps).unwrap();
    let again = drain(&mut t);
    assert_eq!(texts(&again), ["three"]);
    assert_eq!(again[0].start_seq, 2);

    // A version 1 checkpoint (no seq; events were numbered by offset): numbering goes on
    // from the file's size, above every offset an earlier agent could have sent.
    let mut v1 = cps[0].clone();
    v1.seq = None;
    append(&log, b"four\n");
    let mut t = Tailer::new("in", cfg(dir.path(), "*.log"), &[v1]).unwrap();
    let again = drain(&mut t);
    assert_eq!(texts(&again), ["three", "four"]);
    assert_eq!(
        again[0].start_seq, 19,
        "the file's size when it was resumed"
    );
}

#[test]
fn rename_and_create_reads_old_to_end_and_new_from_zero_once() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    append(&log, b"a\nb\n");
    // The glob matches the rotated names too: identity must prevent a second read.
    let mut t = Tailer::new("in", cfg(dir.path(), "app.log*"), &[]).unwrap();
    let first = drain(&mut t);
    append(&log, b"c\n"); // written just before rotation, not yet read
    fs::rename(&log, dir.path().join("app.log.1")).unwrap();
    append(&log, b"d\n");
    t.discover().unwrap();
    let second = drain(&mut t);
    let mut all = texts(&first);
    all.extend(texts(&second));
    all.sort();
    assert_eq!(all, ["a", "b", "c", "d"]);
    let c = second.iter().find(|g| g.text == b"c").unwrap();
    assert_eq!(c.source, first[0].source);
    assert_eq!(c.path, dir.path().join("app.log.1"));
    assert_eq!(t.stats().files_open, 2);
}

#[test]
fn rotated_out_of_glob_is_finished_then_closed_after_commit() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    append(&log, b"a\n");
    let mut t = Tailer::new("in", cfg(dir.path(), "app.log"), &[]).unwrap();
    let mut got = drain(&mut t);
    append(&log, b"b\n");
    fs::rename(&log, dir.path().join("app.log.1")).unwrap();
    append(&log, b"c\n");
    t.discover().unwrap();
    assert_eq!(t.stats().files_gone, 1);
    got.extend(drain(&mut t));
    let mut all = texts(&got);
    all.sort();
    assert_eq!(all, ["a", "b", "c"]);
    commit_all(&mut t, &got);
    let s = t.stats();
    assert_eq!((s.files_open, s.files_gone), (1, 0));
}

#[test]
fn copytruncate_starts_new_generation_and_counts_unread_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    append(&log, b"aaa\nbbb\n");
    let mut t = Tailer::new("in", cfg(dir.path(), "app.log"), &[]).unwrap();
    let first = drain(&mut t);
    t.commit(&first[1].source, first[1].end);
    append(&log, b"ccc\n");
    t.discover().unwrap(); // sees the size, not yet read
    let elsewhere = tempfile::tempdir().unwrap(); // no rotated copy next to the file
    fs::copy(&log, elsewhere.path().join("copy")).unwrap();
    OpenOptions::new()
        .write(true)
        .open(&log)
        .unwrap()
        .set_len(0)
        .unwrap();
    append(&log, b"d\n");
    t.discover().unwrap();
    let s = t.stats();
    assert_eq!((s.truncations, s.bytes_lost_to_truncation), (1, 4));
    let second = drain(&mut t);
    assert_eq!(texts(&second), ["d"]);
    assert_eq!(second[0].offset, 0);
    assert_ne!(second[0].source, first[0].source);
    assert!(second[0].source.0.ends_with(":1"), "{}", second[0].source);
    // A late commit for the old generation is harmless.
    t.commit(&first[0].source, 100);
    commit_all(&mut t, &second);
    assert_eq!(t.checkpoints()[0].offset, 2);
    assert_eq!(t.checkpoints()[0].generation, 1);
}

#[test]
fn truncated_and_regrown_between_scans_is_noticed_by_fingerprint() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    append(&log, b"aaaa\n");
    let mut t = Tailer::new("in", cfg(dir.path(), "app.log"), &[]).unwrap();
    let first = drain(&mut t);
    fs::write(&log, b"bbbbbbbbbbbbbbbb\n").unwrap(); // truncate + write, larger than before
    t.discover().unwrap();
    let second = drain(&mut t);
    assert_eq!(texts(&second), ["bbbbbbbbbbbbbbbb"]);
    assert_eq!(second[0].offset, 0);
    assert_ne!(second[0].source, first[0].source);
    assert_eq!(t.stats().truncations, 1);
}

fn copy_truncate(log: &Path, copy: &Path) {
    fs::copy(log, copy).unwrap();
    OpenOptions::new()
        .write(true)
        .open(log)
        .unwrap()
        .set_len(0)
        .unwrap();
}

/// logrotate's copytruncate on a busy log: the writer keeps appending, and the file is
/// longer than the tailer's read position again before the tailer looks (no scan in
/// between). The new stream is read from offset 0 under a new source id; nothing of it
/// is skipped or handed out under the old id; the old stream's unread bytes are counted.
#[test]
fn truncated_and_regrown_past_the_read_position_before_a_scan_is_read_from_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    append(&log, b"old-1\nold-2\n");
    let mut t = Tailer::new("in", cfg(dir.path(), "app.log"), &[]).unwrap();
    let first = drain(&mut t);
    assert_eq!(texts(&first), ["old-1", "old-2"]);
    // Not committed: in flight when the truncation comes.
    append(&log, b"old-3\n");
    t.discover().unwrap(); // sees the size, not yet read
    let elsewhere = tempfile::tempdir().unwrap(); // no rotated copy next to the file
    copy_truncate(&log, &elsewhere.path().join("copy"));
    append(&log, b"new-1\nnew-2\nnew-3\n"); // 18 bytes, past the old position 12
    let second = drain(&mut t);
    assert_eq!(texts(&second), ["new-1", "new-2", "new-3"]);
    assert_eq!(second[0].offset, 0);
    assert!(second.iter().all(|g| g.source != first[0].source));
    let s = t.stats();
    assert_eq!((s.truncations, s.bytes_lost_to_truncation), (1, 6));
    // The in-flight chunk of the old stream is acknowledged late: harmless.
    commit_all(&mut t, &first);
    commit_all(&mut t, &second);
    t.discover().unwrap();
    assert!(drain(&mut t).is_empty());
    assert_eq!(t.stats().truncations, 1);
    let cp = &t.checkpoints()[0];
    assert_eq!((cp.offset, cp.generation), (18, 1));
}

/// logrotate's copytruncate with the rotated copy next to the file: the lines written
/// after the tailer's last read and copied before the truncation are read from the copy,
/// as the continuation of the old stream (same source id, same offsets), once; then the
/// copy is closed. Nothing is lost or counted lost.
#[test]
fn copytruncate_reads_the_unread_rest_of_the_old_stream_from_the_rotated_copy() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    let copy = dir.path().join("app.log.1");
    append(&log, b"old-1\nold-2\n");
    let mut t = Tailer::new("in", cfg(dir.path(), "app.log"), &[]).unwrap();
    let first = drain(&mut t);
    assert_eq!(texts(&first), ["old-1", "old-2"]);
    let old = first[0].source.clone();
    // Written after the last read, copied, then truncated; a partial line is in flight
    // at the end of the copy too.
    append(&log, b"old-3\nold-4\nold-5");
    copy_truncate(&log, &copy);
    append(&log, b"new-1\nnew-2\n");
    let mut second = drain(&mut t);
    let of = |got: &[Got], s: &SourceId| -> Vec<(String, u64)> {
        got.iter()
            .filter(|g| &g.source == s)
            .map(|g| (String::from_utf8_lossy(&g.text).into_owned(), g.offset))
            .collect()
    };
    assert_eq!(
        of(&second, &old),
        [("old-3".to_string(), 12), ("old-4".to_string(), 18)]
    );
    let new = second
        .iter()
        .find(|g| g.source != old)
        .expect("new stream")
        .source
        .clone();
    assert_eq!(
        of(&second, &new),
        [("new-1".to_string(), 0), ("new-2".to_string(), 6)]
    );
    assert_eq!(second.len(), 4);
    assert!(second
        .iter()
        .filter(|g| g.source == old)
        .all(|g| g.path == copy));
    let s = t.stats();
    assert_eq!((s.truncations, s.bytes_lost_to_truncation), (1, 0));
    // The copy's last line has no newline: handed out once it waited the timeout.
    std::thread::sleep(TailConfig::default().partial_line_timeout + Duration::from_millis(50));
    let third = drain(&mut t);
    assert_eq!(of(&third, &old), [("old-5".to_string(), 24)]);
    assert!(third.iter().all(|g| g.source == old));
    second.extend(third);
    commit_all(&mut t, &first);
    commit_all(&mut t, &second);
    t.discover().unwrap();
    assert!(drain(&mut t).is_empty());
    let s = t.stats();
    assert_eq!(
        (s.files_open, s.truncations, s.bytes_lost_to_truncation),
        (1, 1, 0)
    );
}

/// A file that is a copy of the old stream but followed already (matched by the globs,
/// read as a stream of its own) is not taken as the continuation: no line twice.
#[test]
fn copy_that_is_followed_already_is_not_read_again_as_the_continuation() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    append(&log, b"old-1\n");
    let mut t = Tailer::new("in", cfg(dir.path(), "app.log*"), &[]).unwrap();
    assert_eq!(texts(&drain(&mut t)), ["old-1"]);
    append(&log, b"old-2\n");
    t.discover().unwrap(); // sees the size, not yet read
    copy_truncate(&log, &dir.path().join("app.log.1"));
    t.discover().unwrap(); // follows app.log.1 as a file of its own, notices the truncation
    append(&log, b"new-1\n");
    let mut all = texts(&drain(&mut t));
    all.sort();
    assert_eq!(all, ["new-1", "old-1", "old-2"]);
    // Not read from the copy as the old stream: lost for it (the copy's own stream has it).
    let s = t.stats();
    assert_eq!((s.truncations, s.bytes_lost_to_truncation), (1, 6));
}

/// Truncated, and written again but not yet up to the old position: noticed at the next
/// read, without waiting for a scan; an incomplete last line of the old stream is lost
/// and counted.
#[test]
fn truncation_is_noticed_at_the_next_read() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    append(&log, b"0123456789\npartial");
    let mut t = Tailer::new("in", cfg(dir.path(), "app.log"), &[]).unwrap();
    assert_eq!(texts(&drain(&mut t)), ["0123456789"]);
    let elsewhere = tempfile::tempdir().unwrap(); // no rotated copy next to the file
    copy_truncate(&log, &elsewhere.path().join("copy"));
    append(&log, b"x\n");
    let got = drain(&mut t);
    assert_eq!(texts(&got), ["x"]);
    assert_eq!(got[0].offset, 0);
    let s = t.stats();
    assert_eq!((s.truncations, s.bytes_lost_to_truncation), (1, 7));
}

#[test]
fn deleted_while_unread_is_read_held_counted_and_closed_after_commit() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    append(&log, b"x\ny\n");
    let mut c = cfg(dir.path(), "app.log");
    c.max_deleted_bytes = 1;
    let mut t = Tailer::new("in", c, &[]).unwrap();
    fs::remove_file(&log).unwrap();
    t.discover().unwrap();
    let s = t.stats();
    assert_eq!(
        (s.deleted_bytes_held, s.deleted_bytes_alarm, s.files_gone),
        (4, true, 1)
    );
    let got = drain(&mut t);
    assert_eq!(texts(&got), ["x", "y"]);
    t.discover().unwrap();
    assert_eq!(t.stats().files_open, 1, "kept open until committed");
    commit_all(&mut t, &got);
    t.discover().unwrap();
    let s = t.stats();
    assert_eq!(
        (s.files_open, s.deleted_bytes_held, s.deleted_bytes_alarm),
        (0, 0, false)
    );
    assert!(t.checkpoints().is_empty());
}

#[test]
fn long_lines_split_and_truncate_never_stall() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    append(&log, b"0123456789\nok\n");
    let mut c = cfg(dir.path(), "app.log");
    c.max_line_bytes = 4;
    c.read_chunk_bytes = 3;
    let mut t = Tailer::new("in", c.clone(), &[]).unwrap();
    let got = drain(&mut t);
    assert_eq!(texts(&got), ["0123", "4567", "89", "ok"]);
    assert_eq!(
        got.iter().map(|g| g.truncated).collect::<Vec<_>>(),
        [true, true, true, false]
    );
    assert_eq!((got[2].offset, got[2].end), (8, 11));
    assert_eq!(t.stats().lines_split, 1);

    c.long_lines = LongLines::Truncate;
    let mut t = Tailer::new("in", c, &[]).unwrap();
    let got = drain(&mut t);
    assert_eq!(texts(&got), ["0123", "ok"]);
    let s = t.stats();
    assert_eq!((s.lines_truncated, s.bytes_skipped), (1, 7));
    // Skipped bytes are never handed out: once the head is committed and nothing else is
    // pending, the checkpoint moves past them (a restart does not emit the line's tail).
    commit_all(&mut t, &got[..1]);
    assert_eq!(
        t.checkpoints()[0].offset,
        4,
        "\"ok\" is handed out but not committed"
    );
    commit_all(&mut t, &got);
    assert_eq!(t.checkpoints()[0].offset, 14);
    append(&log, b"9876543210\n");
    let head = drain(&mut t);
    assert_eq!(texts(&head), ["9876"]);
    assert_eq!(head[0].end, 18);
    commit_all(&mut t, &head);
    assert_eq!(t.checkpoints()[0].offset, 25);
}

#[test]
fn crlf_stripped_and_invalid_utf8_passed_through() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    append(&log, b"dos\r\n\xff\xfe bytes\n\r\n");
    let mut t = Tailer::new("in", cfg(dir.path(), "app.log"), &[]).unwrap();
    let got = drain(&mut t);
    let raw: Vec<&[u8]> = got.iter().map(|g| g.text.as_slice()).collect();
    assert_eq!(raw, [&b"dos"[..], &b"\xff\xfe bytes"[..], &b""[..]]);
    assert_eq!(got[0].end, 5);
}

#[test]
fn partial_last_line_waits_for_newline_or_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    append(&log, b"done\nhalf");
    let mut c = cfg(dir.path(), "app.log");
    c.partial_line_timeout = Duration::from_secs(3600);
    let mut t = Tailer::new("in", c.clone(), &[]).unwrap();
    assert_eq!(texts(&drain(&mut t)), ["done"]);
    append(&log, b" more\n");
    let got = drain(&mut t);
    assert_eq!(texts(&got), ["half more"]);
    assert_eq!((got[0].offset, got[0].end), (5, 15));

    // With no patience the partial line goes out as soon as the file ends.
    c.partial_line_timeout = Duration::ZERO;
    let log2 = dir.path().join("app.log");
    append(&log2, b"tail");
    let mut t = Tailer::new("in", c, &[]).unwrap();
    let got = drain(&mut t);
    assert_eq!(texts(&got), ["done", "half more", "tail"]);
    assert_eq!(got[2].end, 19);
    assert_eq!(t.stats().partial_lines_flushed, 1);
}

#[test]
fn inode_reuse_is_caught_by_the_fingerprint() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    append(&log, b"new file content\n");
    let meta = fs::metadata(&log).unwrap();
    use std::os::unix::fs::MetadataExt;
    // A checkpoint of an older file that had the same device and inode.
    let stale = FileCheckpoint {
        input: "in".into(),
        source: SourceId("in:old".into()),
        path: log.clone(),
        dev: meta.dev(),
        ino: meta.ino(),
        fingerprint: Fingerprint::of(b"old file content\n"),
        generation: 0,
        offset: 10,
        seq: Some(3),
    };
    let mut t = Tailer::new("in", cfg(dir.path(), "app.log"), &[stale]).unwrap();
    let got = drain(&mut t);
    assert_eq!(texts(&got), ["new file content"]);
    assert_ne!(got[0].source.0, "in:old");
}

#[test]
fn restart_finds_files_renamed_twice_and_drops_vanished_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    let other = dir.path().join("app.log.other");
    append(&log, b"short\n"); // shorter than the fingerprint: must keep its identity
    append(&other, b"o\n");
    let mut c = cfg(dir.path(), "app.log*");
    c.start_at = StartAt::End;
    let mut t = Tailer::new("in", c.clone(), &[]).unwrap();
    append(&log, b"l1\n");
    let got = drain(&mut t);
    assert_eq!(texts(&got), ["l1"]);
    commit_all(&mut t, &got);
    append(&log, b"l2\n");
    let cps = t.checkpoints();
    assert_eq!(cps.len(), 2);
    drop(t);
    // While stopped: rotated twice, a new file appears, one file disappears.
    fs::rename(&log, dir.path().join("app.log.1")).unwrap();
    fs::rename(dir.path().join("app.log.1"), dir.path().join("app.log.2")).unwrap();
    append(&log, b"fresh\n");
    fs::remove_file(&other).unwrap();
    let mut t = Tailer::new("in", c, &cps).unwrap();
    let mut got = drain(&mut t);
    got.sort_by_key(|g| g.text.clone());
    // The renamed file resumes at its checkpoint. The new one was created while the agent
    // was stopped: start_at = end applies to the very first start only, so it is read
    // from its beginning.
    assert_eq!(texts(&got), ["fresh", "l2"]);
    let got = &got[1..];
    assert_eq!(got[0].path, dir.path().join("app.log.2"));
    assert_eq!(
        got[0].source,
        cps.iter().find(|c| c.path == log).unwrap().source
    );
    assert_eq!(t.checkpoints().len(), 2);
    assert!(t.checkpoints().iter().all(|c| c.path != other));
    assert!(t.checkpoints().iter().any(|c| c.path == log));
    // Files created after startup are read from 0.
    append(&dir.path().join("app.log.new"), b"later\n");
    t.discover().unwrap();
    assert_eq!(texts(&drain(&mut t)), ["later"]);
}

#[test]
fn rotated_out_of_glob_while_stopped_is_finished_from_its_last_path() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    append(&log, b"a\n");
    let c = cfg(dir.path(), "app.log");
    let mut t = Tailer::new("in", c.clone(), &[]).unwrap();
    let got = drain(&mut t);
    commit_all(&mut t, &got);
    append(&log, b"b\n");
    let cps = t.checkpoints();
    drop(t);
    let rotated = dir.path().join("app.log.1");
    fs::rename(&log, &rotated).unwrap();
    let mut cps2 = cps.clone();
    cps2[0].path = rotated.clone(); // e.g. the rename happened while we were running
    let mut t = Tailer::new("in", c.clone(), &cps2).unwrap();
    assert_eq!(texts(&drain(&mut t)), ["b"]);
    // Without a usable path the checkpoint is dropped.
    let t = Tailer::new("in", c, &cps).unwrap();
    assert!(t.checkpoints().is_empty());
}

#[test]
fn many_files_are_read_fairly() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["a.log", "b.log", "c.log"] {
        append(&dir.path().join(name), "x\n".repeat(100).as_bytes());
    }
    let mut c = cfg(dir.path(), "*.log");
    c.read_chunk_bytes = 10;
    let mut t = Tailer::new("in", c, &[]).unwrap();
    let mut paths = Vec::new();
    let n = t
        .poll(30, &mut |l| paths.push(l.path.to_path_buf()))
        .unwrap();
    assert_eq!(n, 30);
    for name in ["a.log", "b.log", "c.log"] {
        assert_eq!(
            paths.iter().filter(|p| p.ends_with(name)).count(),
            5,
            "{paths:?}"
        );
    }
}

#[test]
fn empty_file_waits_for_bytes_before_it_gets_an_identity() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    append(&log, b"");
    let mut t = Tailer::new("in", cfg(dir.path(), "app.log"), &[]).unwrap();
    assert!(drain(&mut t).is_empty());
    assert!(t.checkpoints().is_empty());
    assert_eq!(t.stats().files_open, 1);
    append(&log, b"first\n");
    assert_eq!(texts(&drain(&mut t)), ["first"]);
    assert_eq!(t.checkpoints().len(), 1);
}

#[test]
fn bad_patterns_and_config_are_errors() {
    let c = TailConfig {
        include: vec!["/var/log/[".into()],
        ..TailConfig::default()
    };
    let err = Tailer::new("in", c, &[]).unwrap_err().to_string();
    assert!(err.contains("/var/log/["), "{err}");
    let c = TailConfig {
        max_line_bytes: 0,
        ..TailConfig::default()
    };
    assert!(Tailer::new("in", c, &[]).is_err());
}

/// Whether this process holds `path` open (watched through /proc/self/fd).
fn held_open(path: &Path) -> bool {
    fs::read_dir("/proc/self/fd")
        .map(|fds| {
            fds.flatten()
                .filter_map(|fd| fs::read_link(fd.path()).ok())
                .any(|target| target == path)
        })
        .unwrap_or(false)
}

#[test]
fn file_created_rotated_and_deleted_between_scans_is_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    let mut t = Tailer::new("in", cfg(dir.path(), "app.log*"), &[]).unwrap();
    append(&log, b"one\ntwo\n");
    // No scan runs; the watcher alone must open the file before its last name is gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !held_open(&log) {
        assert!(
            std::time::Instant::now() < deadline,
            "the watcher never opened the new file"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    fs::rename(&log, dir.path().join("app.log.1")).unwrap();
    append(&dir.path().join("app.log.1"), b"three\n");
    fs::remove_file(dir.path().join("app.log.1")).unwrap();
    t.discover().unwrap();
    let got = drain(&mut t);
    assert_eq!(texts(&got), ["one", "two", "three"]);
    assert_eq!(t.stats().files_gone, 1);
    commit_all(&mut t, &got);
    t.discover().unwrap();
    assert_eq!(t.stats().files_open, 0, "finished deleted file closed");
    // A handle the watcher opened for an old name of a forgotten file is not adopted
    // again as a new file: nothing more is read.
    t.discover().unwrap();
    assert!(drain(&mut t).is_empty());
}

#[test]
fn source_id_is_the_same_when_computed_again_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    let mut c = cfg(dir.path(), "*.log");
    c.watch = false;
    append(&log, b"first line\n");
    let mut t = Tailer::new("in", c.clone(), &[]).unwrap();
    let first = drain(&mut t);
    // Crash before any checkpoint: the file has grown since, and the new instance must
    // still name the stream the same, or the relay could not recognise resent lines.
    drop(t);
    append(&log, &[b'x'; 300]);
    append(&log, b"\n");
    let mut t = Tailer::new("in", c, &[]).unwrap();
    let again = drain(&mut t);
    assert_eq!(first[0].source, again[0].source);
    assert_eq!(again.len(), 2);
}
