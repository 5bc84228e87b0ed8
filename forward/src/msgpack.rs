//! The small part of MessagePack the Forward protocol needs, written for untrusted input.
//!
//! - [`parse_head`] reads the header of one value (its marker and length fields) and
//!   says "need more" instead of failing when the buffer ends early.
//! - [`scan`] finds where a whole value ends without allocating: containers are walked
//!   with a fixed-size stack of "items left" counters, so a hostile frame can neither
//!   allocate per element nor recurse. It also reports a lower bound of the bytes an
//!   incomplete value needs, which lets the codec refuse an oversized frame early.
//! - [`Reader`] walks a complete buffer value by value; every step is bounds-checked.
//! - The `read_*` functions read one value of an expected type and name the field in
//!   their errors; the `write_*` functions encode into any [`BufMut`] and cannot fail.

use bytes::BufMut;

use crate::error::{malformed, DecodeError};
use crate::limits::MAX_DEPTH;

/// The largest `max_depth` [`scan`] accepts; deeper limits are clamped to it.
const SCAN_STACK: usize = 80;

/// The header of one msgpack value. For str, bin and ext the payload follows the header;
/// for array and map the elements follow.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Head {
    Nil,
    Bool(bool),
    Uint(u64),
    Int(i64),
    F32(f32),
    F64(f64),
    Str(usize),
    Bin(usize),
    Array(usize),
    Map(usize),
    Ext { ty: i8, len: usize },
}

impl Head {
    /// What the value is, in words for error messages.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Head::Nil => "nil",
            Head::Bool(_) => "bool",
            Head::Uint(_) | Head::Int(_) => "int",
            Head::F32(_) | Head::F64(_) => "float",
            Head::Str(_) => "str",
            Head::Bin(_) => "bin",
            Head::Array(_) => "array",
            Head::Map(_) => "map",
            Head::Ext { .. } => "ext",
        }
    }

    /// Bytes of payload that follow the header (not counting container elements).
    fn payload_len(&self) -> usize {
        match *self {
            Head::Str(n) | Head::Bin(n) | Head::Ext { len: n, .. } => n,
            _ => 0,
        }
    }
}

/// How many header bytes (marker included; for ext also the type byte) a marker needs.
#[inline]
fn header_len(marker: u8) -> Result<usize, DecodeError> {
    Ok(match marker {
        0x00..=0xbf | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => 1,
        0xc1 => {
            return Err(DecodeError::Malformed {
                what: "reserved msgpack marker 0xc1".into(),
            })
        }
        0xcc | 0xd0 | 0xd9 | 0xc4 => 2,
        0xcd | 0xd1 | 0xda | 0xc5 | 0xdc | 0xde => 3,
        0xce | 0xd2 | 0xca | 0xdb | 0xc6 | 0xdd | 0xdf => 5,
        0xcf | 0xd3 | 0xcb => 9,
        0xd4..=0xd8 => 2,
        0xc7 => 3,
        0xc8 => 4,
        0xc9 => 6,
    })
}

#[inline]
fn be<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[..N]);
    a
}

