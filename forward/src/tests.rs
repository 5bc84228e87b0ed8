//! Frame-level tests: every mode, every split, hostile input.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};

use super::msgpack::{write_array_len, write_bin, write_map_len, write_str, write_uint};
use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Message,
    Forward,
    PackedBin,
    PackedStr,
    Compressed,
    /// Compressed, each entry its own gzip member (as Fluent Bit may send).
    CompressedMultiMember,
}

const MODES: [Mode; 6] = [
    Mode::Message,
    Mode::Forward,
    Mode::PackedBin,
    Mode::PackedStr,
    Mode::Compressed,
    Mode::CompressedMultiMember,
];

/// How a test frame spells an entry's time.
#[derive(Clone, Copy, Debug)]
enum TimeStyle {
    FixExt,
    Ext8,
    /// Whole seconds as an int (the test event then has no nanoseconds).
    Int,
}

#[derive(Clone, Debug)]
struct Event {
    time: EventTime,
    style: TimeStyle,
    fields: Vec<(String, Vec<u8>)>,
}

impl Event {
    fn new(secs: u32, nanos: u32, fields: &[(&str, &[u8])]) -> Self {
        Event {
            time: EventTime { secs, nanos },
            style: TimeStyle::FixExt,
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_vec()))
                .collect(),
        }
    }

    fn field_refs(&self) -> Vec<(&str, &[u8])> {
        self.fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect()
    }

    fn record(&self) -> Vec<u8> {
        let mut entry = Vec::new();
        write_entry(&mut entry, self.time, &self.field_refs());
        entry.split_off(11)
    }

    fn write_time(&self, out: &mut Vec<u8>) {
        let t = self.time;
        match self.style {
            TimeStyle::FixExt => out.extend_from_slice(&[0xd7, 0x00]),
            TimeStyle::Ext8 => out.extend_from_slice(&[0xc7, 0x08, 0x00]),
            TimeStyle::Int => return write_uint(out, t.secs as u64),
        }
        out.extend_from_slice(&t.secs.to_be_bytes());
        out.extend_from_slice(&t.nanos.to_be_bytes());
    }

    fn write_entry_as_sent(&self, out: &mut Vec<u8>) {
        out.push(0x92);
        self.write_time(out);
        out.extend_from_slice(&self.record());
    }
}

fn gzip_members(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.iter().flat_map(|p| gzip_entries(p)).collect()
}

/// Encodes `events` in `mode` with options {size, chunk, (compressed)}.
fn frame(mode: Mode, tag: &str, events: &[Event], chunk: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let options = |out: &mut Vec<u8>, compressed: bool| {
        write_map_len(out, if compressed { 3 } else { 2 });
        write_str(out, "size");
        write_uint(out, events.len() as u64);
        write_str(out, "chunk");
        write_str(out, chunk);
        if compressed {
            write_str(out, "compressed");
            write_str(out, "gzip");
        }
    };
    let packed: Vec<Vec<u8>> = events
        .iter()
        .map(|e| {
            let mut v = Vec::new();
            e.write_entry_as_sent(&mut v);
            v
        })
        .collect();
    match mode {
        Mode::Message => {
            assert_eq!(events.len(), 1);
            write_array_len(&mut out, 4);
            write_str(&mut out, tag);
            events[0].write_time(&mut out);
            out.extend_from_slice(&events[0].record());
            options(&mut out, false);
        }
        Mode::Forward => {
            write_array_len(&mut out, 3);
            write_str(&mut out, tag);
            write_array_len(&mut out, events.len());
            out.extend(packed.concat());
            options(&mut out, false);
        }
        Mode::PackedBin | Mode::PackedStr => {
            write_array_len(&mut out, 3);
            write_str(&mut out, tag);
            let all = packed.concat();
            if mode == Mode::PackedBin {
                write_bin(&mut out, &all);
            } else {
                // A str header over bytes that are not UTF-8, as Fluentd's out_forward sends.
                out.push(0xdb);
                out.extend_from_slice(&(all.len() as u32).to_be_bytes());
                out.extend_from_slice(&all);
            }
            options(&mut out, false);
        }
        Mode::Compressed | Mode::CompressedMultiMember => {
            write_array_len(&mut out, 3);
            write_str(&mut out, tag);
            let gz = if mode == Mode::Compressed {
                gzip_entries(&packed.concat())
            } else {
                gzip_members(&packed)
            };
            write_bin(&mut out, &gz);
            options(&mut out, true);
        }
    }
    out
}

