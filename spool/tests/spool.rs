//! Behaviour of a healthy spool: round trips, visibility, cursors, snapshots, gc, limits.

use std::path::Path;

use sluice_spool::{
    FsyncPolicy, Position, Spool, SpoolConfig, SpoolError, SpoolReader, BATCH_HEADER_LEN,
    SEGMENT_HEADER_LEN,
};

fn cfg(segment_bytes: u64) -> SpoolConfig {
    SpoolConfig {
        segment_bytes,
        max_bytes: 1 << 30,
        fsync: FsyncPolicy::Always,
    }
}

fn open(dir: &Path, segment_bytes: u64) -> Spool {
    Spool::open(dir, cfg(segment_bytes)).unwrap().0
}

fn payload(i: usize) -> Vec<u8> {
    format!("batch {i} ").repeat(i % 7 + 1).into_bytes()
}

fn read_all(r: &mut SpoolReader) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    while r.next(&mut buf).unwrap().is_some() {
        out.push(buf.clone());
    }
    out
}

fn segment_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".seg"))
        .collect();
    v.sort();
    v
}

#[test]
fn round_trip_across_many_segment_rolls_and_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spool = open(tmp.path(), 200);
    let mut positions = Vec::new();
    for i in 0..300 {
        positions.push(spool.append(&payload(i)).unwrap());
        if i % 10 == 9 {
            assert!(
                spool.commit().unwrap(),
                "Always syncs a commit with new data"
            );
        }
    }
    spool.commit().unwrap();
    assert!(
        spool.active_segment() > 20,
        "rolled {} times",
        spool.active_segment()
    );
    assert!(positions.windows(2).all(|w| w[0] < w[1]));

    let mut r = spool.reader(spool.head()).unwrap();
    let mut buf = Vec::new();
    for (i, pos) in positions.iter().enumerate() {
        let (at, next) = r.next(&mut buf).unwrap().unwrap();
        assert_eq!(at, *pos);
        assert_eq!(buf, payload(i));
        assert_eq!(next, r.position());
    }
    assert!(r.next(&mut buf).unwrap().is_none());
    assert!(buf.is_empty(), "buf is cleared even when caught up");

    // Segments respect the size limit (a segment holds at least one batch).
    for name in segment_files(tmp.path()) {
        let len = std::fs::metadata(tmp.path().join(&name)).unwrap().len();
        assert!(len <= 200, "{name} has {len} bytes");
    }

    drop(r);
    drop(spool);
    let (spool, rec) = Spool::open(tmp.path(), cfg(200)).unwrap();
    assert_eq!(rec.batches, 300);
    assert_eq!(rec.torn_bytes_truncated, 0);
    assert!(rec.corrupt_segments.is_empty());
    assert_eq!(rec.bytes, spool.used_bytes());
    let all = read_all(&mut spool.reader(spool.head()).unwrap());
    assert_eq!(all, (0..300).map(payload).collect::<Vec<_>>());
}

#[test]
fn readers_see_committed_batches_only() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spool = open(tmp.path(), 100);
    let mut a = spool.reader(spool.head()).unwrap();
    let mut buf = Vec::new();
    spool.append(b"one").unwrap();
    assert!(
        a.next(&mut buf).unwrap().is_none(),
        "appended but not committed"
    );
    spool.commit().unwrap();
    assert_eq!(read_all(&mut a), vec![b"one".to_vec()]);

    // Uncommitted data that spans a roll stays invisible too.
    for i in 0..20 {
        spool.append(&payload(i)).unwrap();
    }
    assert!(spool.active_segment() > 0);
    assert!(a.next(&mut buf).unwrap().is_none());
    let mut b = spool.reader(spool.head()).unwrap();
    assert_eq!(read_all(&mut b), vec![b"one".to_vec()]);
    spool.commit().unwrap();
    assert_eq!(read_all(&mut a).len(), 20);
    assert_eq!(read_all(&mut b).len(), 20);
}

#[test]
fn readers_are_send_and_follow_a_writer_thread() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spool = open(tmp.path(), 4096);
    let mut reader = spool.reader(spool.tail()).unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<bool>();
    let t = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = Vec::new();
        // Each message says "a commit happened" (true) or "the writer is done" (false).
        while let Ok(more) = rx.recv() {
            while reader.next(&mut buf).unwrap().is_some() {
                got.push(buf.clone());
            }
            if !more {
                break;
            }
        }
        got
    });
    for i in 0..500 {
        spool.append(&payload(i)).unwrap();
        if i % 25 == 24 {
            spool.commit().unwrap();
            tx.send(true).unwrap();
        }
    }
    tx.send(false).unwrap();
    assert_eq!(t.join().unwrap(), (0..500).map(payload).collect::<Vec<_>>());
}

