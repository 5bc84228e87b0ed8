//! Damage in the middle of the spool costs the damaged batch and nothing else: recovery
//! and running readers resynchronise on the next valid batch header.

use std::fs;
use std::path::{Path, PathBuf};

use sluice_spool::{FsyncPolicy, Position, Spool, SpoolConfig, SpoolError, SpoolReader};

fn cfg() -> SpoolConfig {
    SpoolConfig {
        segment_bytes: 1024,
        max_bytes: 1 << 30,
        fsync: FsyncPolicy::Never,
    }
}

fn payload(i: usize) -> Vec<u8> {
    format!("event {i:03};").repeat(i % 4 + 3).into_bytes()
}

fn seg_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.seg"))
}

/// `n` batches, each committed on its own (as a relay under steady load commits small
/// groups), and their positions and end positions.
fn fill(dir: &Path, n: usize) -> Vec<(Position, Position)> {
    let (mut spool, _) = Spool::open(dir, cfg()).unwrap();
    let mut out = Vec::new();
    for i in 0..n {
        let at = spool.append(&payload(i)).unwrap();
        spool.commit().unwrap();
        out.push((at, spool.tail()));
    }
    out
}

fn flip(path: &Path, at: u64, mask: u8) {
    let mut bytes = fs::read(path).unwrap();
    bytes[at as usize] ^= mask;
    fs::write(path, bytes).unwrap();
}

/// Every batch a reader from the head returns, going on past reported damage.
fn read_through(r: &mut SpoolReader) -> (Vec<Vec<u8>>, Vec<SpoolError>) {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    let mut buf = Vec::new();
    loop {
        match r.next(&mut buf) {
            Ok(Some(_)) => out.push(buf.clone()),
            Ok(None) => return (out, errors),
            Err(e) => {
                errors.push(e);
                assert!(errors.len() < 10, "the reader does not get past damage");
            }
        }
    }
}

fn all_but(n: usize, lost: usize) -> Vec<Vec<u8>> {
    (0..n).filter(|&i| i != lost).map(payload).collect()
}

#[test]
fn one_flipped_byte_in_a_middle_segment_costs_exactly_that_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let pos = fill(tmp.path(), 60);
    let segments: Vec<u64> = {
        let mut s: Vec<u64> = pos.iter().map(|(p, _)| p.segment).collect();
        s.dedup();
        s
    };
    assert!(segments.len() >= 3, "want 3 segments, got {segments:?}");
    let middle = segments[segments.len() / 2];
    let in_middle: Vec<usize> = (0..60).filter(|&i| pos[i].0.segment == middle).collect();
    // A batch in the middle of the middle segment, a byte in the middle of its payload.
    let victim = in_middle[in_middle.len() / 2];
    let (at, end) = pos[victim];
    flip(
        &seg_path(tmp.path(), middle),
        (at.offset + end.offset) / 2,
        0x20,
    );

    let (spool, rec) = Spool::open(tmp.path(), cfg()).unwrap();
    assert!(rec.corrupt_segments.is_empty(), "{:?}", rec.corrupt_segments);
    assert_eq!(rec.torn_bytes_truncated, 0);
    assert_eq!(rec.batches, 59);
    let mut r = spool.reader(spool.head()).unwrap();
    let (read, errors) = read_through(&mut r);
    assert_eq!(read, all_but(60, victim));
    assert_eq!(errors.len(), 1, "{errors:?}");
}

#[test]
fn a_bad_length_in_the_newest_segment_keeps_the_batches_after_it() {
    let tmp = tempfile::tempdir().unwrap();
    let pos = fill(tmp.path(), 40);
    let newest = pos.last().unwrap().0.segment;
    let in_newest: Vec<usize> = (0..40).filter(|&i| pos[i].0.segment == newest).collect();
    assert!(in_newest.len() >= 4, "{in_newest:?}");
    let victim = in_newest[1];
    // The length field is the batch header's second word in today's format and its
    // first in the old one: damage both bytes' worth of the header.
    let at = pos[victim].0;
    for b in 0..8 {
        flip(&seg_path(tmp.path(), newest), at.offset + b, 0x40);
    }

    let (mut spool, rec) = Spool::open(tmp.path(), cfg()).unwrap();
    assert!(rec.corrupt_segments.is_empty(), "{:?}", rec.corrupt_segments);
    assert_eq!(rec.torn_bytes_truncated, 0, "the valid batches after it were cut off");
    assert_eq!(rec.batches, 39);
    // Appends go after the last valid batch, not over it.
    assert_eq!(spool.tail(), pos[39].1);
    spool.append(b"after").unwrap();
    spool.commit().unwrap();
    let mut r = spool.reader(spool.head()).unwrap();
    let (read, _) = read_through(&mut r);
    let mut want = all_but(40, victim);
    want.push(b"after".to_vec());
    assert_eq!(read, want);
}

#[test]
fn a_running_reader_sets_a_damaged_batch_aside_and_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut spool, _) = Spool::open(tmp.path(), cfg()).unwrap();
    let mut pos = Vec::new();
    for i in 0..30 {
        pos.push(spool.append(&payload(i)).unwrap());
        spool.commit().unwrap();
    }
    let victim = 12;
    let at = pos[victim];
    // Bit rot after the batch was written and verified, while the relay runs.
    flip(&seg_path(tmp.path(), at.segment), at.offset + 40, 0x01);

    let mut r = spool.reader(spool.head()).unwrap();
    let (read, errors) = read_through(&mut r);
    assert_eq!(read, all_but(30, victim), "the reader stalled or skipped more");
    assert_eq!(errors.len(), 1, "{errors:?}");
    let text = errors[0].to_string();
    assert!(text.contains(&format!("{:020}.seg", at.segment)), "{text}");
    assert!(text.contains(&format!("offset {}", at.offset)), "{text}");
}
