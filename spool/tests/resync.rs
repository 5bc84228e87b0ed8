//! Damage in the middle of the spool costs the damaged batch and nothing else: recovery
//! and running readers resynchronise on the next valid batch header.

use std::fs;
use std::path::{Path, PathBuf};

use sluice_spool::{
    Acknowledged, FsyncPolicy, Position, Spool, SpoolConfig, SpoolError, SpoolReader,
    BATCH_HEADER_LEN,
};

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
    assert!(
        rec.corrupt_segments.is_empty(),
        "{:?}",
        rec.corrupt_segments
    );
    assert_eq!(rec.torn_bytes_truncated, 0);
    assert_eq!(rec.batches, 59);
    // Exactly one batch and its bytes, acknowledged (later commits confirm it).
    assert_eq!(rec.damaged.len(), 1, "{:?}", rec.damaged);
    let d = &rec.damaged[0];
    assert_eq!((d.from, d.to, d.batches), (at, end, 1));
    assert_eq!(d.bytes(), BATCH_HEADER_LEN + payload(victim).len() as u64);
    assert_eq!(d.acknowledged, Acknowledged::Yes);
    let mut r = spool.reader(spool.head()).unwrap();
    let (read, errors) = read_through(&mut r);
    assert_eq!(read, all_but(60, victim));
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        matches!(&errors[0], SpoolError::Damaged { damage, first_report: false } if **damage == *d),
        "{errors:?}"
    );
}

#[test]
fn a_bad_length_in_the_newest_segment_keeps_the_batches_after_it() {
    let tmp = tempfile::tempdir().unwrap();
    // Enough batches that the newest of several segments holds at least four.
    let mut n = 40;
    let pos = loop {
        let dir = tempfile::tempdir().unwrap();
        let pos = fill(dir.path(), n);
        let newest = pos.last().unwrap().0.segment;
        if newest >= 2 && pos.iter().filter(|(p, _)| p.segment == newest).count() >= 4 {
            break fill(tmp.path(), n);
        }
        n += 1;
    };
    let newest = pos.last().unwrap().0.segment;
    let in_newest: Vec<usize> = (0..n).filter(|&i| pos[i].0.segment == newest).collect();
    let victim = in_newest[1];
    // The length field follows the 4-byte batch magic.
    let at = pos[victim].0;
    flip(&seg_path(tmp.path(), newest), at.offset + 6, 0x40);

    let (mut spool, rec) = Spool::open(tmp.path(), cfg()).unwrap();
    assert!(
        rec.corrupt_segments.is_empty(),
        "{:?}",
        rec.corrupt_segments
    );
    assert_eq!(
        rec.torn_bytes_truncated, 0,
        "the valid batches after it were cut off"
    );
    assert_eq!(rec.batches, n as u64 - 1);
    assert_eq!(rec.damaged.len(), 1, "{:?}", rec.damaged);
    assert_eq!(
        (
            rec.damaged[0].from,
            rec.damaged[0].to,
            rec.damaged[0].batches
        ),
        (at, pos[victim].1, 1)
    );
    // Appends go after the last valid batch, not over it.
    assert_eq!(spool.tail(), pos[n - 1].1);
    spool.append(b"after").unwrap();
    spool.commit().unwrap();
    let mut r = spool.reader(spool.head()).unwrap();
    let (read, _) = read_through(&mut r);
    let mut want = all_but(n, victim);
    want.push(b"after".to_vec());
    assert_eq!(read, want);
    // And the next recovery finds the same damage and nothing new.
    drop(r);
    drop(spool);
    let (_, again) = Spool::open(tmp.path(), cfg()).unwrap();
    assert_eq!(again.batches, n as u64);
    assert_eq!(again.damaged, rec.damaged);
    assert_eq!(again.torn_bytes_truncated, 0);
}

/// Damage inside the newest segment's last commit group may be a commit a crash
/// interrupted: it is cut off with the batches after it, which are counted.
#[test]
fn damage_in_the_last_commit_group_is_a_torn_tail() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut spool, _) = Spool::open(tmp.path(), cfg()).unwrap();
    let first = spool.append(&payload(0)).unwrap();
    spool.commit().unwrap();
    let group: Vec<Position> = (1..4).map(|i| spool.append(&payload(i)).unwrap()).collect();
    spool.commit().unwrap();
    let len = spool.tail().offset;
    drop(spool);
    flip(&seg_path(tmp.path(), 0), group[0].offset + 40, 0x08);

    let (spool, rec) = Spool::open(tmp.path(), cfg()).unwrap();
    assert!(rec.damaged.is_empty(), "{:?}", rec.damaged);
    assert_eq!(rec.torn_bytes_truncated, len - group[0].offset);
    assert_eq!(rec.torn_batches_dropped, 2);
    assert_eq!(rec.batches, 1);
    assert_eq!(spool.tail(), group[0]);
    let mut r = spool.reader(first).unwrap();
    assert_eq!(read_through(&mut r).0, vec![payload(0)]);
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
    assert_eq!(
        read,
        all_but(30, victim),
        "the reader stalled or skipped more"
    );
    assert_eq!(errors.len(), 1, "{errors:?}");
    let SpoolError::Damaged {
        damage,
        first_report: true,
    } = &errors[0]
    else {
        panic!("{:?}", errors[0]);
    };
    let end = Position {
        segment: at.segment,
        offset: at.offset + BATCH_HEADER_LEN + payload(victim).len() as u64,
    };
    assert_eq!((damage.from, damage.to), (at, end));
    assert_eq!(damage.batches, 1);
    assert_eq!(damage.acknowledged, Acknowledged::Yes);
    let text = errors[0].to_string();
    assert!(text.contains(&format!("{:020}.seg", at.segment)), "{text}");
    assert!(text.contains(&format!("offset {}", at.offset)), "{text}");
}

/// After a clean close the last commit group is confirmed: damage in it costs only the
/// damaged batch, and it is reported as acknowledged.
#[test]
fn after_a_clean_close_damage_in_the_last_commit_group_costs_one_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut spool, _) = Spool::open(tmp.path(), cfg()).unwrap();
    spool.append(&payload(0)).unwrap();
    spool.commit().unwrap();
    let group: Vec<Position> = (1..4).map(|i| spool.append(&payload(i)).unwrap()).collect();
    spool.commit().unwrap();
    let tail = spool.tail();
    spool.close().unwrap();
    drop(spool);
    flip(&seg_path(tmp.path(), 0), group[0].offset + 40, 0x08);

    let (spool, rec) = Spool::open(tmp.path(), cfg()).unwrap();
    assert_eq!(rec.torn_bytes_truncated, 0);
    assert_eq!(rec.batches, 3);
    assert_eq!(rec.damaged.len(), 1, "{:?}", rec.damaged);
    assert_eq!(
        (rec.damaged[0].from, rec.damaged[0].to),
        (group[0], group[1])
    );
    assert_eq!(rec.damaged[0].acknowledged, Acknowledged::Yes);
    assert_eq!(spool.tail(), tail);
    let mut r = spool.reader(spool.head()).unwrap();
    assert_eq!(read_through(&mut r).0, all_but(4, 1));
}