#[test]
fn reader_from_now_sees_only_new_batches_and_from_oldest_sees_all() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spool = open(tmp.path(), 128);
    for i in 0..10 {
        spool.append(&payload(i)).unwrap();
    }
    spool.commit().unwrap();
    let mut now = spool.reader(spool.tail()).unwrap();
    let mut oldest = spool.reader(spool.head()).unwrap();
    spool.append(b"new").unwrap();
    spool.commit().unwrap();
    assert_eq!(read_all(&mut now), vec![b"new".to_vec()]);
    assert_eq!(read_all(&mut oldest).len(), 11);

    // Offset 0 means "start of that segment"; positions past the end start at the end.
    let seg1 = spool
        .reader(Position {
            segment: 1,
            offset: 0,
        })
        .unwrap();
    assert_eq!(
        seg1.position(),
        Position {
            segment: 1,
            offset: SEGMENT_HEADER_LEN
        }
    );
    let past = spool
        .reader(Position {
            segment: 999,
            offset: 5,
        })
        .unwrap();
    assert_eq!(past.position(), spool.tail());
    let before = spool
        .reader(Position {
            segment: 0,
            offset: 0,
        })
        .unwrap();
    assert_eq!(before.position(), spool.head());
}

#[test]
fn cursors_are_persisted_and_reloaded() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spool = open(tmp.path(), 1024);
    let p = spool.append(b"x").unwrap();
    spool.commit().unwrap();
    spool.set_cursor("kafka", p).unwrap();
    spool.set_cursor("s3.main", spool.tail()).unwrap();
    spool.set_cursor("gone", p).unwrap();
    spool.remove_cursor("gone").unwrap();
    spool.remove_cursor("never-there").unwrap();
    assert!(spool.set_cursor("", p).is_err());
    let expected = spool.cursors();
    assert_eq!(expected.len(), 2);
    drop(spool);
    let spool = open(tmp.path(), 1024);
    assert_eq!(spool.cursors(), expected);
    assert!(!tmp.path().join("cursors.json.tmp").exists());
}

#[test]
fn gc_respects_cursors_and_snapshots_and_keeps_the_active_segment() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spool = open(tmp.path(), 100);
    let mut pos = Vec::new();
    for i in 0..40 {
        pos.push(spool.append(&payload(i)).unwrap());
    }
    spool.commit().unwrap();
    let last = spool.active_segment();
    assert!(last >= 10);

    spool
        .set_cursor(
            "a",
            Position {
                segment: 3,
                offset: 0,
            },
        )
        .unwrap();
    spool
        .set_cursor(
            "b",
            Position {
                segment: 5,
                offset: 40,
            },
        )
        .unwrap();
    spool
        .write_snapshot(
            "state",
            Position {
                segment: 4,
                offset: 0,
            },
            b"dedup",
        )
        .unwrap();
    let before = spool.used_bytes();
    let freed = spool.gc().unwrap();
    assert!(freed > 0);
    assert_eq!(spool.used_bytes(), before - freed);
    assert_eq!(spool.head().segment, 3);
    assert!(!tmp.path().join("00000000000000000002.seg").exists());

    // The snapshot now bounds gc.
    spool.set_cursor("a", spool.tail()).unwrap();
    spool.set_cursor("b", spool.tail()).unwrap();
    spool.gc().unwrap();
    assert_eq!(spool.head().segment, 4);
    assert_eq!(
        spool.read_snapshot("state").unwrap(),
        Some((
            Position {
                segment: 4,
                offset: 0
            },
            b"dedup".to_vec()
        ))
    );

    // Everyone past everything: only the active segment remains.
    spool
        .write_snapshot("state", spool.tail(), b"later")
        .unwrap();
    spool.gc().unwrap();
    assert_eq!(segment_files(tmp.path()), vec![format!("{last:020}.seg")]);
    assert_eq!(spool.head().segment, last);
    spool.gc().unwrap();
    assert_eq!(
        spool.head().segment,
        last,
        "the active segment is never collected"
    );

    // A new reader sees what is left.
    let left = read_all(&mut spool.reader(spool.head()).unwrap());
    let expected: Vec<_> = (0..40)
        .filter(|&i| pos[i].segment == last)
        .map(payload)
        .collect();
    assert_eq!(left, expected);
    assert_eq!(spool.read_snapshot("missing").unwrap(), None);
    assert!(spool
        .write_snapshot("../escape", spool.tail(), b"")
        .is_err());
}

#[test]
fn a_reader_keeps_reading_a_segment_collected_under_it() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spool = open(tmp.path(), 150);
    let pos: Vec<Position> = (0..30)
        .map(|i| spool.append(&payload(i)).unwrap())
        .collect();
    spool.commit().unwrap();
    assert!(pos[1].segment == 0 && pos[29].segment > 2);
    let mut r = spool.reader(spool.head()).unwrap();
    let mut buf = Vec::new();
    r.next(&mut buf).unwrap().unwrap(); // opens segment 0
                                        // The slowest persisted cursor is in segment 1: segment 0 goes.
    spool
        .set_cursor(
            "slow",
            Position {
                segment: 1,
                offset: 0,
            },
        )
        .unwrap();
    assert!(spool.gc().unwrap() > 0);
    assert!(!tmp.path().join("00000000000000000000.seg").exists());
    assert_eq!(read_all(&mut r), (1..30).map(payload).collect::<Vec<_>>());

    // A reader that is behind without having opened its segment is told, not skipped.
    let mut behind = spool.reader(spool.head()).unwrap();
    spool.remove_cursor("slow").unwrap();
    spool.gc().unwrap();
    match behind.next(&mut buf) {
        Err(SpoolError::SegmentMissing { segment, .. }) => assert_eq!(segment, 1),
        other => panic!("expected SegmentMissing, got {other:?}"),
    }
}

