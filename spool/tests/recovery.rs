//! Recovery after crashes and damage: torn tails, corrupt segments, garbage files.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};

use sluice_spool::{
    Acknowledged, FsyncPolicy, Position, Spool, SpoolConfig, SpoolError, BATCH_HEADER_LEN,
    SEGMENT_HEADER_LEN,
};

fn cfg() -> SpoolConfig {
    SpoolConfig {
        segment_bytes: 256,
        max_bytes: 1 << 30,
        fsync: FsyncPolicy::Never,
    }
}

fn payload(i: usize) -> Vec<u8> {
    format!("event {i};").repeat(i % 5 + 1).into_bytes()
}

fn seg_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.seg"))
}

/// Fills a spool with `n` committed batches and returns their positions.
fn fill(dir: &Path, n: usize) -> Vec<Position> {
    let (mut spool, _) = Spool::open(dir, cfg()).unwrap();
    let pos = (0..n).map(|i| spool.append(&payload(i)).unwrap()).collect();
    spool.commit().unwrap();
    pos
}

fn read_all(spool: &Spool) -> Result<Vec<Vec<u8>>, SpoolError> {
    let mut r = spool.reader(spool.head())?;
    let mut out = Vec::new();
    let mut buf = Vec::new();
    while r.next(&mut buf)?.is_some() {
        out.push(buf.clone());
    }
    Ok(out)
}

