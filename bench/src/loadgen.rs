//! `sluice-loadgen`: sends pre-encoded Forward chunks to a relay as fast as the relay
//! acknowledges them, and reports events/s and the relay's CPU time.
//!
//! Frames (gzip CompressedPackedForward, realistic 100-byte access-log lines with
//! varied fields) are built before the clock starts, so the measurement is the relay's
//! ingest, not the generator's encoding. Each frame carries sluice provenance with a
//! fresh source per connection, so dedup sees new data and keeps it all.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use bytes::{Bytes, BytesMut};
use clap::Parser;
use futures::StreamExt;
use sluice_forward::{
    encode_compressed_packed_forward, write_entry, ClientCodec, EventTime, Gzip, Limits,
    Provenance, ServerFrame,
};
use tokio::io::AsyncWriteExt;
use tokio_util::codec::FramedRead;

#[path = "lines.rs"]
mod lines;
use lines::line;

#[derive(Parser, Clone)]
struct Args {
    /// Relay address host:port.
    #[arg(long)]
    relay: String,
    /// CA file; without it, plain TCP.
    #[arg(long)]
    ca: Option<std::path::PathBuf>,
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Events in total.
    #[arg(long, default_value_t = 10_000_000)]
    events: u64,
    /// Events per chunk.
    #[arg(long, default_value_t = 10_000)]
    chunk_events: usize,
    /// Bytes per event line.
    #[arg(long, default_value_t = 100)]
    line_bytes: usize,
    /// Connections in parallel.
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// Unacknowledged chunks per connection.
    #[arg(long, default_value_t = 16)]
    in_flight: usize,
    /// Distinct sources, all connections together: chunk `c` of a connection belongs to
    /// its source `c % (sources / connections)`. 0: one source per connection. With
    /// `--chunk-events 1 --events N --sources N`, the relay learns N sources (a dedup
    /// table of that size, for `bench/dedup-sources.sh`).
    #[arg(long, default_value_t = 0)]
    sources: usize,
    /// Number each source's events 0, 1, 2, ... as a sluice agent does (with byte offsets
    /// beside them), instead of by byte offset; needs `--sources 0` (one source per
    /// connection). For `bench/reconcile.sh`.
    #[arg(long)]
    contiguous: bool,
    /// PID of the relay, to report its CPU seconds.
    #[arg(long)]
    relay_pid: Option<u32>,
}

fn build_frames(args: &Args, conn: usize, count: usize) -> Vec<(String, Bytes)> {
    let mut rnd = rand::rng();
    let mut frames = Vec::with_capacity(count);
    let mut offset = 0u64;
    let mut gzip = Gzip::default();
    for c in 0..count {
        let mut entries = Vec::with_capacity(args.chunk_events * (args.line_bytes + 24));
        let mut seqs = Vec::with_capacity(args.chunk_events);
        let mut offsets = Vec::new();
        let now = EventTime::now();
        for i in 0..args.chunk_events {
            let l = line(
                (c * args.chunk_events + i) as u64,
                args.line_bytes,
                &mut rnd,
            );
            write_entry(&mut entries, now, &[("message", &l)]);
            if args.contiguous {
                seqs.push((c * args.chunk_events + i) as u64);
                offsets.push(offset);
            } else {
                seqs.push(offset);
            }
            offset += l.len() as u64 + 1;
        }
        // As an agent compresses its chunks.
        let gz = gzip.compress(&entries).to_vec();
        let id = format!("c{conn}-{c}");
        let per_conn = args.sources.div_ceil(args.connections);
        let source = if per_conn == 0 {
            format!("loadgen:{}:{conn}", std::process::id())
        } else {
            // The seqs of one connection ascend, so those of each of its sources do too.
            format!("loadgen:{}:{conn}:{}", std::process::id(), c % per_conn)
        };
        let prov = Provenance {
            source,
            seqs,
            offsets,
        };
        let mut out = BytesMut::new();
        encode_compressed_packed_forward(
            "bench.access",
            &gz,
            args.chunk_events,
            &id,
            Some(&prov),
            &mut out,
        );
        frames.push((id, out.freeze()));
    }
    frames
}

fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let tck = unsafe_sysconf_clk_tck();
    Some((utime + stime) / tck)
}

fn unsafe_sysconf_clk_tck() -> f64 {
    // _SC_CLK_TCK is 100 on every Linux we run on; read it from getconf to be sure.
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

async fn run_connection(args: Arc<Args>, frames: Vec<(String, Bytes)>) -> anyhow::Result<u64> {
    let tcp = tokio::net::TcpStream::connect(&args.relay)
        .await
        .context("connect")?;
    tcp.set_nodelay(true)?;
    match &args.ca {
        Some(ca) => {
            let config = sluice_core::tls::client_config(&sluice_core::tls::ClientTlsFiles {
                ca: Some(ca.clone()),
                ..Default::default()
            })?;
            let name = rustls::pki_types::ServerName::try_from(args.server_name.clone())?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .context("TLS")?;
            pump(tls, &args, frames).await
        }
        None => pump(tcp, &args, frames).await,
    }
}

async fn pump<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: S,
    args: &Args,
    frames: Vec<(String, Bytes)>,
) -> anyhow::Result<u64> {
    let (read, mut write) = tokio::io::split(stream);
    let mut acks = FramedRead::new(read, ClientCodec::new(Limits::default()));
    let mut next = 0;
    let mut acked = 0;
    let total = frames.len();
    while acked < total {
        while next < total && next - acked < args.in_flight {
            write.write_all(&frames[next].1).await?;
            next += 1;
        }
        match acks.next().await {
            Some(Ok(ServerFrame::Ack(id))) => {
                if id != frames[acked].0 {
                    bail!("ack {id} out of order (expected {})", frames[acked].0);
                }
                acked += 1;
            }
            Some(Ok(_)) => bail!("unexpected frame"),
            Some(Err(e)) => bail!("bad ack: {e}"),
            None => bail!("relay closed the connection after {acked} acks"),
        }
    }
    Ok((acked * args.chunk_events) as u64)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    if args.contiguous && args.sources != 0 {
        bail!("--contiguous numbers one source per connection: leave --sources at 0");
    }
    let chunks_total = (args.events as usize).div_ceil(args.chunk_events);
    let per_conn = chunks_total.div_ceil(args.connections);
    eprintln!(
        "building {chunks_total} chunks of {} events ...",
        args.chunk_events
    );
    let mut sets = Vec::new();
    for c in 0..args.connections {
        sets.push(build_frames(&args, c, per_conn));
    }
    let wire: usize = sets.iter().flatten().map(|(_, f)| f.len()).sum();
    let cpu_before = args.relay_pid.and_then(cpu_seconds);
    let started = Instant::now();
    let tasks: Vec<_> = sets
        .into_iter()
        .map(|f| tokio::spawn(run_connection(args.clone(), f)))
        .collect();
    let mut events = 0;
    for t in tasks {
        events += t.await??;
    }
    let elapsed = started.elapsed();
    let cpu = match (cpu_before, args.relay_pid.and_then(cpu_seconds)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let result = serde_json::json!({
        "events": events,
        "seconds": elapsed.as_secs_f64(),
        "events_per_second": events as f64 / elapsed.as_secs_f64(),
        "wire_mb_per_second": wire as f64 / 1e6 / elapsed.as_secs_f64(),
        "line_mb_per_second": (events * args.line_bytes as u64) as f64 / 1e6 / elapsed.as_secs_f64(),
        "relay_cpu_seconds": cpu,
        "relay_cpu_seconds_per_10m_events": cpu.map(|c| c * 1e7 / events as f64),
    });
    println!("{result}");
    Ok(())
}