#[test]
fn used_bytes_and_is_full() {
    let tmp = tempfile::tempdir().unwrap();
    let config = SpoolConfig {
        segment_bytes: 100,
        max_bytes: 500,
        fsync: FsyncPolicy::Never,
    };
    let (mut spool, _) = Spool::open(tmp.path(), config.clone()).unwrap();
    assert_eq!(spool.used_bytes(), SEGMENT_HEADER_LEN);
    spool.append(&[7; 12]).unwrap();
    assert_eq!(
        spool.used_bytes(),
        SEGMENT_HEADER_LEN + BATCH_HEADER_LEN + 12
    );
    while !spool.is_full() {
        spool.append(&[7; 50]).unwrap();
    }
    assert!(!spool.commit().unwrap(), "Never does not sync");
    let on_disk: u64 = segment_files(tmp.path())
        .iter()
        .map(|n| std::fs::metadata(tmp.path().join(n)).unwrap().len())
        .sum();
    assert_eq!(spool.used_bytes(), on_disk);
    spool.set_cursor("sink", spool.tail()).unwrap();
    spool.gc().unwrap();
    assert!(!spool.is_full());
    let used = spool.used_bytes();
    drop(spool);
    let (spool, rec) = Spool::open(tmp.path(), config).unwrap();
    assert_eq!((spool.used_bytes(), rec.bytes), (used, used));
}

#[test]
fn fsync_interval_syncs_when_due() {
    let tmp = tempfile::tempdir().unwrap();
    let config = SpoolConfig {
        fsync: FsyncPolicy::Interval(std::time::Duration::ZERO),
        ..cfg(1 << 20)
    };
    let (mut spool, _) = Spool::open(tmp.path(), config).unwrap();
    assert!(!spool.commit().unwrap(), "nothing to sync");
    spool.append(b"a").unwrap();
    assert!(spool.commit().unwrap());
    let config = SpoolConfig {
        fsync: FsyncPolicy::Interval(std::time::Duration::from_secs(3600)),
        ..cfg(1 << 20)
    };
    drop(spool);
    let (mut spool, _) = Spool::open(tmp.path(), config).unwrap();
    spool.append(b"b").unwrap();
    assert!(!spool.commit().unwrap(), "not due yet");
    assert_eq!(
        read_all(&mut spool.reader(spool.head()).unwrap()).len(),
        2,
        "visible anyway"
    );
    assert!(spool.sync().unwrap());
    assert!(!spool.sync().unwrap());
}

#[test]
fn oversized_batch_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spool = open(tmp.path(), 1024);
    let big = vec![0u8; sluice_spool::MAX_BATCH_BYTES as usize + 1];
    assert!(matches!(
        spool.append(&big),
        Err(SpoolError::BatchTooLarge { .. })
    ));
    // Still usable, nothing written.
    assert_eq!(
        spool.tail(),
        Position {
            segment: 0,
            offset: SEGMENT_HEADER_LEN
        }
    );
    spool.append(b"ok").unwrap();
}

#[test]
fn second_open_of_the_same_directory_fails_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = open(tmp.path(), 1024);
    let err = Spool::open(tmp.path(), cfg(1024)).unwrap_err();
    assert!(matches!(err, SpoolError::Locked { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("in use by another process") && msg.contains(&std::process::id().to_string()),
        "{msg}"
    );
    drop(spool);
    open(tmp.path(), 1024);
}

#[test]
fn snapshot_replaces_atomically_and_survives_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spool = open(tmp.path(), 1024);
    spool
        .write_snapshot(
            "relay-state",
            Position {
                segment: 0,
                offset: 0,
            },
            b"v1",
        )
        .unwrap();
    spool
        .write_snapshot(
            "relay-state",
            Position {
                segment: 0,
                offset: 16,
            },
            b"v2",
        )
        .unwrap();
    drop(spool);
    // A temp file a crash left behind is cleaned up and does not replace the snapshot.
    std::fs::write(tmp.path().join("snapshot-relay-state.snap.tmp"), b"half").unwrap();
    let (spool, rec) = Spool::open(tmp.path(), cfg(1024)).unwrap();
    assert!(rec.corrupt_state_files.is_empty());
    assert!(!tmp.path().join("snapshot-relay-state.snap.tmp").exists());
    assert_eq!(
        spool.read_snapshot("relay-state").unwrap(),
        Some((
            Position {
                segment: 0,
                offset: 16
            },
            b"v2".to_vec()
        ))
    );
}
