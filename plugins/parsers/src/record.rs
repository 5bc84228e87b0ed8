//! Writing the record map every parser produces: MessagePack fields, text as str when
//! it is UTF-8 and as bin otherwise.
//!
//! The encoders here write what `rmp::encode` writes (the smallest form, a test holds
//! them to it) but reserve once and push the header and the bytes into the `Vec`
//! directly: through rmp's `io::Write` path a short string cost two bounds-checked
//! writes and its `Result`s, a tenth of the nginx parser's time (bench/RESULTS.md,
//! issue 16). A parser that knows a bound for its whole record (nginx/apache) writes
//! into a `Room` instead: grown once, then an index and a copy per header and value.

/// Containers (maps, arrays) nest at most this deep in a record, the record map being
/// level 1. Deeper JSON is delivered raw with a parse error.
pub const MAX_NESTING: usize = 32;

/// A field value of the regex-based parsers.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Value<'a> {
    /// str if valid UTF-8, else bin.
    Text(&'a [u8]),
    Int(i64),
    Static(&'static str),
}

/// The header of a str (`bin` false) or bin of `n` bytes: its bytes and how many of
/// them there are (at most 5).
#[inline(always)]
fn bytes_header(bin: bool, n: usize) -> ([u8; 5], usize) {
    let marker8 = if bin { 0xc4 } else { 0xd9 };
    match n {
        0..=31 if !bin => ([0xa0 | n as u8, 0, 0, 0, 0], 1),
        0..=255 => ([marker8, n as u8, 0, 0, 0], 2),
        256..=65_535 => {
            let [a, b] = (n as u16).to_be_bytes();
            ([marker8 + 1, a, b, 0, 0], 3)
        }
        _ => {
            let [a, b, c, d] = (n as u32).to_be_bytes();
            ([marker8 + 2, a, b, c, d], 5)
        }
    }
}

#[inline]
fn put_bytes(out: &mut Vec<u8>, bin: bool, bytes: &[u8]) {
    let (header, len) = bytes_header(bin, bytes.len());
    out.reserve(bytes.len() + 5);
    if len == 1 {
        out.push(header[0]);
    } else {
        out.extend_from_slice(&header[..len]);
    }
    out.extend_from_slice(bytes);
}

/// A MessagePack str of `s`, which the caller knows is UTF-8.
#[inline]
pub(crate) fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    put_bytes(out, false, s);
}

/// An integer in the smallest form, as `rmp::encode::write_sint` writes it: its bytes
/// and how many of them there are (at most 9).
#[inline(always)]
fn int_form(i: i64) -> ([u8; 9], usize) {
    let mut b = [0u8; 9];
    let len = match i {
        -32..=127 => {
            b[0] = i as u8;
            1
        }
        128..=255 => {
            b[..2].copy_from_slice(&[0xcc, i as u8]);
            2
        }
        256..=65_535 => {
            b[0] = 0xcd;
            b[1..3].copy_from_slice(&(i as u16).to_be_bytes());
            3
        }
        65_536..=4_294_967_295 => {
            b[0] = 0xce;
            b[1..5].copy_from_slice(&(i as u32).to_be_bytes());
            5
        }
        4_294_967_296.. => {
            b[0] = 0xcf;
            b[1..].copy_from_slice(&(i as u64).to_be_bytes());
            9
        }
        -128..=-33 => {
            b[..2].copy_from_slice(&[0xd0, i as u8]);
            2
        }
        -32_768..=-129 => {
            b[0] = 0xd1;
            b[1..3].copy_from_slice(&(i as i16).to_be_bytes());
            3
        }
        -2_147_483_648..=-32_769 => {
            b[0] = 0xd2;
            b[1..5].copy_from_slice(&(i as i32).to_be_bytes());
            5
        }
        _ => {
            b[0] = 0xd3;
            b[1..].copy_from_slice(&i.to_be_bytes());
            9
        }
    };
    (b, len)
}

/// An integer in the smallest form, as `rmp::encode::write_sint` writes it.
#[inline]
pub(crate) fn put_int(out: &mut Vec<u8>, i: i64) {
    let (b, len) = int_form(i);
    out.extend_from_slice(&b[..len]);
}

/// Room for one record, grown once by a bound the writer knows (its line's length plus
/// what its keys and headers can add): each write is then an index and a copy, without
/// a capacity check and a length update per field. A header or an integer is copied at
/// its largest size and the cursor moved by its real one; the bound counts the largest.
pub(crate) struct Room<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl Room<'_> {
    /// Grows `out` by `bound` bytes, lets `write` fill them, and keeps what it wrote.
    /// Writing past the bound panics (an index out of range), it cannot corrupt `out`.
    #[inline]
    pub(crate) fn write<R>(
        out: &mut Vec<u8>,
        bound: usize,
        write: impl FnOnce(&mut Room<'_>) -> R,
    ) -> R {
        let head = out.len();
        out.resize(head + bound, 0);
        let mut room = Room {
            buf: &mut out[head..],
            at: 0,
        };
        let r = write(&mut room);
        let used = room.at;
        out.truncate(head + used);
        r
    }

    /// Where the next byte goes: to patch a byte written earlier (`set`).
    #[inline]
    pub(crate) fn at(&self) -> usize {
        self.at
    }

    #[inline(always)]
    pub(crate) fn set(&mut self, at: usize, b: u8) {
        self.buf[at] = b;
    }

    #[inline(always)]
    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.buf[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
    }

    /// A str (`bin` false: the caller knows it is UTF-8) or a bin of `b`: 5 + `b.len()` of
    /// the bound.
    #[inline(always)]
    pub(crate) fn put_bytes(&mut self, bin: bool, b: &[u8]) {
        let (header, len) = bytes_header(bin, b.len());
        self.buf[self.at..self.at + 5].copy_from_slice(&header);
        self.at += len;
        self.bytes(b);
    }

    /// 9 of the bound.
    #[inline(always)]
    pub(crate) fn put_int(&mut self, i: i64) {
        let (b, len) = int_form(i);
        self.buf[self.at..self.at + 9].copy_from_slice(&b);
        self.at += len;
    }
}

