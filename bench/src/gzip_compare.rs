//! Which gzip to use: the agent's chunks as the agent builds them (1 MiB of Forward
//! entries: `[time, {"message": line}]`, or the nginx parser's records), compressed by
//! each candidate, then inflated again. Prints one row per codec and level: input MB/s,
//! CPU-seconds per GB of chunk bytes, ratio, and inflate MB/s of what it produced (with
//! zlib-rs, as the relay inflated before, and with libdeflate). The last row is
//! `sluice_forward::Gzip`, what the agent sends (ISA-L igzip level 1).
//!
//! ```text
//! cargo run --release -p sluice-bench --bin sluice-gzip-compare -- FILE [MB] [none|nginx]
//! ```
//!
//! FILE: lines, e.g. bench/tail.sh's `target/bench-tail/lines-100-1024.log`. Each codec
//! runs over the same chunks 3 times; the best time counts (this machine is shared).

use std::time::Instant;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use isal_sys::igzip_lib as isal;
use libdeflater::{CompressionLvl, Compressor, Decompressor};
use sluice_forward::{write_entry_header, EventTime};
use sluice_parsers::{Parser, ParserKind};

const CHUNK: usize = 1 << 20;

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .expect("usage: sluice-gzip-compare FILE [MB] [none|nginx]");
    let mb: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(256);
    let mode = args.next().unwrap_or_else(|| "none".into());
    let data = std::fs::read(&path).expect("read the lines file");
    let data = &data[..data.len().min(mb << 20)];
    let parser = match mode.as_str() {
        "none" => Parser::new(ParserKind::None, None),
        "nginx" => Parser::new(ParserKind::Nginx, None),
        other => panic!("unknown mode {other:?}"),
    }
    .expect("parser");
    let time = EventTime {
        secs: 1_795_000_000,
        nanos: 0,
    };
    let (mut chunks, mut current) = (Vec::new(), Vec::with_capacity(CHUNK + 4096));
    let mut lines = 0usize;
    for line in data.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        write_entry_header(&mut current, time);
        parser.write_record(line, &mut current);
        lines += 1;
        if current.len() >= CHUNK {
            chunks.push(std::mem::replace(
                &mut current,
                Vec::with_capacity(CHUNK + 4096),
            ));
        }
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    let input: usize = chunks.iter().map(Vec::len).sum();
    println!(
        "{} MiB of lines, {lines} lines, mode {mode}: {} chunks, {:.1} chunk bytes per line ({:.1} line bytes)",
        data.len() >> 20,
        chunks.len(),
        input as f64 / lines as f64,
        data.len() as f64 / lines as f64,
    );
    println!("| codec | level | compress MB/s | CPU-s per GB | ratio | inflate MB/s (zlib-rs) | inflate MB/s (libdeflate) | inflate MB/s (ISA-L) |");
    println!("|---|---|---|---|---|---|---|---|");
    for level in [1u32, 2, 3, 6] {
        let mut z = Compress::new(Compression::new(level), false);
        let mut out = Vec::new();
        let row = measure(&chunks, |chunk, gz| {
            z.reset();
            out.clear();
            out.reserve(chunk.len() + 1024);
            z.compress_vec(chunk, &mut out, FlushCompress::Finish)
                .expect("deflate");
            // Raw deflate; wrap it as gzip so both inflaters read the same thing.
            gz.clear();
            gz.extend_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff]);
            gz.extend_from_slice(&out);
            let mut crc = flate2::Crc::new();
            crc.update(chunk);
            gz.extend_from_slice(&crc.sum().to_le_bytes());
            gz.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
        });
        print_row("zlib-rs (flate2)", level, input, row);
    }
    for level in [1i32, 2, 3, 4, 6] {
        let mut c = Compressor::new(CompressionLvl::new(level).expect("level"));
        let row = measure(&chunks, |chunk, gz| {
            gz.resize(c.gzip_compress_bound(chunk.len()), 0);
            let n = c.gzip_compress(chunk, gz).expect("libdeflate");
            gz.truncate(n);
        });
        print_row("libdeflate", level as u32, input, row);
    }
    // What the agent sends: sluice_forward::Gzip (ISA-L igzip level 1).
    let mut igzip = sluice_forward::Gzip::default();
    let row = measure(&chunks, |chunk, gz| {
        gz.clear();
        gz.extend_from_slice(igzip.compress(chunk));
    });
    print_row("ISA-L igzip (the agent's Gzip)", 1, input, row);
}