fn expected(mode: Mode, tag: &str, events: &[Event], chunk: &str) -> ClientFrame {
    let mut entries = Vec::new();
    for e in events {
        write_entry(&mut entries, e.time, &e.field_refs());
    }
    let compressed = matches!(mode, Mode::Compressed | Mode::CompressedMultiMember);
    ClientFrame::Events(EventBatch {
        hours: Vec::new(),
        tag: tag.to_string(),
        entries,
        count: events.len(),
        options: Options {
            size: Some(events.len() as u64),
            chunk: Some(chunk.to_string()),
            compressed: compressed.then(|| "gzip".to_string()),
            provenance: None,
        },
    })
}

fn sample_events() -> Vec<Event> {
    vec![
        Event::new(
            1_700_000_000,
            1,
            &[("message", b"hello"), ("level", b"info")],
        ),
        Event::new(
            1_700_000_001,
            999_999_999,
            &[("message", "grüße".as_bytes())],
        ),
        Event::new(
            1_700_000_002,
            0,
            &[("raw", b"\xff\x00\xfe"), ("empty", b"")],
        ),
    ]
}

fn events_for(mode: Mode) -> Vec<Event> {
    let mut events = sample_events();
    if mode == Mode::Message {
        events.truncate(1);
    }
    events
}

/// Decodes everything in `buf` (stopping at the first error).
fn decode_all<D: Decoder>(codec: &mut D, buf: &mut BytesMut) -> Result<Vec<D::Item>, D::Error> {
    let mut frames = Vec::new();
    while let Some(frame) = codec.decode(buf)? {
        frames.push(frame);
    }
    Ok(frames)
}

fn server() -> ServerCodec {
    ServerCodec::new(Limits::default())
}

#[test]
fn round_trip_all_modes() {
    for mode in MODES {
        let events = events_for(mode);
        let wire = frame(mode, "app.web", &events, "chunk-1");
        let mut buf = BytesMut::from(&wire[..]);
        let decoded = decode_all(&mut server(), &mut buf).unwrap();
        assert_eq!(
            decoded,
            [expected(mode, "app.web", &events, "chunk-1")],
            "{mode:?}"
        );
        assert!(buf.is_empty());
    }
}

#[test]
fn every_mode_decodes_at_every_split() {
    for mode in MODES {
        let events = events_for(mode);
        let wire = frame(mode, "t", &events, "c");
        let want = expected(mode, "t", &events, "c");
        for split in 0..=wire.len() {
            let mut codec = server();
            let mut buf = BytesMut::from(&wire[..split]);
            let first = codec.decode(&mut buf).unwrap();
            if split < wire.len() {
                assert_eq!(first, None, "{mode:?} split {split}");
                buf.extend_from_slice(&wire[split..]);
                assert_eq!(codec.decode(&mut buf).unwrap().as_ref(), Some(&want));
            } else {
                assert_eq!(first.as_ref(), Some(&want));
            }
            assert!(buf.is_empty());
        }
    }
}