/// Reads the header at the start of `buf`. `Ok(None)` means `buf` ends inside the header;
/// the header length is then `header_len(buf[0])` (or 1 for an empty buffer).
#[inline]
pub(crate) fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, DecodeError> {
    let Some(&m) = buf.first() else {
        return Ok(None);
    };
    let hl = header_len(m)?;
    if buf.len() < hl {
        return Ok(None);
    }
    // From here on `buf[..hl]` exists, so the fixed-size reads below cannot go out of bounds.
    let b = &buf[1..hl];
    let u8_ = || b[0] as usize;
    let u16_ = || u16::from_be_bytes(be(b)) as usize;
    let u32_ = || u32::from_be_bytes(be(b)) as usize;
    let head = match m {
        0x00..=0x7f => Head::Uint(m as u64),
        0x80..=0x8f => Head::Map((m & 0x0f) as usize),
        0x90..=0x9f => Head::Array((m & 0x0f) as usize),
        0xa0..=0xbf => Head::Str((m & 0x1f) as usize),
        0xe0..=0xff => Head::Int(m as i8 as i64),
        0xc0 => Head::Nil,
        0xc2 => Head::Bool(false),
        0xc3 => Head::Bool(true),
        0xcc => Head::Uint(b[0] as u64),
        0xcd => Head::Uint(u16::from_be_bytes(be(b)) as u64),
        0xce => Head::Uint(u32::from_be_bytes(be(b)) as u64),
        0xcf => Head::Uint(u64::from_be_bytes(be(b))),
        0xd0 => Head::Int(b[0] as i8 as i64),
        0xd1 => Head::Int(i16::from_be_bytes(be(b)) as i64),
        0xd2 => Head::Int(i32::from_be_bytes(be(b)) as i64),
        0xd3 => Head::Int(i64::from_be_bytes(be(b))),
        0xca => Head::F32(f32::from_be_bytes(be(b))),
        0xcb => Head::F64(f64::from_be_bytes(be(b))),
        0xd9 => Head::Str(u8_()),
        0xda => Head::Str(u16_()),
        0xdb => Head::Str(u32_()),
        0xc4 => Head::Bin(u8_()),
        0xc5 => Head::Bin(u16_()),
        0xc6 => Head::Bin(u32_()),
        0xdc => Head::Array(u16_()),
        0xdd => Head::Array(u32_()),
        0xde => Head::Map(u16_()),
        0xdf => Head::Map(u32_()),
        0xd4..=0xd8 => Head::Ext {
            ty: b[0] as i8,
            len: 1 << (m - 0xd4),
        },
        0xc7 => Head::Ext {
            ty: b[1] as i8,
            len: b[0] as usize,
        },
        0xc8 => Head::Ext {
            ty: b[2] as i8,
            len: u16::from_be_bytes(be(b)) as usize,
        },
        0xc9 => Head::Ext {
            ty: b[4] as i8,
            len: u32::from_be_bytes(be(b)) as usize,
        },
        0xc1 => {
            return Err(DecodeError::Malformed {
                what: "reserved msgpack marker 0xc1".into(),
            })
        }
    };
    Ok(Some((head, hl)))
}

/// Result of [`scan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scan {
    /// The first value of the buffer is complete and this many bytes long.
    Complete(usize),
    /// The buffer ends inside the value, which is at least this many bytes long.
    Incomplete { at_least: usize },
}

/// Finds the end of the msgpack value at the start of `buf` without allocating.
///
/// Containers may nest at most `max_depth` levels (a top-level array is level 1).
pub(crate) fn scan(buf: &[u8], max_depth: usize) -> Result<Scan, DecodeError> {
    // Records are shallow: a small stack first (zeroing the full one for every record
    // was 5% of the relay's CPU), the full one only for a value that nests deeper.
    match scan_in::<SHALLOW_STACK>(buf, max_depth)? {
        Some(scan) => Ok(scan),
        None => Ok(scan_in::<SCAN_STACK>(buf, max_depth)?
            .expect("a stack of SCAN_STACK holds any depth scan accepts")),
    }
}

/// The stack [`scan`] tries first.
const SHALLOW_STACK: usize = 8;

/// [`scan`] with a stack of `N` open containers; `None` when the value nests deeper
/// than `N` (and `max_depth` allows that).
fn scan_in<const N: usize>(buf: &[u8], max_depth: usize) -> Result<Option<Scan>, DecodeError> {
    let max_depth = max_depth.min(SCAN_STACK);
    // Items still to read in each open container (a map of n pairs has 2n items).
    let mut left = [0u64; N];
    let mut depth = 0usize;
    let mut pos = 0usize;
    // Every item still to read is at least one byte: a cheap lower bound of what is missing.
    let pending = |left: &[u64], depth: usize| -> u64 { left[..depth].iter().sum() };
    let bound = |end: usize, more: u64| -> usize {
        (end as u64).saturating_add(more).min(usize::MAX as u64) as usize
    };
    loop {
        let rest = buf.get(pos..).unwrap_or_default();
        let Some((head, hl)) = parse_head(rest)? else {
            let need = rest.first().map_or(Ok(1), |&m| header_len(m))?;
            // The item being read is still counted in its parent's `left`.
            let others = pending(&left, depth).saturating_sub(u64::from(depth > 0));
            return Ok(Some(Scan::Incomplete {
                at_least: bound(pos.saturating_add(need), others),
            }));
        };
        pos += hl;
        if depth > 0 {
            left[depth - 1] -= 1;
        }
        match head {
            Head::Array(n) | Head::Map(n) => {
                if depth >= max_depth {
                    return Err(DecodeError::NestingTooDeep { limit: max_depth });
                }
                if depth >= N {
                    return Ok(None);
                }
                let items = if matches!(head, Head::Map(_)) {
                    2 * n as u64
                } else {
                    n as u64
                };
                if items > 0 {
                    left[depth] = items;
                    depth += 1;
                }
            }
            _ => {
                let end = pos.saturating_add(head.payload_len());
                if end > buf.len() {
                    return Ok(Some(Scan::Incomplete {
                        at_least: bound(end, pending(&left, depth)),
                    }));
                }
                pos = end;
            }
        }
        while depth > 0 && left[depth - 1] == 0 {
            depth -= 1;
        }
        if depth == 0 {
            return Ok(Some(Scan::Complete(pos)));
        }
    }
}

