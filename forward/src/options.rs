//! The option map of an event frame: `size`, `chunk`, `compressed`, and sluice's
//! provenance under `"sluice"`. Other implementations ignore keys they do not know, and
//! so does this reader.

use bytes::BufMut;

use crate::error::{malformed, DecodeError};
use crate::limits::MAX_DEPTH;
use crate::msgpack::{
    read_key, read_map_len, read_string, read_uint, write_array_len, write_map_len, write_str,
    write_uint, Head, Reader,
};

/// Key of sluice's provenance in the option map.
pub(crate) const PROVENANCE_KEY: &str = "sluice";

/// Where a batch's events come from, so the relay can drop resent duplicates.
///
/// Travels in the option map as `"sluice": {"src": <str>, "seq": [<uint>, ...],
/// "off": [<uint>, ...]}` with one strictly ascending sequence number per entry (a sluice
/// agent numbers each source's events 0, 1, 2, ...) and, for events read from files, the
/// byte offset each began at (`off` is absent otherwise); other implementations ignore it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Provenance {
    pub source: String,
    pub seqs: Vec<u64>,
    /// One per entry, or empty.
    pub offsets: Vec<u64>,
}

impl Provenance {
    /// What the relay's dedup compares: the byte offsets when the sender gave them, else
    /// the seqs. Offsets are where the events' bytes are, whatever made them one event
    /// (a multiline event closed by its timeout, a partial line flushed): an agent that
    /// reads the same bytes again after a crash may cut them into events differently,
    /// and so number them differently, but never places them at other offsets. Byte
    /// offsets are also what sluice agents before contiguous seqs sent as seqs, so the
    /// relay's marks of their sources stay right across the upgrade.
    pub fn dedup_marks(&self) -> &[u64] {
        if self.offsets.len() == self.seqs.len() && !self.offsets.is_empty() {
            &self.offsets
        } else {
            &self.seqs
        }
    }
}

/// The option map of an event frame. Keys this codec does not know are skipped.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Options {
    /// Number of entries, as the client declared it.
    pub size: Option<u64>,
    /// Chunk id; the server acknowledges it with `{"ack": chunk}`.
    pub chunk: Option<String>,
    /// `"gzip"` for CompressedPackedForward.
    pub compressed: Option<String>,
    pub provenance: Option<Provenance>,
}

// ---- encoding ---------------------------------------------------------------------------

pub(crate) fn write_options(
    out: &mut impl BufMut,
    size: usize,
    compressed: Option<&str>,
    chunk: Option<&str>,
    provenance: Option<&Provenance>,
) {
    let n = 1 + [compressed.is_some(), chunk.is_some(), provenance.is_some()]
        .iter()
        .filter(|present| **present)
        .count();
    write_map_len(out, n);
    write_str(out, "size");
    write_uint(out, size as u64);
    if let Some(compressed) = compressed {
        write_str(out, "compressed");
        write_str(out, compressed);
    }
    if let Some(chunk) = chunk {
        write_str(out, "chunk");
        write_str(out, chunk);
    }
    if let Some(p) = provenance {
        write_str(out, PROVENANCE_KEY);
        let with_offsets = !p.offsets.is_empty();
        write_map_len(out, 2 + usize::from(with_offsets));
        write_str(out, "src");
        write_str(out, &p.source);
        write_str(out, "seq");
        write_array_len(out, p.seqs.len());
        for &seq in &p.seqs {
            write_uint(out, seq);
        }
        if with_offsets {
            write_str(out, "off");
            write_array_len(out, p.offsets.len());
            for &offset in &p.offsets {
                write_uint(out, offset);
            }
        }
    }
}

// ---- decoding ---------------------------------------------------------------------------

/// Provenance as found in the option map, its `seq` array not decoded yet: the option
/// map may come before the entries are counted (PackedForward needs `compressed` first),
/// and a seq array is only worth allocating once it is known to have one element per
/// entry. Otherwise one byte of frame could cost eight of memory.
pub(crate) struct RawProvenance<'a> {
    source: String,
    seq: &'a [u8],
    off: Option<&'a [u8]>,
}

/// Decodes a uint array of exactly `count` elements (`what` names it in errors).
fn decode_uints(raw: &[u8], count: usize, what: &str) -> Result<Vec<u64>, DecodeError> {
    let mut r = Reader::new(raw);
    let len = match r.head()? {
        Head::Array(len) => len,
        other => {
            return Err(malformed(format!(
                "option {what} is a {}, not an array",
                other.kind()
            )))
        }
    };
    if len != count {
        return Err(malformed(format!(
            "option {what} has {len} elements for {count} entries"
        )));
    }
    let mut out = Vec::with_capacity(len);
    for _ in 0..len {
        out.push(read_uint(&mut r, what)?);
    }
    Ok(out)
}

impl RawProvenance<'_> {
    fn decode(&self, count: usize) -> Result<Provenance, DecodeError> {
        let seqs = decode_uints(self.seq, count, "sluice.seq")?;
        let offsets = match self.off {
            Some(off) => decode_uints(off, count, "sluice.off")?,
            None => Vec::new(),
        };
        Ok(Provenance {
            source: self.source.clone(),
            seqs,
            offsets,
        })
    }
}

pub(crate) fn read_options<'a>(
    r: &mut Reader<'a>,
) -> Result<(Options, Option<RawProvenance<'a>>), DecodeError> {
    let mut options = Options::default();
    let mut provenance = None;
    let Some(n) = read_map_len(r, "option")? else {
        return Ok((options, provenance));
    };
    for _ in 0..n {
        match read_key(r)? {
            Some(b"size") => options.size = Some(read_uint(r, "option size")?),
            Some(b"chunk") => options.chunk = Some(read_string(r, "option chunk")?),
            Some(b"compressed") => options.compressed = Some(read_string(r, "option compressed")?),
            Some(key) if key == PROVENANCE_KEY.as_bytes() => provenance = Some(read_provenance(r)?),
            _ => {
                r.value(MAX_DEPTH)?;
            }
        }
    }
    Ok((options, provenance))
}

fn read_provenance<'a>(r: &mut Reader<'a>) -> Result<RawProvenance<'a>, DecodeError> {
    let n = read_map_len(r, "option sluice")?.unwrap_or(0);
    let (mut source, mut seq, mut off) = (None, None, None);
    for _ in 0..n {
        match read_key(r)? {
            Some(b"src") => source = Some(read_string(r, "option sluice.src")?),
            Some(b"seq") => seq = Some(r.value(MAX_DEPTH)?),
            Some(b"off") => off = Some(r.value(MAX_DEPTH)?),
            _ => {
                r.value(MAX_DEPTH)?;
            }
        }
    }
    match (source, seq) {
        (Some(source), Some(seq)) => Ok(RawProvenance { source, seq, off }),
        _ => Err(malformed("option sluice needs both src and seq")),
    }
}

pub(crate) fn with_provenance(
    (mut options, provenance): (Options, Option<RawProvenance<'_>>),
    count: usize,
) -> Result<Options, DecodeError> {
    if let Some(p) = provenance {
        options.provenance = Some(p.decode(count)?);
    }
    Ok(options)
}