#[test]
fn client_encoder_round_trips_through_the_server_decoder() {
    let mut buf = BytesMut::new();
    let mut client = ClientCodec::new(Limits::default());
    let ClientFrame::Events(mut batch) = expected(Mode::Forward, "t", &sample_events(), "c") else {
        unreachable!()
    };
    batch.options.provenance = Some(Provenance {
        source: "agent-1/in_tail/inode-42".into(),
        seqs: vec![0, 1, 2],
        offsets: vec![0, 120, 250],
    });
    client
        .encode(ClientFrame::Events(batch.clone()), &mut buf)
        .unwrap();
    let helo = Helo::generate(true, true);
    let ping = Ping::new(&helo, "agent-1", "key", Some(("u", "p")));
    client
        .encode(ClientFrame::Ping(ping.clone()), &mut buf)
        .unwrap();
    let mut fast = BytesMut::new();
    encode_compressed_packed_forward(
        "t",
        &gzip_entries(&batch.entries),
        3,
        "c",
        batch.options.provenance.as_ref(),
        &mut fast,
    );
    client.encode(fast.freeze(), &mut buf).unwrap();
    buf.extend_from_slice(&[0xc0]); // heartbeat

    let decoded = decode_all(&mut server(), &mut buf).unwrap();
    let mut compressed = batch.clone();
    compressed.options.compressed = Some("gzip".into());
    assert_eq!(
        decoded,
        [
            ClientFrame::Events(batch),
            ClientFrame::Ping(ping),
            ClientFrame::Events(compressed)
        ]
    );
}

#[test]
fn server_frames_round_trip() {
    let helo = Helo::generate(false, false);
    let ping = Ping::new(&helo, "agent", "k", None);
    let frames = vec![
        ServerFrame::Helo(helo.clone()),
        ServerFrame::Pong(Pong::new(&ping, &helo.nonce, "relay", "k", Ok(()))),
        ServerFrame::Pong(Pong::new(
            &ping,
            &helo.nonce,
            "relay",
            "k",
            Err("bad".into()),
        )),
        ServerFrame::Ack("p8n9gmxTQVC8/nh2wlKKeQ==".into()),
    ];
    let mut buf = BytesMut::new();
    let mut server = server();
    for f in &frames {
        server.encode(f.clone(), &mut buf).unwrap();
    }
    let wire = buf.clone();
    let mut client = ClientCodec::new(Limits::default());
    assert_eq!(decode_all(&mut client, &mut buf).unwrap(), frames);
    // And byte by byte.
    let mut client = ClientCodec::new(Limits::default());
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for &b in wire.iter() {
        buf.extend_from_slice(&[b]);
        got.extend(decode_all(&mut client, &mut buf).unwrap());
    }
    assert_eq!(got, frames);
}

#[test]
fn fluentd_style_helo_with_str_nonce_and_extra_keys() {
    let mut wire = Vec::new();
    write_array_len(&mut wire, 2);
    write_str(&mut wire, "HELO");
    write_map_len(&mut wire, 3);
    write_str(&mut wire, "nonce");
    write_str(&mut wire, "abc");
    write_str(&mut wire, "future");
    write_array_len(&mut wire, 1);
    wire.push(0x01);
    write_str(&mut wire, "auth");
    write_str(&mut wire, "");
    let mut buf = BytesMut::from(&wire[..]);
    let got = ClientCodec::new(Limits::default())
        .decode(&mut buf)
        .unwrap();
    assert_eq!(
        got,
        Some(ServerFrame::Helo(Helo {
            nonce: b"abc".to_vec(),
            auth_salt: vec![],
            keepalive: true
        }))
    );
}

#[test]
fn message_mode_accepts_int_and_float_times_and_no_options() {
    let record = Event::new(0, 0, &[("k", b"v")]).record();
    for (time, want) in [
        (
            vec![0xce, 0x65, 0x53, 0xf1, 0x00],
            EventTime {
                secs: 1_700_000_000,
                nanos: 0,
            },
        ),
        (
            [&[0xcb][..], &1_700_000_000.25f64.to_be_bytes()].concat(),
            EventTime {
                secs: 1_700_000_000,
                nanos: 250_000_000,
            },
        ),
    ] {
        let mut wire = vec![0x93];
        write_str(&mut wire, "tag");
        wire.extend_from_slice(&time);
        wire.extend_from_slice(&record);
        let mut buf = BytesMut::from(&wire[..]);
        let Some(ClientFrame::Events(batch)) = server().decode(&mut buf).unwrap() else {
            panic!("no batch")
        };
        assert_eq!(batch.options, Options::default());
        let entries: Vec<Entry<'_>> = batch.iter().collect::<Result<_, _>>().unwrap();
        assert_eq!(
            entries,
            [Entry {
                time: want,
                record: &record
            }]
        );
    }
}