fn copy_dir(from: &Path, to: &Path) {
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn truncating_the_last_batch_at_every_byte_is_a_torn_tail() {
    let original = tempfile::tempdir().unwrap();
    let pos = fill(original.path(), 30);
    let last = *pos.last().unwrap();
    // Make the last segment hold more than one batch, so earlier batches share it.
    assert!(pos.iter().filter(|p| p.segment == last.segment).count() >= 2);
    let seg = seg_path(original.path(), last.segment);
    let full = fs::metadata(&seg).unwrap().len();
    assert_eq!(
        full,
        last.offset + BATCH_HEADER_LEN + payload(29).len() as u64
    );

    for cut in last.offset..full {
        let tmp = tempfile::tempdir().unwrap();
        copy_dir(original.path(), tmp.path());
        OpenOptions::new()
            .write(true)
            .open(seg_path(tmp.path(), last.segment))
            .unwrap()
            .set_len(cut)
            .unwrap();
        let (mut spool, rec) = Spool::open(tmp.path(), cfg()).unwrap();
        assert_eq!(rec.torn_bytes_truncated, cut - last.offset, "cut at {cut}");
        assert!(rec.corrupt_segments.is_empty());
        assert_eq!(rec.batches, 29);
        assert_eq!(
            read_all(&spool).unwrap(),
            (0..29).map(payload).collect::<Vec<_>>(),
            "cut at {cut}"
        );
        // Appends continue at the repaired end.
        assert_eq!(spool.tail(), last);
        spool.append(b"after").unwrap();
        spool.commit().unwrap();
        assert_eq!(read_all(&spool).unwrap().last().unwrap(), b"after");
    }
}

#[test]
fn a_damaged_last_batch_or_zero_filled_tail_is_torn() {
    let tmp = tempfile::tempdir().unwrap();
    let pos = fill(tmp.path(), 30);
    let last = *pos.last().unwrap();
    let seg = seg_path(tmp.path(), last.segment);
    let mut bytes = fs::read(&seg).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1; // last batch's payload
    bytes.extend_from_slice(&[0; 4096]); // and a zero-filled block after it
    fs::write(&seg, &bytes).unwrap();
    let (spool, rec) = Spool::open(tmp.path(), cfg()).unwrap();
    assert_eq!(rec.torn_bytes_truncated, n as u64 + 4096 - last.offset);
    assert!(rec.corrupt_segments.is_empty());
    assert_eq!(read_all(&spool).unwrap().len(), 29);
}

#[test]
fn a_newest_segment_shorter_than_its_header_is_repaired() {
    let tmp = tempfile::tempdir().unwrap();
    let pos = fill(tmp.path(), 10);
    let next = pos.last().unwrap().segment + 1;
    fs::write(seg_path(tmp.path(), next), &b"SLSP\x01"[..]).unwrap();
    let (mut spool, rec) = Spool::open(tmp.path(), cfg()).unwrap();
    assert_eq!(rec.torn_bytes_truncated, 5);
    assert_eq!(spool.active_segment(), next);
    assert_eq!(
        fs::metadata(seg_path(tmp.path(), next)).unwrap().len(),
        SEGMENT_HEADER_LEN
    );
    spool.append(b"x").unwrap();
    spool.commit().unwrap();
    assert_eq!(read_all(&spool).unwrap().len(), 11);
}

#[test]
fn a_flipped_byte_in_a_middle_segment_costs_its_batch_or_in_the_header_the_segment() {
    let original = tempfile::tempdir().unwrap();
    let pos = fill(original.path(), 40);
    let middle = pos[pos.len() / 2].segment;
    let in_middle: Vec<usize> = (0..40).filter(|&i| pos[i].segment == middle).collect();
    let len = fs::metadata(seg_path(original.path(), middle))
        .unwrap()
        .len();
    let end_of = |i: usize| Position {
        segment: pos[i].segment,
        offset: pos[i].offset + BATCH_HEADER_LEN + payload(i).len() as u64,
    };

    // Every byte: segment header, batch headers, payloads.
    for at in 0..len {
        let tmp = tempfile::tempdir().unwrap();
        copy_dir(original.path(), tmp.path());
        let path = seg_path(tmp.path(), middle);
        let mut bytes = fs::read(&path).unwrap();
        bytes[at as usize] ^= 0x10;
        fs::write(&path, &bytes).unwrap();

        let (spool, rec) = Spool::open(tmp.path(), cfg()).unwrap();
        assert_eq!(rec.torn_bytes_truncated, 0);
        if at < SEGMENT_HEADER_LEN {
            // Nothing in a file whose header is wrong can be trusted.
            let aside = PathBuf::from(format!("{}.corrupt", path.display()));
            assert_eq!(rec.corrupt_segments, vec![aside.clone()], "flip at {at}");
            assert!(aside.exists() && !path.exists());
            let expected: Vec<Vec<u8>> = (0..40)
                .filter(|i| !in_middle.contains(i))
                .map(payload)
                .collect();
            assert_eq!(read_all(&spool).unwrap(), expected, "flip at {at}");
            continue;
        }
        let victim = *in_middle
            .iter()
            .rev()
            .find(|&&i| pos[i].offset <= at)
            .unwrap();
        assert!(rec.corrupt_segments.is_empty(), "flip at {at}");
        assert_eq!(rec.batches, 39, "flip at {at}");
        assert_eq!(rec.damaged.len(), 1, "flip at {at}: {:?}", rec.damaged);
        let d = &rec.damaged[0];
        assert_eq!(
            (d.from, d.to, d.batches),
            (pos[victim], end_of(victim), 1),
            "flip at {at}"
        );
        assert_eq!(d.path, path);
        // One commit for all 40: nothing written later confirms it.
        assert_eq!(d.acknowledged, Acknowledged::NotKnown);

        let mut r = spool.reader(spool.head()).unwrap();
        let mut buf = Vec::new();
        let mut read = Vec::new();
        loop {
            match r.next(&mut buf) {
                Ok(Some(_)) => read.push(buf.clone()),
                Ok(None) => break,
                Err(SpoolError::Damaged {
                    damage,
                    first_report,
                }) => {
                    assert_eq!(*damage, *d, "flip at {at}");
                    assert!(!first_report, "recovery reported it already");
                }
                Err(e) => panic!("flip at {at}: {e}"),
            }
        }
        let expected: Vec<Vec<u8>> = (0..40).filter(|&i| i != victim).map(payload).collect();
        assert_eq!(read, expected, "flip at {at}");
    }
}

#[test]
fn garbage_segment_files_are_set_aside_and_other_files_ignored() {
    let tmp = tempfile::tempdir().unwrap();
    fill(tmp.path(), 5);
    fs::write(
        seg_path(tmp.path(), 0).with_file_name("notes.txt"),
        b"hello",
    )
    .unwrap();
    fs::write(tmp.path().join("12.seg"), b"not twenty digits").unwrap();
    // A garbage file that sorts before the real segments and one that is the newest.
    let (before, after) = (seg_path(tmp.path(), 0), seg_path(tmp.path(), 500));
    fs::rename(&before, seg_path(tmp.path(), 0).with_extension("keep")).unwrap();
    fs::write(&before, vec![0xAB; 100]).unwrap();
    fs::write(&after, b"garbage that is longer than a header").unwrap();

    let (mut spool, rec) = Spool::open(tmp.path(), cfg()).unwrap();
    assert_eq!(rec.corrupt_segments.len(), 2, "{:?}", rec.corrupt_segments);
    // The newest live segment was set aside, so writing continues in a fresh one that
    // never reuses a set-aside id.
    assert_eq!(spool.active_segment(), 501);
    spool.append(b"fresh").unwrap();
    spool.commit().unwrap();
    let all = read_all(&spool).unwrap();
    assert_eq!(all.last().unwrap(), b"fresh");
    assert!(tmp.path().join("notes.txt").exists() && tmp.path().join("12.seg").exists());

    // Reopening again is clean, and the .corrupt files stay.
    drop(spool);
    let (spool, rec) = Spool::open(tmp.path(), cfg()).unwrap();
    assert!(rec.corrupt_segments.is_empty());
    assert_eq!(spool.active_segment(), 501);
    assert!(PathBuf::from(format!("{}.corrupt", after.display())).exists());
}

#[test]
fn a_reader_skips_damage_found_after_open_and_names_it_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut spool, _) = Spool::open(
        tmp.path(),
        SpoolConfig {
            segment_bytes: 1 << 20,
            ..cfg()
        },
    )
    .unwrap();
    let a = spool.append(b"first").unwrap();
    let b = spool.append(b"second").unwrap();
    let c = spool.append(b"third").unwrap();
    spool.commit().unwrap();
    // Bit rot after the batch was written and verified.
    let path = seg_path(tmp.path(), 0);
    let mut bytes = fs::read(&path).unwrap();
    bytes[(b.offset + BATCH_HEADER_LEN) as usize] ^= 0xFF;
    fs::write(&path, &bytes).unwrap();

    let mut buf = Vec::new();
    for first in [true, false] {
        let mut r = spool.reader(spool.head()).unwrap();
        assert_eq!(r.next(&mut buf).unwrap().unwrap().0, a);
        let err = r.next(&mut buf).unwrap_err();
        let SpoolError::Damaged {
            damage,
            first_report,
        } = &err
        else {
            panic!("expected damage, got {err:?}");
        };
        assert_eq!(*first_report, first, "counted once, by the first reader");
        assert_eq!((damage.from, damage.to, damage.batches), (b, c, 1));
        assert_eq!(damage.acknowledged, Acknowledged::Yes, "it was committed");
        let text = err.to_string();
        assert!(
            text.contains(&format!("at byte offset {}..{}", b.offset, c.offset)),
            "{text}"
        );
        assert!(text.contains("00000000000000000000.seg"), "{text}");
        assert_eq!(r.position(), c, "the reader moved past the damage");
        assert_eq!(r.next(&mut buf).unwrap().unwrap().0, c);
        assert_eq!(buf, b"third");
        assert!(r.next(&mut buf).unwrap().is_none());
    }
}

