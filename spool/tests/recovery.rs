//! Recovery after crashes and damage: torn tails, corrupt segments, garbage files.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};

use sluice_spool::{
    FsyncPolicy, Position, Spool, SpoolConfig, SpoolError, BATCH_HEADER_LEN, SEGMENT_HEADER_LEN,
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
fn a_flipped_byte_in_a_middle_segment_sets_it_aside() {
    let original = tempfile::tempdir().unwrap();
    let pos = fill(original.path(), 40);
    let middle = pos[pos.len() / 2].segment;
    let in_middle: Vec<usize> = (0..40).filter(|&i| pos[i].segment == middle).collect();
    let len = fs::metadata(seg_path(original.path(), middle))
        .unwrap()
        .len();

    // Every byte: header, batch headers, payloads.
    for at in 0..len {
        let tmp = tempfile::tempdir().unwrap();
        copy_dir(original.path(), tmp.path());
        let path = seg_path(tmp.path(), middle);
        let mut bytes = fs::read(&path).unwrap();
        bytes[at as usize] ^= 0x10;
        fs::write(&path, &bytes).unwrap();

        let (spool, rec) = Spool::open(tmp.path(), cfg()).unwrap();
        let aside = PathBuf::from(format!("{}.corrupt", path.display()));
        assert_eq!(rec.corrupt_segments, vec![aside.clone()], "flip at {at}");
        assert!(aside.exists() && !path.exists());
        assert_eq!(rec.torn_bytes_truncated, 0);
        let expected: Vec<Vec<u8>> = (0..40)
            .filter(|i| !in_middle.contains(i))
            .map(payload)
            .collect();
        assert_eq!(read_all(&spool).unwrap(), expected, "flip at {at}");
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
fn a_reader_reports_damage_after_open_with_segment_and_offset_and_stays() {
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
    spool.commit().unwrap();
    // Bit rot after the batch was written and verified.
    let path = seg_path(tmp.path(), 0);
    let mut bytes = fs::read(&path).unwrap();
    bytes[(b.offset + BATCH_HEADER_LEN) as usize] ^= 0xFF;
    fs::write(&path, &bytes).unwrap();

    let mut r = spool.reader(spool.head()).unwrap();
    let mut buf = Vec::new();
    assert_eq!(r.next(&mut buf).unwrap().unwrap().0, a);
    for _ in 0..2 {
        let err = r.next(&mut buf).unwrap_err();
        match &err {
            SpoolError::Checksum {
                segment, offset, ..
            } => assert_eq!((*segment, *offset), (b.segment, b.offset)),
            other => panic!("expected a checksum error, got {other:?}"),
        }
        assert!(
            err.to_string()
                .contains(&format!("at byte offset {}", b.offset)),
            "{err}"
        );
        assert_eq!(
            r.position(),
            b,
            "the reader does not skip the damaged batch"
        );
    }
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