#[test]
fn size_mismatch_is_an_error() {
    let events = sample_events();
    let mut wire = frame(Mode::PackedBin, "t", &events, "c");
    // The options map ends with the size (3) ... find "size" then bump the value after it.
    let at = wire.windows(5).rposition(|w| w == b"\xa4size").unwrap() + 5;
    assert_eq!(wire[at], 3);
    wire[at] = 4;
    let err = server().decode(&mut BytesMut::from(&wire[..])).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::SizeMismatch {
                declared: 4,
                actual: 3
            }
        ),
        "{err}"
    );
}

#[test]
fn provenance_must_cover_every_entry_in_order() {
    let mut entries = Vec::new();
    for e in sample_events() {
        write_entry(&mut entries, e.time, &e.field_refs());
    }
    let gz = gzip_entries(&entries);
    for (seqs, ok) in [
        (vec![1, 2, 3], true),
        (vec![1, 2], false),
        (vec![1, 3, 3], false),
        (vec![3, 2, 1], false),
    ] {
        let p = Provenance {
            source: "s".into(),
            seqs,
            offsets: Vec::new(),
        };
        let mut buf = BytesMut::new();
        encode_compressed_packed_forward("t", &gz, 3, "c", Some(&p), &mut buf);
        let got = server().decode(&mut buf);
        assert_eq!(got.is_ok(), ok, "{p:?}: {got:?}");
    }
}

#[test]
fn canonical_compressed_entries_are_used_as_they_are() {
    let mut entries = Vec::new();
    for e in sample_events() {
        write_entry(&mut entries, e.time, &e.field_refs());
    }
    let mut buf = BytesMut::new();
    encode_compressed_packed_forward("t", &gzip_entries(&entries), 3, "c", None, &mut buf);
    let Some(ClientFrame::Events(batch)) = server().decode(&mut buf).unwrap() else {
        panic!()
    };
    assert_eq!(batch.entries, entries);
}

#[test]
fn oversized_frames_fail_before_they_arrive() {
    let limits = Limits {
        max_frame_bytes: 4096,
        max_decompressed_bytes: 1 << 20,
    };
    // A PackedForward frame that declares 1 MiB: refused after its first 12 bytes.
    let mut wire = vec![0x93];
    write_str(&mut wire, "tag");
    write_bin(&mut wire, &vec![0u8; 1 << 20]);
    let mut buf = BytesMut::from(&wire[..12]);
    let err = ServerCodec::new(limits).decode(&mut buf).unwrap_err();
    assert!(
        matches!(err, DecodeError::FrameTooLarge { limit: 4096, at_least } if at_least > 1 << 20),
        "{err}"
    );

    // A Forward frame of many small entries: refused as soon as more than the limit is
    // buffered, long before its end.
    let events: Vec<Event> = (0..2000)
        .map(|i| Event::new(i, 0, &[("message", b"0123456789")]))
        .collect();
    let wire = frame(Mode::Forward, "t", &events, "c");
    let mut codec = ServerCodec::new(limits);
    let mut buf = BytesMut::new();
    let mut fed = 0;
    let err = loop {
        let piece = &wire[fed..(fed + 100).min(wire.len())];
        fed += piece.len();
        buf.extend_from_slice(piece);
        match codec.decode(&mut buf) {
            Ok(None) => assert!(fed < wire.len()),
            Ok(Some(_)) => panic!("oversized frame decoded"),
            Err(e) => break e,
        }
    };
    assert!(matches!(
        err,
        DecodeError::FrameTooLarge { limit: 4096, .. }
    ));
    assert!(fed <= 4096 + 100, "fed {fed} of {}", wire.len());
}