struct Row {
    compress_s: f64,
    compressed: usize,
    inflate_zlib_s: f64,
    inflate_libdeflate_s: f64,
    inflate_isal_s: f64,
}

/// Best of 3 for compressing every chunk with `compress` (which writes a gzip member into
/// its second argument), then best of 3 for inflating the members with each inflater,
/// checked against the input.
fn measure(chunks: &[Vec<u8>], mut compress: impl FnMut(&[u8], &mut Vec<u8>)) -> Row {
    let mut members: Vec<Vec<u8>> = vec![Vec::new(); chunks.len()];
    let mut compress_s = f64::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        for (chunk, gz) in chunks.iter().zip(members.iter_mut()) {
            compress(chunk, gz);
        }
        compress_s = compress_s.min(start.elapsed().as_secs_f64());
    }
    let compressed = members.iter().map(Vec::len).sum();
    let mut out = vec![0u8; CHUNK * 2];
    let mut inflate_zlib_s = f64::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        for (chunk, gz) in chunks.iter().zip(&members) {
            let mut d = Decompress::new(false);
            d.decompress(&gz[10..gz.len() - 8], &mut out, FlushDecompress::Finish)
                .expect("inflate");
            assert_eq!(&out[..d.total_out() as usize], &chunk[..]);
        }
        inflate_zlib_s = inflate_zlib_s.min(start.elapsed().as_secs_f64());
    }
    let mut d = Decompressor::new();
    let mut inflate_libdeflate_s = f64::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        for (chunk, gz) in chunks.iter().zip(&members) {
            let n = d.gzip_decompress(gz, &mut out).expect("libdeflate inflate");
            assert_eq!(&out[..n], &chunk[..]);
        }
        inflate_libdeflate_s = inflate_libdeflate_s.min(start.elapsed().as_secs_f64());
    }
    let mut state: Box<isal::inflate_state> = Box::new(unsafe { std::mem::zeroed() });
    let mut inflate_isal_s = f64::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        for (chunk, gz) in chunks.iter().zip(&members) {
            // SAFETY: a zeroed, initialised state; the buffers outlive the call.
            let n = unsafe {
                isal::isal_inflate_init(&mut *state);
                state.crc_flag = isal::ISAL_GZIP;
                state.next_in = gz.as_ptr() as *mut u8;
                state.avail_in = gz.len() as u32;
                state.next_out = out.as_mut_ptr();
                state.avail_out = out.len() as u32;
                let rc = isal::isal_inflate_stateless(&mut *state);
                assert_eq!(rc, isal::ISAL_DECOMP_OK as i32, "ISA-L inflate");
                state.total_out as usize
            };
            assert_eq!(&out[..n], &chunk[..]);
        }
        inflate_isal_s = inflate_isal_s.min(start.elapsed().as_secs_f64());
    }
    Row {
        compress_s,
        compressed,
        inflate_zlib_s,
        inflate_libdeflate_s,
        inflate_isal_s,
    }
}

fn print_row(codec: &str, level: u32, input: usize, r: Row) {
    let mb = input as f64 / 1e6;
    println!(
        "| {codec} | {level} | {:.0} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} |",
        mb / r.compress_s,
        r.compress_s / (input as f64 / 1e9),
        input as f64 / r.compressed as f64,
        mb / r.inflate_zlib_s,
        mb / r.inflate_libdeflate_s,
        mb / r.inflate_isal_s,
    );
}
