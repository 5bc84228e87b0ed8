//! Model test: random operations against the real spool and a `VecDeque` model.
//!
//! Operations: append, commit, read by one of two readers, persist a reader's position
//! as its cursor, gc, and "crash" (drop everything without a clean shutdown, cut some
//! of the uncommitted tail of the newest segment as an interrupted write would, reopen).
//! After every crash and gc, a fresh reader must see exactly the model's batches, and
//! after a crash every committed batch must still be there, in order.

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::path::Path;

use proptest::prelude::*;
use sluice_spool::{
    FsyncPolicy, Position, Spool, SpoolConfig, SpoolReader, BATCH_HEADER_LEN, SEGMENT_HEADER_LEN,
};

#[derive(Clone, Debug)]
enum Op {
    Append(usize),
    Commit,
    Read {
        reader: usize,
        n: usize,
    },
    SetCursor {
        reader: usize,
    },
    Gc,
    /// Cut up to this many bytes off the newest segment (only uncommitted ones).
    Crash {
        cut: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0usize..200).prop_map(Op::Append),
        3 => Just(Op::Commit),
        3 => (0usize..2, 1usize..5).prop_map(|(reader, n)| Op::Read { reader, n }),
        2 => (0usize..2).prop_map(|reader| Op::SetCursor { reader }),
        1 => Just(Op::Gc),
        1 => (0u64..400).prop_map(|cut| Op::Crash { cut }),
    ]
}

fn policy() -> impl Strategy<Value = FsyncPolicy> {
    prop_oneof![Just(FsyncPolicy::Always), Just(FsyncPolicy::Never)]
}

#[derive(Debug)]
struct Entry {
    pos: Position,
    payload: Vec<u8>,
    committed: bool,
}

impl Entry {
    fn end(&self) -> Position {
        Position {
            segment: self.pos.segment,
            offset: self.pos.offset + BATCH_HEADER_LEN + self.payload.len() as u64,
        }
    }
}

struct Model {
    entries: VecDeque<Entry>,
    tail: Position,
    /// Where each reader continues: the end of the last batch it returned.
    read_to: [Position; 2],
    cursors: [Position; 2],
    next_id: u64,
}

impl Model {
    fn first_at_or_after(&self, p: Position) -> Option<&Entry> {
        self.entries.iter().find(|e| e.pos >= p)
    }
}

const SINKS: [&str; 2] = ["kafka", "s3"];

fn payload(id: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (id as usize * 31 + i) as u8).collect()
}

fn open(dir: &Path, cfg: &SpoolConfig) -> (Spool, sluice_spool::Recovery) {
    Spool::open(dir, cfg.clone()).expect("open never fails on a healthy disk")
}

/// A fresh reader from the head must return exactly the model's committed batches.
fn check_full_scan(spool: &Spool, m: &Model) -> Result<(), TestCaseError> {
    let mut r = spool.reader(spool.head()).unwrap();
    let mut buf = Vec::new();
    let mut seen = Vec::new();
    while let Some((at, _)) = r.next(&mut buf).unwrap() {
        seen.push((at, buf.clone()));
    }
    let expected: Vec<(Position, Vec<u8>)> = m
        .entries
        .iter()
        .filter(|e| e.committed)
        .map(|e| (e.pos, e.payload.clone()))
        .collect();
    prop_assert_eq!(seen, expected);
    Ok(())
}

fn check_disk(dir: &Path, spool: &Spool) -> Result<(), TestCaseError> {
    let on_disk: u64 = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    prop_assert_eq!(spool.used_bytes(), on_disk);
    Ok(())
}