#[test]
fn decompression_is_capped() {
    let mut entries = Vec::new();
    for i in 0..1000 {
        write_entry(
            &mut entries,
            EventTime { secs: i, nanos: 0 },
            &[("m", &[b'x'; 100])],
        );
    }
    let mut buf = BytesMut::new();
    encode_compressed_packed_forward("t", &gzip_entries(&entries), 1000, "c", None, &mut buf);
    let limits = Limits {
        max_frame_bytes: 1 << 20,
        max_decompressed_bytes: 50_000,
    };
    let err = ServerCodec::new(limits).decode(&mut buf).unwrap_err();
    assert!(
        matches!(err, DecodeError::DecompressedTooLarge { limit: 50_000 }),
        "{err}"
    );
}

#[test]
fn corrupt_gzip_and_unknown_compression_are_errors() {
    let mut wire = Vec::new();
    write_array_len(&mut wire, 3);
    write_str(&mut wire, "t");
    write_bin(&mut wire, b"\x1f\x8b\x08\x00garbage");
    write_map_len(&mut wire, 1);
    write_str(&mut wire, "compressed");
    write_str(&mut wire, "gzip");
    let err = server().decode(&mut BytesMut::from(&wire[..])).unwrap_err();
    assert!(matches!(err, DecodeError::Gzip(_)), "{err}");

    let n = wire.len();
    wire[n - 4..].copy_from_slice(b"zstd");
    let err = server().decode(&mut BytesMut::from(&wire[..])).unwrap_err();
    assert!(
        matches!(err, DecodeError::UnsupportedCompression(ref c) if c == "zstd"),
        "{err}"
    );
}

#[test]
fn errors_name_what_is_wrong() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![0x05], "not a Forward frame: a int"),
        (vec![0x91, 0x01], "tag is a int, not a string"),
        (vec![0x92, 0xa1, b't', 0xc3], "second element is a bool"),
        (
            vec![0x92, 0xa1, b't', 0x01],
            "Message mode frame has 2 elements",
        ),
        (
            vec![0x93, 0xa1, b't', 0x01, 0x90],
            "record is not a map (found array)",
        ),
        (
            vec![0x93, 0xa1, b't', 0x90, 0x05],
            "option is a int, not a map",
        ),
        (
            vec![0x92, 0xa1, b't', 0x91, 0x92, 0xa0, 0x80],
            "entry 0: time is not int/float/EventTime (found str)",
        ),
        (
            vec![0x92, 0xa1, b't', 0x92, 0x92, 0x01, 0x80, 0x91, 0x01],
            "entry 1: array of 1 elements",
        ),
    ];
    for (wire, want) in cases {
        let err = server()
            .decode(&mut BytesMut::from(&wire[..]))
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{err:?} lacks {want:?}");
    }
}

#[test]
fn deep_nesting_is_refused_without_recursion() {
    let mut wire = vec![0x93, 0xa1, b't', 0x01];
    for _ in 0..10_000 {
        wire.extend_from_slice(&[0x81, 0xa1, b'k']);
    }
    wire.push(0xc0);
    let err = server().decode(&mut BytesMut::from(&wire[..])).unwrap_err();
    assert!(matches!(err, DecodeError::NestingTooDeep { .. }), "{err}");
}

#[test]
fn eof_inside_a_frame_is_reported() {
    let wire = frame(Mode::PackedBin, "t", &sample_events(), "c");
    let mut buf = BytesMut::from(&wire[..wire.len() - 1]);
    let err = server().decode_eof(&mut buf).unwrap_err();
    assert!(matches!(err, DecodeError::UnexpectedEof { buffered } if buffered == wire.len() - 1));
    assert!(server().decode_eof(&mut BytesMut::new()).unwrap().is_none());
}

// ---- properties ---------------------------------------------------------------------------