pub(crate) fn write_map_len(out: &mut Vec<u8>, n: usize) {
    match n {
        0..=15 => out.push(0x80 | n as u8),
        16..=65_535 => {
            out.push(0xde);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        _ => {
            out.push(0xdf);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
    }
}

pub(crate) fn write_text(out: &mut Vec<u8>, bytes: &[u8]) {
    put_bytes(out, !is_utf8(bytes), bytes);
}

/// UTF-8, with ASCII (the common case of a log line) decided first without a byte loop:
/// the standard library's `is_ascii` checks 64 bytes at a time and then went byte by byte
/// over the last up to 63, a fifth of the nginx parser's samples on 100-byte lines.
#[inline]
pub(crate) fn is_utf8(bytes: &[u8]) -> bool {
    is_ascii(bytes) || std::str::from_utf8(bytes).is_ok()
}

#[inline]
fn is_ascii(b: &[u8]) -> bool {
    let n = b.len();
    if n >= 64 {
        // Whole blocks, then the last 64 bytes again (overlapping) for the rest.
        return b[..n & !63].is_ascii() && b[n - 64..].is_ascii();
    }
    if n < 16 {
        return b.iter().fold(0, |acc, &x| acc | x) < 0x80;
    }
    let word = |c: &[u8]| u64::from_le_bytes(c.try_into().unwrap());
    let mut chunks = b.chunks_exact(16);
    let mut acc = 0u64;
    for c in &mut chunks {
        acc |= word(&c[..8]) | word(&c[8..]);
    }
    let last = &b[n - 16..];
    acc |= word(&last[..8]) | word(&last[8..]);
    acc & 0x8080_8080_8080_8080 == 0
}

pub(crate) fn write_field(out: &mut Vec<u8>, key: &str, value: &Value<'_>) {
    put_str(out, key.as_bytes());
    match *value {
        Value::Text(b) => write_text(out, b),
        Value::Int(i) => put_int(out, i),
        Value::Static(s) => put_str(out, s.as_bytes()),
    }
}

pub(crate) fn write_fields(out: &mut Vec<u8>, fields: &[(&str, Value<'_>)]) {
    write_map_len(out, fields.len());
    for (key, value) in fields {
        write_field(out, key, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `write` leaves after bytes already in the buffer, in room of `bound`.
    fn in_room(bound: usize, write: impl FnOnce(&mut Room<'_>)) -> Vec<u8> {
        let mut out = b"before".to_vec();
        Room::write(&mut out, bound, write);
        assert_eq!(&out[..6], b"before");
        out.split_off(6)
    }

    #[test]
    fn ascii_and_utf8_are_told_apart_at_every_length_and_place() {
        for len in 0..70 {
            let line = vec![b'a'; len];
            assert!(is_ascii(&line) && is_utf8(&line), "{len}");
            for at in 0..len {
                let mut high = line.clone();
                high[at] = 0xe9;
                assert!(!is_ascii(&high), "{len} {at}");
                assert!(!is_utf8(&high), "a lone 0xe9 is not UTF-8: {len} {at}");
                if at + 1 < len {
                    high[at + 1] = 0xa9;
                    high[at] = 0xc3; // é
                    assert!(!is_ascii(&high) && is_utf8(&high), "{len} {at}");
                }
            }
        }
    }

    #[test]
    fn the_encoders_write_what_rmp_writes() {
        let mut ints: Vec<i64> = vec![i64::MIN, i64::MAX, 0];
        for edge in [
            32i64,
            33,
            128,
            129,
            256,
            32_768,
            32_769,
            65_536,
            2_147_483_648,
            4_294_967_296,
        ] {
            for d in -2..=2 {
                ints.extend([edge + d, -(edge + d)]);
            }
        }
        for i in ints {
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            put_int(&mut ours, i);
            rmp::encode::write_sint(&mut theirs, i).unwrap();
            assert_eq!(ours, theirs, "{i}");
            assert_eq!(in_room(9, |r| r.put_int(i)), theirs, "{i} in room");
        }
        for n in [0usize, 1, 15, 16, 31, 32, 255, 256, 65_535, 65_536, 70_000] {
            let text = "x".repeat(n);
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            put_str(&mut ours, text.as_bytes());
            rmp::encode::write_str(&mut theirs, &text).unwrap();
            assert_eq!(ours, theirs, "str of {n}");
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            put_bytes(&mut ours, true, text.as_bytes());
            rmp::encode::write_bin(&mut theirs, text.as_bytes()).unwrap();
            assert_eq!(ours, theirs, "bin of {n}");
            assert_eq!(
                in_room(n + 5, |r| r.put_bytes(true, text.as_bytes())),
                theirs,
                "bin of {n} in room"
            );
            theirs.clear();
            rmp::encode::write_str(&mut theirs, &text).unwrap();
            assert_eq!(
                in_room(n + 5, |r| r.put_bytes(false, text.as_bytes())),
                theirs,
                "str of {n} in room"
            );
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            write_map_len(&mut ours, n);
            rmp::encode::write_map_len(&mut theirs, n as u32).unwrap();
            assert_eq!(ours, theirs, "map of {n}");
        }
    }
}