/// Walks a buffer value by value. Running past the end is an error, never a panic.
#[derive(Clone, Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    #[inline]
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    #[inline]
    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    #[inline]
    pub(crate) fn is_at_end(&self) -> bool {
        self.pos >= self.buf.len()
    }

    #[inline]
    pub(crate) fn rest(&self) -> &'a [u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }

    fn truncated(&self) -> DecodeError {
        DecodeError::Malformed {
            what: format!("value truncated at byte {}", self.pos),
        }
    }

    /// The payload of the next value if it is a fixext 8 of type `ty`, consumed; else
    /// `None` and nothing consumed. A shortcut for the per-event hot path (EventTime is
    /// a fixext 8 of type 0 in canonical form) that builds no [`Head`]: returning the
    /// general `Result<Head, _>` through memory cost a store-forwarding stall per event.
    #[inline]
    pub(crate) fn fixext8(&mut self, ty: u8) -> Option<&'a [u8; 8]> {
        let rest = self.rest();
        if rest.len() >= 10 && rest[0] == 0xd7 && rest[1] == ty {
            self.pos += 10;
            rest[2..10].try_into().ok()
        } else {
            None
        }
    }

    /// Reads the header of the next value; its payload (if any) is next.
    #[inline]
    pub(crate) fn head(&mut self) -> Result<Head, DecodeError> {
        match parse_head(self.rest())? {
            Some((head, hl)) => {
                self.pos += hl;
                Ok(head)
            }
            None => Err(self.truncated()),
        }
    }

    /// Reads `n` raw bytes (the payload of a str, bin or ext).
    #[inline]
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let rest = self.rest();
        if rest.len() < n {
            return Err(self.truncated());
        }
        self.pos += n;
        Ok(&rest[..n])
    }

    /// Skips one whole value and returns its raw bytes.
    #[inline]
    pub(crate) fn value(&mut self, max_depth: usize) -> Result<&'a [u8], DecodeError> {
        let rest = self.rest();
        match scan(rest, max_depth)? {
            Scan::Complete(n) => {
                self.pos += n;
                Ok(&rest[..n])
            }
            Scan::Incomplete { .. } => Err(self.truncated()),
        }
    }

    /// Skips the rest of a value whose header was already read.
    #[inline]
    pub(crate) fn skip_after(&mut self, head: Head, max_depth: usize) -> Result<(), DecodeError> {
        match head {
            Head::Array(n) | Head::Map(n) => {
                let items = if matches!(head, Head::Map(_)) {
                    n.saturating_mul(2)
                } else {
                    n
                };
                for _ in 0..items {
                    self.value(max_depth)?;
                }
                Ok(())
            }
            other => self.take(other.payload_len()).map(drop),
        }
    }

    /// Reads a str or bin value as bytes; `None` (nothing consumed but the header) otherwise.
    #[inline]
    pub(crate) fn bytes_after(&mut self, head: Head) -> Result<Option<&'a [u8]>, DecodeError> {
        match head {
            Head::Str(n) | Head::Bin(n) => self.take(n).map(Some),
            _ => Ok(None),
        }
    }
}

// ---- writing ----------------------------------------------------------------------------

/// Lengths in msgpack are at most u32; sluice never builds values that large (frames are
/// capped far below), so a longer one is a bug on the sending side, not bad input.
fn len32(n: usize) -> u32 {
    u32::try_from(n).expect("msgpack values are limited to 4 GiB")
}

pub(crate) fn write_bool(out: &mut impl BufMut, v: bool) {
    out.put_u8(if v { 0xc3 } else { 0xc2 });
}

