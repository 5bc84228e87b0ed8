//! A bounded-time fuzz target for the Forward decoders, run by plain `cargo test`.
//!
//! Inputs are valid frames of every kind a peer can send (the four event modes, gzip,
//! EventTime / int / float times, options with chunk ids and provenance, PING,
//! heartbeats), then mutated: bytes flipped, inserted, deleted, cut, and length fields
//! replaced by huge ones. Plus plain random bytes. Every input is fed to the decoder in
//! random pieces, as a socket delivers it. The properties:
//!
//! - decoding never panics; a bad input is an error;
//! - what decodes is consistent (the entries iterate to `count`, `size` agrees);
//! - the heap the decoder allocates while decoding stays within its limits: at most
//!   `max_frame_bytes + 3 × max_decompressed_bytes` + 64 KiB for the inflater, however large
//!   a length the input declares. A global allocator counts this thread's live bytes.
//!
//! `SLUICE_FUZZ_CASES=100000 cargo test -p sluice-forward --test forward_fuzz --release`
//! runs longer; the default takes a few seconds.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::BytesMut;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use sluice_forward::{
    encode_compressed_packed_forward, gzip_entries, shared_key_digest, write_entry, ClientCodec,
    ClientFrame, EventTime, Limits, Ping, Provenance, ServerCodec,
};
use tokio_util::codec::{Decoder, Encoder};

// ---- allocation accounting ---------------------------------------------------------------

struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note(delta: isize) {
    // `try_with`: the allocator also runs while thread-locals are being torn down.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            note(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            note(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        note(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            // Count the moment both blocks may exist, then the release of the old one.
            note(new_size as isize);
            note(-(layout.size() as isize));
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result and the peak of bytes it had allocated and not freed.
fn peak_allocated<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    let peak = PEAK.with(Cell::get) - base;
    (out, peak.max(0) as usize)
}

// ---- inputs ------------------------------------------------------------------------------

const LIMITS: Limits = Limits {
    max_frame_bytes: 8 << 10,
    max_decompressed_bytes: 8 << 10,
};

/// What the decoder may hold at once: see the module doc.
const ALLOCATION_BOUND: usize =
    LIMITS.max_frame_bytes + 3 * LIMITS.max_decompressed_bytes + GZIP_STATE;

/// What inflating costs whatever the input: miniz_oxide's state with its 32 KiB window.
const GZIP_STATE: usize = 64 << 10;

#[derive(Clone, Debug)]
enum Time {
    Int(u32),
    Float(f64),
    Event(u32, u32),
}

fn write_time(out: &mut Vec<u8>, t: &Time) {
    match *t {
        Time::Int(s) => {
            rmp::encode::write_uint(out, s as u64).unwrap();
        }
        Time::Float(f) => rmp::encode::write_f64(out, f).unwrap(),
        Time::Event(s, n) => {
            rmp::encode::write_ext_meta(out, 8, 0).unwrap();
            out.extend_from_slice(&s.to_be_bytes());
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
}

fn arb_time() -> impl Strategy<Value = Time> {
    prop_oneof![
        any::<u32>().prop_map(Time::Int),
        (0.0f64..4e9).prop_map(Time::Float),
        (any::<u32>(), 0u32..1_000_000_000).prop_map(|(s, n)| Time::Event(s, n)),
    ]
}

/// A record: a map of short keys to strings, ints or nested arrays.
fn arb_record() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        (
            "[a-z]{1,6}",
            prop_oneof![
                ".{0,40}".prop_map(|s| {
                    let mut v = Vec::new();
                    rmp::encode::write_str(&mut v, &s).unwrap();
                    v
                }),
                any::<i64>().prop_map(|i| {
                    let mut v = Vec::new();
                    rmp::encode::write_sint(&mut v, i).unwrap();
                    v
                }),
                proptest::collection::vec(any::<u8>(), 0..5).prop_map(|items| {
                    let mut v = Vec::new();
                    rmp::encode::write_array_len(&mut v, items.len() as u32).unwrap();
                    for i in items {
                        rmp::encode::write_uint(&mut v, i as u64).unwrap();
                    }
                    v
                }),
            ],
        ),
        0..6,
    )
    .prop_map(|fields| {
        let mut v = Vec::new();
        rmp::encode::write_map_len(&mut v, fields.len() as u32).unwrap();
        for (k, value) in fields {
            rmp::encode::write_str(&mut v, &k).unwrap();
            v.extend(value);
        }
        v
    })
}

#[derive(Clone, Debug)]
enum Mode {
    Message,
    Forward,
    Packed,
    Compressed,
    Ping,
    Heartbeat,
}