fn run(ops: Vec<Op>, segment_bytes: u64, fsync: FsyncPolicy) -> Result<(), TestCaseError> {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cfg = SpoolConfig {
        segment_bytes,
        max_bytes: u64::MAX,
        fsync,
    };
    let (mut spool, _) = open(dir, &cfg);
    let head = spool.head();
    let mut m = Model {
        entries: VecDeque::new(),
        tail: spool.tail(),
        read_to: [head; 2],
        cursors: [head; 2],
        next_id: 0,
    };
    for sink in SINKS {
        spool.set_cursor(sink, head).unwrap();
    }
    let mut readers: Vec<SpoolReader> = (0..2).map(|_| spool.reader(head).unwrap()).collect();
    let mut buf = Vec::new();

    for op in ops {
        match op {
            Op::Append(len) => {
                let data = payload(m.next_id, len);
                m.next_id += 1;
                let size = BATCH_HEADER_LEN + len as u64;
                let expected =
                    if m.tail.offset > SEGMENT_HEADER_LEN && m.tail.offset + size > segment_bytes {
                        Position {
                            segment: m.tail.segment + 1,
                            offset: SEGMENT_HEADER_LEN,
                        }
                    } else {
                        m.tail
                    };
                let pos = spool.append(&data).unwrap();
                prop_assert_eq!(pos, expected);
                m.entries.push_back(Entry {
                    pos,
                    payload: data,
                    committed: false,
                });
                m.tail = Position {
                    segment: pos.segment,
                    offset: pos.offset + size,
                };
                prop_assert_eq!(spool.tail(), m.tail);
            }
            Op::Commit => {
                let synced = spool.commit().unwrap();
                let dirty = m.entries.iter().any(|e| !e.committed);
                prop_assert_eq!(synced, dirty && matches!(fsync, FsyncPolicy::Always));
                m.entries.iter_mut().for_each(|e| e.committed = true);
            }
            Op::Read { reader, n } => {
                for _ in 0..n {
                    let got = readers[reader].next(&mut buf).unwrap();
                    match m
                        .first_at_or_after(m.read_to[reader])
                        .filter(|e| e.committed)
                    {
                        Some(e) => {
                            prop_assert_eq!(got, Some((e.pos, e.end())));
                            prop_assert_eq!(&buf, &e.payload);
                            m.read_to[reader] = e.end();
                        }
                        None => {
                            prop_assert_eq!(got, None);
                            break;
                        }
                    }
                }
            }
            Op::SetCursor { reader } => {
                spool.set_cursor(SINKS[reader], m.read_to[reader]).unwrap();
                m.cursors[reader] = m.read_to[reader];
            }
            Op::Gc => {
                spool.gc().unwrap();
                let bound = m
                    .cursors
                    .iter()
                    .map(|c| c.segment)
                    .min()
                    .unwrap()
                    .min(spool.active_segment());
                m.entries.retain(|e| e.pos.segment >= bound);
                prop_assert!(spool.head().segment <= bound);
                check_full_scan(&spool, &m)?;
            }
            Op::Crash { cut } => {
                let active = spool.active_segment();
                drop(readers);
                drop(spool);
                // An interrupted write can only have lost bytes after the committed end
                // of the newest segment.
                let path = dir.join(format!("{active:020}.seg"));
                let len = std::fs::metadata(&path).unwrap().len();
                let floor = m
                    .entries
                    .iter()
                    .filter(|e| e.committed && e.pos.segment == active)
                    .map(|e| e.end().offset)
                    .max()
                    .unwrap_or(0);
                let new_len = len - cut.min(len - floor);
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .unwrap()
                    .set_len(new_len)
                    .unwrap();

                let (reopened, rec) = open(dir, &cfg);
                spool = reopened;
                // Batches wholly inside the cut length survive, committed or not.
                m.entries
                    .retain(|e| e.pos.segment != active || e.end().offset <= new_len);
                let valid = m
                    .entries
                    .iter()
                    .filter(|e| e.pos.segment == active)
                    .map(|e| e.end().offset)
                    .max()
                    .unwrap_or(SEGMENT_HEADER_LEN);
                let torn = if new_len < SEGMENT_HEADER_LEN {
                    new_len
                } else {
                    new_len - valid
                };
                prop_assert!(
                    rec.corrupt_segments.is_empty(),
                    "{:?}",
                    rec.corrupt_segments
                );
                prop_assert_eq!(rec.torn_bytes_truncated, torn);
                m.entries.iter_mut().for_each(|e| e.committed = true);
                m.tail = Position {
                    segment: active,
                    offset: valid,
                };
                prop_assert_eq!(spool.tail(), m.tail);
                prop_assert_eq!(rec.batches, m.entries.len() as u64);
                let persisted = spool.cursors();
                for (i, sink) in SINKS.iter().enumerate() {
                    prop_assert_eq!(persisted.get(*sink), Some(&m.cursors[i]));
                }
                // Sinks restart from their persisted cursors.
                m.read_to = m.cursors;
                readers = m
                    .cursors
                    .iter()
                    .map(|&c| spool.reader(c).unwrap())
                    .collect();
                check_full_scan(&spool, &m)?;
                check_disk(dir, &spool)?;
            }
        }
    }
    spool.commit().unwrap();
    m.entries.iter_mut().for_each(|e| e.committed = true);
    check_full_scan(&spool, &m)?;
    check_disk(dir, &spool)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn spool_agrees_with_model(
        ops in proptest::collection::vec(op(), 1..120),
        segment_bytes in 48u64..400,
        fsync in policy(),
    ) {
        run(ops, segment_bytes, fsync)?;
    }
}