pub(crate) fn write_uint(out: &mut impl BufMut, v: u64) {
    if v < 0x80 {
        out.put_u8(v as u8);
    } else if v <= u8::MAX as u64 {
        out.put_u8(0xcc);
        out.put_u8(v as u8);
    } else if v <= u16::MAX as u64 {
        out.put_u8(0xcd);
        out.put_u16(v as u16);
    } else if v <= u32::MAX as u64 {
        out.put_u8(0xce);
        out.put_u32(v as u32);
    } else {
        out.put_u8(0xcf);
        out.put_u64(v);
    }
}

pub(crate) fn write_str(out: &mut impl BufMut, s: &str) {
    let n = len32(s.len());
    if n < 32 {
        out.put_u8(0xa0 | n as u8);
    } else if n <= u8::MAX as u32 {
        out.put_u8(0xd9);
        out.put_u8(n as u8);
    } else if n <= u16::MAX as u32 {
        out.put_u8(0xda);
        out.put_u16(n as u16);
    } else {
        out.put_u8(0xdb);
        out.put_u32(n);
    }
    out.put_slice(s.as_bytes());
}

pub(crate) fn write_bin(out: &mut impl BufMut, b: &[u8]) {
    let n = len32(b.len());
    if n <= u8::MAX as u32 {
        out.put_u8(0xc4);
        out.put_u8(n as u8);
    } else if n <= u16::MAX as u32 {
        out.put_u8(0xc5);
        out.put_u16(n as u16);
    } else {
        out.put_u8(0xc6);
        out.put_u32(n);
    }
    out.put_slice(b);
}

pub(crate) fn write_array_len(out: &mut impl BufMut, n: usize) {
    let n = len32(n);
    if n < 16 {
        out.put_u8(0x90 | n as u8);
    } else if n <= u16::MAX as u32 {
        out.put_u8(0xdc);
        out.put_u16(n as u16);
    } else {
        out.put_u8(0xdd);
        out.put_u32(n);
    }
}

pub(crate) fn write_map_len(out: &mut impl BufMut, n: usize) {
    let n = len32(n);
    if n < 16 {
        out.put_u8(0x80 | n as u8);
    } else if n <= u16::MAX as u32 {
        out.put_u8(0xde);
        out.put_u16(n as u16);
    } else {
        out.put_u8(0xdf);
        out.put_u32(n);
    }
}

// ---- typed readers: one value of an expected type, `what` naming it in errors ----

/// Reads a str (or bin) that must be UTF-8; `what` names the field in errors.
pub(crate) fn read_string(r: &mut Reader<'_>, what: &str) -> Result<String, DecodeError> {
    let bytes = read_bytes(r, what)?;
    String::from_utf8(bytes).map_err(|_| malformed(format!("{what} is not valid UTF-8")))
}

/// Reads a str or bin as bytes; `what` names the field in errors.
pub(crate) fn read_bytes(r: &mut Reader<'_>, what: &str) -> Result<Vec<u8>, DecodeError> {
    let head = r.head()?;
    match r.bytes_after(head)? {
        Some(bytes) => Ok(bytes.to_vec()),
        None => Err(malformed(format!(
            "{what} is a {}, not a string",
            head.kind()
        ))),
    }
}

pub(crate) fn read_bool(r: &mut Reader<'_>, what: &str) -> Result<bool, DecodeError> {
    match r.head()? {
        Head::Bool(b) => Ok(b),
        other => Err(malformed(format!(
            "{what} is a {}, not a bool",
            other.kind()
        ))),
    }
}

pub(crate) fn read_uint(r: &mut Reader<'_>, what: &str) -> Result<u64, DecodeError> {
    match r.head()? {
        Head::Uint(v) => Ok(v),
        Head::Int(v) if v >= 0 => Ok(v as u64),
        other => Err(malformed(format!(
            "{what} is a {}, not an unsigned int",
            other.kind()
        ))),
    }
}

/// Reads the header of a map (`what` names it), or `None` for nil.
pub(crate) fn read_map_len(r: &mut Reader<'_>, what: &str) -> Result<Option<usize>, DecodeError> {
    match r.head()? {
        Head::Map(n) => Ok(Some(n)),
        Head::Nil => Ok(None),
        other => Err(malformed(format!(
            "{what} is a {}, not a map",
            other.kind()
        ))),
    }
}