fn write_options(out: &mut Vec<u8>, n: usize, chunk: bool, compressed: bool) {
    let len = 1 + chunk as u32 + compressed as u32;
    rmp::encode::write_map_len(out, len).unwrap();
    rmp::encode::write_str(out, "size").unwrap();
    rmp::encode::write_uint(out, n as u64).unwrap();
    if chunk {
        rmp::encode::write_str(out, "chunk").unwrap();
        rmp::encode::write_str(out, "Y2h1bmstMQ==").unwrap();
    }
    if compressed {
        rmp::encode::write_str(out, "compressed").unwrap();
        rmp::encode::write_str(out, "gzip").unwrap();
    }
}

fn encode_frame(mode: &Mode, events: &[(Time, Vec<u8>)], options: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut entries = Vec::new();
    for (t, record) in events {
        rmp::encode::write_array_len(&mut entries, 2).unwrap();
        write_time(&mut entries, t);
        entries.extend_from_slice(record);
    }
    match mode {
        Mode::Heartbeat => out.push(0xc0),
        Mode::Ping => {
            let nonce = b"nonce-from-helo!";
            let ping = Ping {
                client_hostname: "fuzz".into(),
                shared_key_salt: b"salt".to_vec(),
                shared_key_hexdigest: shared_key_digest(b"salt", "fuzz", nonce, "key"),
                username: String::new(),
                password_digest: String::new(),
            };
            let mut b = BytesMut::new();
            ClientCodec::new(LIMITS)
                .encode(ClientFrame::Ping(ping), &mut b)
                .unwrap();
            out.extend_from_slice(&b);
        }
        Mode::Message => {
            let (t, record) = events
                .first()
                .cloned()
                .unwrap_or((Time::Int(1), vec![0x80]));
            rmp::encode::write_array_len(&mut out, 3 + options as u32).unwrap();
            rmp::encode::write_str(&mut out, "fuzz.message").unwrap();
            write_time(&mut out, &t);
            out.extend_from_slice(&record);
            if options {
                write_options(&mut out, 1, true, false);
            }
        }
        Mode::Forward => {
            rmp::encode::write_array_len(&mut out, 2 + options as u32).unwrap();
            rmp::encode::write_str(&mut out, "fuzz.forward").unwrap();
            rmp::encode::write_array_len(&mut out, events.len() as u32).unwrap();
            out.extend_from_slice(&entries);
            if options {
                write_options(&mut out, events.len(), true, false);
            }
        }
        Mode::Packed => {
            rmp::encode::write_array_len(&mut out, 2 + options as u32).unwrap();
            rmp::encode::write_str(&mut out, "fuzz.packed").unwrap();
            rmp::encode::write_bin(&mut out, &entries).unwrap();
            if options {
                write_options(&mut out, events.len(), false, false);
            }
        }
        Mode::Compressed => {
            // What sluice agents send: canonical entries, gzipped, with provenance.
            let mut canonical = Vec::new();
            for (i, _) in events.iter().enumerate() {
                let message = format!("line {i}");
                write_entry(
                    &mut canonical,
                    EventTime {
                        secs: 1_700_000_000,
                        nanos: i as u32,
                    },
                    &[("message", message.as_bytes())],
                );
            }
            let provenance = Provenance {
                source: "agent:app:1:2".into(),
                seqs: (0..events.len() as u64).collect(),
                offsets: (0..events.len() as u64).map(|i| i * 100).collect(),
            };
            let mut b = BytesMut::new();
            encode_compressed_packed_forward(
                "fuzz.gzip",
                &gzip_entries(&canonical),
                events.len(),
                "chunk-1",
                options.then_some(&provenance),
                &mut b,
            );
            out.extend_from_slice(&b);
        }
    }
    out
}

fn arb_valid_frame() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![
            Just(Mode::Message),
            Just(Mode::Forward),
            Just(Mode::Packed),
            Just(Mode::Compressed),
            Just(Mode::Ping),
            Just(Mode::Heartbeat),
        ],
        proptest::collection::vec((arb_time(), arb_record()), 0..12),
        any::<bool>(),
    )
        .prop_map(|(mode, events, options)| encode_frame(&mode, &events, options))
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip(prop::sample::Index, u8),
    Insert(prop::sample::Index, u8),
    Delete(prop::sample::Index),
    Truncate(prop::sample::Index),
    /// A length field that claims far more than is there (str32, bin32, array32, map32).
    HugeLength(prop::sample::Index, u8, u32),
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<prop::sample::Index>(), 1u8..=255).prop_map(|(i, b)| Mutation::Flip(i, b)),
        2 => (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        2 => any::<prop::sample::Index>().prop_map(Mutation::Delete),
        1 => any::<prop::sample::Index>().prop_map(Mutation::Truncate),
        2 => (
            any::<prop::sample::Index>(),
            prop::sample::select(vec![0xdbu8, 0xc6, 0xdd, 0xdf, 0xc9]),
            any::<u32>()
        )
            .prop_map(|(i, m, n)| Mutation::HugeLength(i, m, n)),
    ]
}