/// A spool written by an older build: version 1 segments stay readable (with their old
/// damage rules), and the writer continues in a new version 2 segment.
#[test]
fn version_1_segments_are_read_and_not_appended_to() {
    let tmp = tempfile::tempdir().unwrap();
    let mut seg = Vec::new();
    seg.extend_from_slice(b"SLSP");
    seg.extend_from_slice(&1u16.to_le_bytes());
    seg.extend_from_slice(&0u16.to_le_bytes());
    seg.extend_from_slice(&0u64.to_le_bytes());
    let mut v1_positions = Vec::new();
    for p in [&b"old one"[..], b"old two"] {
        v1_positions.push(seg.len() as u64);
        let len = (p.len() as u32).to_le_bytes();
        let mut crc = crc32fast::Hasher::new();
        crc.update(&len);
        crc.update(p);
        seg.extend_from_slice(&len);
        seg.extend_from_slice(&crc.finalize().to_le_bytes());
        seg.extend_from_slice(p);
    }
    fs::write(seg_path(tmp.path(), 0), &seg).unwrap();

    let (mut spool, rec) = Spool::open(tmp.path(), cfg()).unwrap();
    assert_eq!(rec.batches, 2);
    assert_eq!(
        spool.active_segment(),
        1,
        "a new segment for the new format"
    );
    spool.append(b"new").unwrap();
    spool.commit().unwrap();
    assert_eq!(
        read_all(&spool).unwrap(),
        vec![b"old one".to_vec(), b"old two".to_vec(), b"new".to_vec()]
    );
    assert_eq!(fs::read(seg_path(tmp.path(), 0)).unwrap(), seg, "untouched");

    // Damage in a version 1 segment found by a reader: nothing to resynchronise on, so
    // the reader stays (and the old error says why).
    let mut bytes = seg.clone();
    *bytes.last_mut().unwrap() ^= 1;
    bytes[(v1_positions[0] + 8) as usize] ^= 1;
    fs::write(seg_path(tmp.path(), 0), &bytes).unwrap();
    let mut r = spool.reader(spool.head()).unwrap();
    let mut buf = Vec::new();
    for _ in 0..2 {
        match r.next(&mut buf) {
            Err(SpoolError::Checksum {
                segment: 0, offset, ..
            }) => {
                assert_eq!(offset, v1_positions[0])
            }
            other => panic!("expected a checksum error, got {other:?}"),
        }
    }
    assert_eq!(r.position().offset, v1_positions[0]);
}