/// Reads a map key; `None` (key consumed) if it is neither str nor bin.
pub(crate) fn read_key<'a>(r: &mut Reader<'a>) -> Result<Option<&'a [u8]>, DecodeError> {
    let head = r.head()?;
    match r.bytes_after(head)? {
        Some(key) => Ok(Some(key)),
        None => {
            r.skip_after(head, MAX_DEPTH)?;
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values nesting past the shallow stack are scanned with the full one, with the same
    /// answers: complete, incomplete (with the same lower bound) or too deep.
    #[test]
    fn scan_past_the_shallow_stack() {
        for depth in [SHALLOW_STACK - 1, SHALLOW_STACK, SHALLOW_STACK + 1, 40] {
            // [[[...[1, 2]...], 3], 3] : every level an array of two.
            let mut v = vec![0x92u8; depth];
            v.extend_from_slice(&[0x92, 0x01, 0x02]);
            v.extend(std::iter::repeat_n(0x03u8, depth));
            assert_eq!(
                scan(&v, 64).unwrap(),
                Scan::Complete(v.len()),
                "depth {depth}"
            );
            let full = scan_in::<SCAN_STACK>(&v[..v.len() - 1], 64)
                .unwrap()
                .unwrap();
            assert_eq!(scan(&v[..v.len() - 1], 64).unwrap(), full);
            assert!(matches!(
                scan(&v, depth),
                Err(DecodeError::NestingTooDeep { .. })
            ));
        }
    }

    #[test]
    fn scan_scalars_and_containers() {
        assert_eq!(scan(&[0x01], 8).unwrap(), Scan::Complete(1));
        assert_eq!(scan(&[0x90], 8).unwrap(), Scan::Complete(1));
        // [1, {"a": nil}] followed by garbage
        let v = [0x92, 0x01, 0x81, 0xa1, b'a', 0xc0, 0xff];
        assert_eq!(scan(&v, 8).unwrap(), Scan::Complete(6));
        for cut in 0..6 {
            assert!(matches!(
                scan(&v[..cut], 8).unwrap(),
                Scan::Incomplete { at_least } if at_least > cut && at_least <= 6
            ));
        }
    }

    #[test]
    fn scan_reports_declared_size_early() {
        // bin32 of 1 MiB: known to need 1 MiB + 5 bytes after only 5 bytes.
        let v = [0xc6, 0x00, 0x10, 0x00, 0x00];
        assert_eq!(
            scan(&v, 8).unwrap(),
            Scan::Incomplete {
                at_least: (1 << 20) + 5
            }
        );
        // array32 of 2^32-1 items: each at least one byte.
        let v = [0xdd, 0xff, 0xff, 0xff, 0xff];
        assert!(
            matches!(scan(&v, 8).unwrap(), Scan::Incomplete { at_least } if at_least >= u32::MAX as usize)
        );
    }

    #[test]
    fn scan_bounds_depth_without_recursion() {
        let deep = vec![0x91u8; 100_000];
        assert!(matches!(
            scan(&deep, 64),
            Err(DecodeError::NestingTooDeep { limit: 64 })
        ));
        let mut ok = vec![0x91u8; 63];
        ok.push(0x90);
        assert_eq!(scan(&ok, 64).unwrap(), Scan::Complete(64));
    }

    #[test]
    fn reserved_marker_is_an_error() {
        assert!(scan(&[0xc1], 8).is_err());
        assert!(scan(&[0x92, 0x01, 0xc1], 8).is_err());
    }

    #[test]
    fn writers_round_trip_through_rmp() {
        let mut out = Vec::new();
        for v in [
            0u64,
            127,
            128,
            255,
            256,
            65535,
            65536,
            u32::MAX as u64,
            u64::MAX,
        ] {
            out.clear();
            write_uint(&mut out, v);
            assert_eq!(rmp::decode::read_int::<u64, _>(&mut &out[..]).unwrap(), v);
            assert_eq!(scan(&out, 1).unwrap(), Scan::Complete(out.len()));
        }
        for n in [0usize, 31, 32, 255, 256, 70_000] {
            let s = "x".repeat(n);
            out.clear();
            write_str(&mut out, &s);
            let mut r = Reader::new(&out);
            let h = r.head().unwrap();
            assert_eq!(h, Head::Str(n));
            out.clear();
            write_bin(&mut out, s.as_bytes());
            assert_eq!(Reader::new(&out).head().unwrap(), Head::Bin(n));
            out.clear();
            write_array_len(&mut out, n);
            assert_eq!(Reader::new(&out).head().unwrap(), Head::Array(n));
            out.clear();
            write_map_len(&mut out, n);
            assert_eq!(Reader::new(&out).head().unwrap(), Head::Map(n));
        }
    }
}