fn mutate(mut wire: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        match m {
            Mutation::Flip(at, x) if !wire.is_empty() => {
                let i = at.index(wire.len());
                wire[i] ^= x;
            }
            Mutation::Insert(at, b) => {
                let i = at.index(wire.len() + 1);
                wire.insert(i, *b);
            }
            Mutation::Delete(at) if !wire.is_empty() => {
                let i = at.index(wire.len());
                wire.remove(i);
            }
            Mutation::Truncate(at) => {
                let i = at.index(wire.len() + 1);
                wire.truncate(i);
            }
            Mutation::HugeLength(at, marker, n) => {
                let i = at.index(wire.len() + 1);
                let mut field = vec![*marker];
                field.extend_from_slice(&n.to_be_bytes());
                wire.splice(i..i, field);
            }
            _ => {}
        }
    }
    wire
}

fn arb_input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // Several valid frames back to back, then mutated.
        (
            proptest::collection::vec(arb_valid_frame(), 1..4),
            proptest::collection::vec(arb_mutation(), 0..6),
        )
            .prop_map(|(frames, mutations)| mutate(frames.concat(), &mutations)),
        proptest::collection::vec(any::<u8>(), 0..2048),
    ]
}

// ---- the properties ----------------------------------------------------------------------

/// Feeds `wire` in pieces of the given sizes (cycled), as reads from a socket would,
/// then signals the end of the stream. Returns the frames decoded before the first error.
fn feed<D: Decoder>(decoder: &mut D, wire: &[u8], pieces: &[usize]) -> (Vec<D::Item>, bool) {
    // The caller's buffer is allocated up front, so only the decoder's own allocations count.
    let mut buf = BytesMut::with_capacity(wire.len());
    let mut frames = Vec::with_capacity(64);
    let mut at = 0;
    let mut piece = pieces.iter().cycle();
    while at < wire.len() {
        let n = (*piece.next().unwrap()).min(wire.len() - at);
        buf.extend_from_slice(&wire[at..at + n]);
        at += n;
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(_) => return (frames, true),
            }
        }
    }
    loop {
        match decoder.decode_eof(&mut buf) {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => return (frames, false),
            Err(_) => return (frames, true),
        }
    }
}