#[test]
fn damaged_state_files_are_set_aside() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (mut spool, _) = Spool::open(tmp.path(), cfg()).unwrap();
        spool.set_cursor("k", spool.tail()).unwrap();
        spool.write_snapshot("s", spool.tail(), b"blob").unwrap();
    }
    fs::write(
        tmp.path().join("cursors.json"),
        b"{\"version\": \"1\", \"cur",
    )
    .unwrap();
    let snap = tmp.path().join("snapshot-s.snap");
    let mut bytes = fs::read(&snap).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    fs::write(&snap, bytes).unwrap();
    let (spool, rec) = Spool::open(tmp.path(), cfg()).unwrap();
    assert_eq!(rec.corrupt_state_files.len(), 2);
    assert!(spool.cursors().is_empty());
    assert_eq!(spool.read_snapshot("s").unwrap(), None);
}

#[test]
fn a_cursor_in_a_set_aside_segment_starts_at_the_next_live_one() {
    let tmp = tempfile::tempdir().unwrap();
    let pos = fill(tmp.path(), 40);
    let middle = pos[20].segment;
    fs::write(seg_path(tmp.path(), middle), b"garbage garbage garbage").unwrap();
    let (spool, _) = Spool::open(tmp.path(), cfg()).unwrap();
    let r = spool.reader(pos[20]).unwrap();
    assert_eq!(
        r.position(),
        Position {
            segment: middle + 1,
            offset: SEGMENT_HEADER_LEN
        }
    );
}