fn arb_event() -> impl Strategy<Value = Event> {
    let field = (
        "[a-z_]{1,8}",
        prop_oneof![
            "\\PC{0,24}".prop_map(String::into_bytes),
            proptest::collection::vec(any::<u8>(), 0..24),
        ],
    );
    (
        any::<u32>(),
        0u32..1_000_000_000,
        0u8..3,
        proptest::collection::vec(field, 0..5),
    )
        .prop_map(|(secs, nanos, style, fields)| {
            let style = [TimeStyle::FixExt, TimeStyle::Ext8, TimeStyle::Int][style as usize];
            Event {
                time: EventTime {
                    secs,
                    nanos: if matches!(style, TimeStyle::Int) {
                        0
                    } else {
                        nanos
                    },
                },
                style,
                fields,
            }
        })
}

fn arb_frame() -> impl Strategy<Value = (Mode, Vec<Event>)> {
    (
        0..MODES.len(),
        proptest::collection::vec(arb_event(), 1..12),
    )
        .prop_map(|(m, mut events)| {
            let mode = MODES[m];
            if mode == Mode::Message {
                events.truncate(1);
            }
            (mode, events)
        })
}

/// Feeds `wire` in pieces of the given sizes; returns decoded frames or the first error.
fn feed<D: Decoder>(
    codec: &mut D,
    wire: &[u8],
    pieces: &[usize],
) -> Result<Vec<D::Item>, D::Error> {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut at = 0;
    let mut sizes = pieces.iter().cycle();
    while at < wire.len() {
        let n = (*sizes.next().unwrap_or(&1)).clamp(1, wire.len() - at);
        buf.extend_from_slice(&wire[at..at + n]);
        at += n;
        out.extend(decode_all(codec, &mut buf)?);
    }
    if let Some(last) = codec.decode_eof(&mut buf)? {
        out.push(last);
    }
    Ok(out)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        // Keep the source tree clean; a failure prints its minimal input.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_splits_decode_to_the_same_frames(
        frames in proptest::collection::vec(arb_frame(), 1..4),
        pieces in proptest::collection::vec(1usize..300, 1..8),
    ) {
        let mut wire = Vec::new();
        let mut want = Vec::new();
        for (i, (mode, events)) in frames.iter().enumerate() {
            let chunk = format!("chunk-{i}");
            wire.extend(frame(*mode, "app.tag", events, &chunk));
            want.push(expected(*mode, "app.tag", events, &chunk));
        }
        let got = feed(&mut server(), &wire, &pieces).unwrap();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn json_of_every_record_parses(events in proptest::collection::vec(arb_event(), 1..8)) {
        for e in &events {
            let mut json = Vec::new();
            record_to_json(&e.record(), &mut json).unwrap();
            let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
            let object = value.as_object().unwrap();
            // With duplicate keys the last one wins, in JSON parsers as in this map.
            let fields: std::collections::HashMap<_, _> = e.fields.iter().cloned().collect();
            for (k, v) in &fields {
                let got = &object[k.as_str()];
                match std::str::from_utf8(v) {
                    Ok(s) => prop_assert_eq!(got.as_str(), Some(s)),
                    Err(_) => {
                        use base64::Engine;
                        let b64 = got["$binary"].as_str().unwrap();
                        prop_assert_eq!(
                            base64::engine::general_purpose::STANDARD.decode(b64).unwrap(),
                            v.clone()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn random_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
        pieces in proptest::collection::vec(1usize..64, 1..4),
    ) {
        let limits = Limits { max_frame_bytes: 1024, max_decompressed_bytes: 4096 };
        let _ = feed(&mut ServerCodec::new(limits), &bytes, &pieces);
        let _ = feed(&mut ClientCodec::new(limits), &bytes, &pieces);
        let mut out = Vec::new();
        let _ = record_to_json(&bytes, &mut out);
        let _ = record_field(&bytes, "k");
    }

    #[test]
    fn decoder_never_panics_on_mutated_frames(
        (mode, events) in arb_frame(),
        mutations in proptest::collection::vec((0u8..3, any::<prop::sample::Index>(), any::<u8>()), 1..6),
        pieces in proptest::collection::vec(1usize..128, 1..4),
    ) {
        let mut wire = frame(mode, "t", &events, "c");
        for (kind, at, byte) in mutations {
            match kind {
                0 if !wire.is_empty() => {
                    let i = at.index(wire.len());
                    wire[i] ^= byte | 1;
                }
                1 => {
                    let i = at.index(wire.len() + 1);
                    wire.insert(i, byte);
                }
                _ if !wire.is_empty() => {
                    let i = at.index(wire.len());
                    wire.remove(i);
                }
                _ => {}
            }
        }
        let limits = Limits { max_frame_bytes: 1 << 16, max_decompressed_bytes: 1 << 16 };
        // Whatever decodes must be internally consistent.
        if let Ok(frames) = feed(&mut ServerCodec::new(limits), &wire, &pieces) {
            for f in frames {
                if let ClientFrame::Events(batch) = f {
                    let entries: Vec<_> = batch.iter().collect::<Result<_, _>>().unwrap();
                    prop_assert_eq!(entries.len(), batch.count);
                    for e in entries {
                        let mut json = Vec::new();
                        let _ = record_to_json(e.record, &mut json);
                    }
                }
            }
        }
        let _ = feed(&mut ClientCodec::new(limits), &wire, &pieces);
    }
}

#[test]
fn client_codec_passes_raw_frames_through() {
    let mut out = BytesMut::new();
    ClientCodec::new(Limits::default())
        .encode(Bytes::from_static(b"\xc0"), &mut out)
        .unwrap();
    assert_eq!(&out[..], b"\xc0");
}

/// The hint a server budgets by: the entries' length from the header alone, gzip from
/// the payload's first bytes, the trailer's size once the frame is whole.
#[test]
fn decode_hint_reads_what_a_prefix_shows() {
    let mut entries = Vec::new();
    for i in 0..200u32 {
        write_entry(
            &mut entries,
            EventTime::now(),
            &[("message", format!("line {i}").as_bytes())],
        );
    }
    let gz = gzip_entries(&entries);
    let mut frame = BytesMut::new();
    encode_compressed_packed_forward("t", &gz, 200, "c", None, &mut frame);
    let whole = decode_hint(&frame);
    assert_eq!(whole.entries_len, Some(gz.len()));
    assert!(whole.gzip && !whole.heartbeat);
    assert_eq!(whole.announced, entries.len());
    let prefix = decode_hint(&frame[..16]);
    assert_eq!(
        prefix.entries_len,
        Some(gz.len()),
        "the header announces the size"
    );
    assert!(prefix.gzip);
    assert_eq!(prefix.announced, 0, "no trailer yet");
    assert!(decode_hint(&[0xc0]).heartbeat);
    // Message mode announces nothing.
    let mut message = BytesMut::new();
    write_array_len(&mut message, 3);
    write_str(&mut message, "t");
    write_uint(&mut message, 1_700_000_000);
    write_map_len(&mut message, 0);
    assert_eq!(decode_hint(&message).entries_len, None);
    // Framer + decode_client_frame decode what the codec decodes.
    let mut buf = frame.clone();
    let cut = Framer::new(Limits::default())
        .next_frame(&mut buf)
        .unwrap()
        .unwrap();
    let Some(ClientFrame::Events(batch)) = decode_client_frame(&cut, &Limits::default()).unwrap()
    else {
        panic!("events expected")
    };
    assert_eq!(batch.count, 200);
}

#[test]
fn a_probe_decodes_as_an_empty_batch_that_asks_for_an_ack() {
    let mut buf = BytesMut::new();
    encode_probe("p-7", &mut buf);
    let decoded = decode_all(&mut server(), &mut buf).unwrap();
    let [ClientFrame::Events(batch)] = decoded.as_slice() else {
        panic!("not one batch: {decoded:?}")
    };
    assert_eq!(batch.tag, PROBE_TAG);
    assert_eq!(batch.count, 0);
    assert!(batch.entries.is_empty());
    assert_eq!(batch.options.chunk.as_deref(), Some("p-7"));
}