fn cases() -> u32 {
    std::env::var("SLUICE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16_000)
}

#[test]
fn server_codec_survives_arbitrary_and_mutated_frames() {
    let started = std::time::Instant::now();
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (arb_input(), proptest::collection::vec(1usize..700, 1..5));
    let errors = Cell::new(0u32);
    let decoded = Cell::new(0u32);
    runner
        .run(&strategy, |(wire, pieces)| {
            let ((frames, failed), peak) =
                peak_allocated(|| feed(&mut ServerCodec::new(LIMITS), &wire, &pieces));
            prop_assert!(
                peak <= ALLOCATION_BOUND,
                "decoding {} bytes allocated {peak} bytes at once (bound {ALLOCATION_BOUND})",
                wire.len()
            );
            errors.set(errors.get() + failed as u32);
            for frame in frames {
                if let ClientFrame::Events(batch) = frame {
                    decoded.set(decoded.get() + 1);
                    let entries = batch.iter().collect::<Result<Vec<_>, _>>();
                    prop_assert!(entries.is_ok(), "a decoded batch must iterate: {entries:?}");
                    prop_assert_eq!(entries.unwrap().len(), batch.count);
                    if let Some(size) = batch.options.size {
                        prop_assert_eq!(size, batch.count as u64);
                    }
                    if let Some(p) = &batch.options.provenance {
                        prop_assert_eq!(p.seqs.len(), batch.count);
                    }
                }
            }
            Ok(())
        })
        .unwrap();
    let (decoded, errors) = (decoded.get(), errors.get());
    eprintln!(
        "{} cases in {:.1?}: {decoded} event frames decoded, {errors} inputs rejected",
        cases(),
        started.elapsed()
    );
    // The generator must exercise both paths, or the target tests nothing.
    assert!(
        decoded > 0 && errors > 0,
        "decoded {decoded}, errors {errors}"
    );
}

#[test]
fn client_codec_survives_arbitrary_bytes() {
    let mut runner = TestRunner::new(Config {
        cases: cases() / 4,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        prop_oneof![
            (
                proptest::collection::vec(any::<u8>(), 0..64),
                proptest::collection::vec(arb_mutation(), 0..4)
            )
                .prop_map(|(b, m)| mutate(b, &m)),
            // Acks, HELO and PONG shapes with random content.
            proptest::collection::vec(any::<u8>(), 0..512).prop_map(|mut b| {
                b.insert(0, 0x81);
                b
            }),
        ],
        proptest::collection::vec(1usize..64, 1..4),
    );
    runner
        .run(&strategy, |(wire, pieces)| {
            let (_, peak) = peak_allocated(|| feed(&mut ClientCodec::new(LIMITS), &wire, &pieces));
            prop_assert!(peak <= ALLOCATION_BOUND, "allocated {peak} bytes at once");
            Ok(())
        })
        .unwrap();
}

/// Large declared lengths are refused from the header, before anything is buffered.
#[test]
fn declared_sizes_beyond_the_limit_fail_at_once() {
    for header in [
        &[0x93, 0xa1, b't', 0xc6, 0xff, 0xff, 0xff, 0xff][..],
        &[0x92, 0xa1, b't', 0xdd, 0x7f, 0xff, 0xff, 0xff],
        &[0xdb, 0x00, 0x10, 0x00, 0x00],
        &[0x93, 0xa1, b't', 0xc9, 0x01, 0x00, 0x00, 0x00, 0x00],
    ] {
        let mut buf = BytesMut::from(header);
        let (result, peak) = peak_allocated(|| ServerCodec::new(LIMITS).decode(&mut buf));
        assert!(result.is_err(), "{header:x?}: {result:?}");
        assert!(peak < 4096, "{header:x?} allocated {peak}");
    }
}

/// Inputs built to make a naive decoder allocate far more than the frame: each must fail
/// (or decode) within the bound.
#[test]
fn amplifying_frames_stay_within_the_bound() {
    let f = LIMITS.max_frame_bytes;
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();

    // Forward mode, thousands of 3-byte entries `[0, {}]`: each is 12 bytes canonical.
    let n = (f - 64) / 3;
    let mut wire = vec![0x92, 0xa1, b't'];
    rmp::encode::write_array_len(&mut wire, n as u32).unwrap();
    for _ in 0..n {
        wire.extend_from_slice(&[0x92, 0x00, 0x80]);
    }
    cases.push(("tiny forward entries", wire));

    // A provenance array of one-byte seqs: 8 bytes each once decoded.
    let mut wire = vec![0x93, 0xa1, b't', 0x90, 0x81];
    rmp::encode::write_str(&mut wire, "sluice").unwrap();
    wire.extend_from_slice(&[
        0x82, 0xa3, b's', b'r', b'c', 0xa1, b'x', 0xa3, b's', b'e', b'q',
    ]);
    let n = f - 64;
    rmp::encode::write_array_len(&mut wire, n as u32).unwrap();
    wire.extend(std::iter::repeat_n(0x01u8, n));
    cases.push(("huge provenance", wire));

    // A gzip bomb: zeros compress about 1000:1.
    let gz = gzip_entries(&vec![0u8; 64 * LIMITS.max_decompressed_bytes]);
    let mut b = BytesMut::new();
    encode_compressed_packed_forward("t", &gz, 1, "c", None, &mut b);
    cases.push(("gzip bomb", b.to_vec()));

    // Gzipped tiny entries: a decompressed buffer just under the limit that grows 4x
    // when made canonical.
    let mut entries = Vec::new();
    for _ in 0..(LIMITS.max_decompressed_bytes - 16) / 3 {
        entries.extend_from_slice(&[0x92, 0x00, 0x80]);
    }
    let gz = gzip_entries(&entries);
    let mut b = BytesMut::new();
    encode_compressed_packed_forward("t", &gz, entries.len() / 3, "c", None, &mut b);
    cases.push(("gzip tiny entries", b.to_vec()));

    for (name, wire) in cases {
        assert!(wire.len() <= f, "{name}: {} bytes", wire.len());
        let ((frames, failed), peak) =
            peak_allocated(|| feed(&mut ServerCodec::new(LIMITS), &wire, &[4096]));
        eprintln!(
            "{name}: {} bytes, peak {peak}, decoded {}, failed {failed}",
            wire.len(),
            frames.len()
        );
        assert!(
            peak <= ALLOCATION_BOUND,
            "{name}: allocated {peak} bytes at once"
        );
    }
}
