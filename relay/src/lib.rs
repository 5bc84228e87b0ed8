//! The sluice relay as a library: the Forward server, dedup, the spool writer, the
//! sinks, the ledger and reconciliation. `src/main.rs` is the thin command line on top;
//! the end-to-end tests build their configs from [`config`]'s types.

pub mod budget;
pub mod clock;
pub mod config;
pub mod dedup;
pub mod envelope;
pub mod incarnation;
pub mod ledger;
pub mod metrics;
pub use sluice_core::ranges;
pub mod readback;
pub mod reconcile;
pub mod reconcile_window;
pub mod record;
pub mod refusals;
pub mod replay;
pub mod server;
pub mod sinks;
pub mod state_store;
pub mod tag_limit;
pub mod writer;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use sluice_core::shutdown::StopSignals;
use sluice_spool::{FsyncPolicy, Spool, SpoolConfig};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use config::{AckMode, FsyncMode, RelayConfig, StartFrom};
use ledger::Ledger;
use metrics::RelayMetrics;
use sinks::{SinkProgress, SinkRun};
use writer::{SpoolWriter, WriterMsg};

/// Runs the relay until SIGTERM or SIGINT, then drains and stops cleanly.
/// The periodic `ledger.json` export waits this many times as long as its last write
/// took (at least the 1 s tick): it takes at most 1/50 of one core, however large the
/// ledger. The ledger's truth is the writer's and sinks' append-only state; the file is
/// the report's copy.
const LEDGER_EXPORT_SHARE: u32 = 50;

pub async fn run(config: RelayConfig) -> anyhow::Result<()> {
    let mut signals = StopSignals::install().context("cannot install the SIGTERM handler")?;
    let data_dir = config.relay.data_dir.clone();
    std::fs::create_dir_all(data_dir.join("sinks"))
        .with_context(|| format!("cannot create data_dir {}", data_dir.display()))?;
    let metrics = Arc::new(RelayMetrics::new());
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);

    let fsync = match config.spool.fsync {
        FsyncMode::Always => FsyncPolicy::Always,
        FsyncMode::Interval => FsyncPolicy::Interval(config.spool.fsync_interval.get()),
        FsyncMode::Never => FsyncPolicy::Never,
    };
    let spool_dir = config.spool_dir();
    let (spool, recovery) = Spool::open(
        &spool_dir,
        SpoolConfig {
            segment_bytes: config.spool.segment_size.as_u64(),
            max_bytes: config.spool.max_size.as_u64(),
            fsync,
        },
    )
    .with_context(|| format!("cannot open the spool in {}", spool_dir.display()))?;
    if recovery.torn_bytes_truncated > 0
        || !recovery.corrupt_segments.is_empty()
        || !recovery.damaged.is_empty()
    {
        let lost: u64 = recovery.damaged.iter().map(|d| d.batches).sum();
        tracing::warn!(torn_bytes = recovery.torn_bytes_truncated, torn_batches_dropped = recovery.torn_batches_dropped,
            damaged_stretches = recovery.damaged.len(), damaged_batches = lost, corrupt = ?recovery.corrupt_segments,
            "spool recovered after an unclean stop or damage on disk (each damaged stretch is logged above; sinks that had not delivered it log it again when they pass over it)");
    }
    for damage in &recovery.damaged {
        metrics.spool_damage(damage);
    }
    metrics
        .spool_torn_bytes
        .inc_by(recovery.torn_bytes_truncated);
    metrics
        .spool_corrupt_segments
        .inc_by(recovery.corrupt_segments.len() as u64);
    let incarnation = incarnation::load_or_create(&spool_dir).map_err(anyhow::Error::msg)?;
    let clock = clock::Clock::from_env().map_err(anyhow::Error::msg)?;
    tracing::info!(
        incarnation = %incarnation,
        segments = recovery.segments,
        batches = recovery.batches,
        bytes = recovery.bytes,
        "spool opened"
    );

    // Agents' reports are kept only in the ledger's export: read them back (a report is
    // cumulative, and agents send theirs again, so one missed export loses nothing).
    let agents = match Ledger::load(&data_dir.join("ledger.json")) {
        Ok(old) => old.agents,
        Err(_) => Default::default(),
    };
    let ledger = Arc::new(Mutex::new(Ledger {
        relay: config.relay.id.clone(),
        agents,
        ..Default::default()
    }));
    let (mut writer, committed) = SpoolWriter::recover(spool, ledger.clone(), metrics.clone())?;
    writer.set_retention(writer::Retention {
        dedup: config.spool.dedup_retention.get(),
        ledger: config.relay.ledger_retention.get(),
        max_tags_per_client: config.server.max_tags_per_client,
    });

    // Sinks removed from the config give up their cursor, so the spool can be collected.
    let configured: std::collections::BTreeSet<&str> =
        config.sinks.iter().map(|s| s.name.as_str()).collect();
    for old in writer.spool().cursors().keys().cloned().collect::<Vec<_>>() {
        if !configured.contains(old.as_str()) {
            tracing::warn!(sink = %old, "sink no longer configured: its cursor is removed and its spooled data may be collected");
            writer.spool_mut().remove_cursor(&old)?;
            // Set its state aside too, so that adding a sink of that name later starts
            // where its `start_from` says, not at a cursor long since collected.
            sinks::state::set_aside(&data_dir, &old)
                .with_context(|| format!("cannot set aside the state of the removed sink {old}"))?;
        }
    }

    let sink_stop = CancellationToken::new();
    let sink_abort = CancellationToken::new();
    let ready = Arc::new(sluice_core::metrics::Readiness::default());
    let mut sink_tasks = Vec::new();
    let mut required = Vec::new();
    let ack_demand = (config.server.ack == AckMode::EndToEnd)
        .then(|| Arc::new(watch::channel(sluice_spool::Position::default()).0));
    for sink in &config.sinks {
        let state =
            sinks::SinkStateFile::open(&data_dir, &sink.name).map_err(anyhow::Error::msg)?;
        let spool = writer.spool();
        let start = state
            .state()
            .cursor
            .or_else(|| spool.cursors().get(&sink.name).copied())
            .unwrap_or(match sink.start_from {
                StartFrom::Oldest => spool.head(),
                StartFrom::Now => spool.tail(),
            });
        if start < spool.head() {
            tracing::warn!(sink = %sink.name, "the sink's cursor points before the oldest spooled data; starting at the oldest");
        }
        let start = start.max(spool.head());
        writer.spool_mut().set_cursor(&sink.name, start)?;
        if !sink.enabled {
            tracing::warn!(sink = %sink.name, "sink disabled: it delivers nothing and keeps its spooled data");
            // Its lag still shows, and grows, so a paused migration step is visible.
            let gauge = metrics
                .sink_lag_bytes
                .get_or_create(&metrics.sink(&sink.name))
                .clone();
            let (committed, stop) = (committed.clone(), sink_stop.clone());
            let segment_size = config.spool.segment_size.as_u64();
            tokio::spawn(async move {
                loop {
                    gauge.set(sinks::lag_bytes(start, *committed.borrow(), segment_size) as i64);
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            });
            continue;
        }
        let deliver = sink
            .kind
            .spec()
            .build(&sinks::SinkContext {
                name: &sink.name,
                relay: &config.relay.id,
                incarnation: &incarnation,
                data_dir: &data_dir,
                metrics: metrics.clone(),
                clock,
            })
            .map_err(anyhow::Error::msg)?;
        let mut deliver = deliver;
        deliver.restore(state.state().resume.clone());
        deliver
            .start()
            .await
            .map_err(|e| anyhow::anyhow!("sink {:?}: {e}", sink.name))?;
        let (delivered, delivered_rx) = watch::channel(start);
        let (persisted, persisted_rx) = watch::channel(start);
        writer.watch_cursor(sink.name.clone(), persisted_rx);
        if sink.required {
            required.push(delivered_rx);
        }
        let run = SinkRun {
            config: sink.common.clone(),
            deliver,
            reader: writer.spool().reader(start)?,
            state,
            committed: committed.clone(),
            segment_size: config.spool.segment_size.as_u64(),
            hold_limit: config.spool.max_size.as_u64() / 2,
            progress: SinkProgress {
                delivered,
                persisted,
            },
            ledger: ledger.clone(),
            metrics: metrics.clone(),
            ack_demand: ack_demand
                .as_ref()
                .filter(|_| sink.required)
                .map(|d| d.subscribe()),
            stop: sink_stop.clone(),
            abort: sink_abort.clone(),
            ready: ready.clone(),
        };
        tracing::info!(sink = %sink.name, cursor = ?start, "sink started");
        sink_tasks.push(tokio::spawn(sinks::run_sink(run)));
    }

    writer.report_readiness(ready.clone());
    let writer_stopping = writer.stopping();
    let (writer_tx, writer_rx) = mpsc::channel::<WriterMsg>(256);
    let writer_thread = std::thread::Builder::new()
        .name("spool-writer".into())
        .spawn(move || writer.run(writer_rx))
        .context("cannot start the spool writer")?;

    let background = CancellationToken::new();
    {
        let tx = writer_tx.clone();
        let ledger = ledger.clone();
        let path = data_dir.join("ledger.json");
        let stop = background.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            // The export is written only when a count changed since the last write, and
            // at most [`LEDGER_EXPORT_SHARE`] of the time: a ledger of many tags and hours
            // (bounded by retention and the tag limit) is written less often, not for
            // ever longer each second.
            let mut saved = None;
            let mut next_export = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let _ = tx.try_send(WriterMsg::Tick);
                if tokio::time::Instant::now() < next_export {
                    continue;
                }
                let began = tokio::time::Instant::now();
                let snapshot = {
                    let ledger = ledger.lock().unwrap_or_else(|e| e.into_inner());
                    if saved == Some(ledger.revision) {
                        continue;
                    }
                    ledger.clone()
                };
                let revision = snapshot.revision;
                match tokio::task::spawn_blocking({
                    let path = path.clone();
                    move || snapshot.save(&path)
                })
                .await
                .unwrap_or(Ok(()))
                {
                    Ok(()) => saved = Some(revision),
                    Err(e) => tracing::warn!(error = %e, "cannot write the ledger"),
                }
                next_export = began + began.elapsed() * LEDGER_EXPORT_SHARE;
            }
        });
    }

    // The ledger per hour, to the first enabled object sink's bucket (for reconcile).
    let publisher = match config
        .sinks
        .iter()
        .filter(|s| s.enabled)
        .find_map(|s| match &s.kind {
            sinks::SinkKind::ObjectStore(o) => Some(o),
            _ => None,
        }) {
        Some(sink) => {
            let (store, prefix) = sink.open().map_err(anyhow::Error::msg)?;
            Some(sinks::object::published::Publisher::new(
                store,
                prefix,
                &incarnation.to_string(),
            ))
        }
        None => None,
    };
    let publishing = publisher.map(|mut p| {
        let ledger = ledger.clone();
        let stop = background.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(sinks::object::published::PUBLISH_EVERY);
            let mut failing = false;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                // A store that hangs must not hold up shutdown.
                let published = tokio::select! {
                    _ = stop.cancelled() => break,
                    r = p.publish(&ledger) => r,
                };
                match published {
                    Ok(_) if failing => {
                        failing = false;
                        tracing::info!("the ledger is published to object storage again");
                    }
                    Ok(_) => {}
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(error = %e, "cannot publish the ledger to object storage; reconcile sees older figures until it can");
                    }
                    Err(_) => {}
                }
            }
            // The last figures, if the store answers in time.
            let _ = tokio::time::timeout(Duration::from_secs(5), p.publish(&ledger)).await;
        })
    });

    sluice_core::metrics::serve_if_configured(
        config.metrics.listen,
        registry,
        ready.clone(),
        background.clone(),
    )
    .await?;

    let tls = match &config.server.tls {
        Some(files) => Some(sluice_core::tls::ReloadingServerConfig::new(files.clone())?),
        None => {
            tracing::warn!("server.insecure = true: accepting plain TCP without TLS");
            None
        }
    };
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.server.listen))?;
    tracing::info!(addr = %listener.local_addr()?, relay = %config.relay.id, "forward server listening");
    let state = Arc::new(server::ServerState {
        config: config.server.clone(),
        tls,
        writer: writer_tx.clone(),
        required_sinks: required,
        ack_demand,
        metrics: metrics.clone(),
        budget: budget::Budget::new(config.server.max_inflight_bytes.as_usize()),
        pool: budget::DecodePool::new(config.server.decode_threads()),
        ledger: ledger.clone(),
    });
    let accept_stop = CancellationToken::new();
    let conns_stop = CancellationToken::new();
    let server_task = tokio::spawn(server::serve(
        listener,
        state.clone(),
        accept_stop.clone(),
        conns_stop.clone(),
    ));
    ready.set(true);

    signals.wait().await;
    tracing::info!("shutting down: no new connections, finishing in-flight chunks");
    ready.set(false);
    accept_stop.cancel();
    let _ = server_task.await;
    conns_stop.cancel();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while metrics.connections_active.get() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A writer parked on a full spool reads no messages: the flag reaches it anyway.
    writer_stopping.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = writer_tx.send(WriterMsg::Shutdown).await;
    drop(state);
    drop(writer_tx);
    let _ = tokio::task::spawn_blocking(move || writer_thread.join()).await;

    tracing::info!(timeout = ?config.relay.shutdown_timeout.get(), "flushing sinks");
    sink_stop.cancel();
    let flush = futures::future::join_all(sink_tasks);
    tokio::pin!(flush);
    if tokio::time::timeout(config.relay.shutdown_timeout.get(), &mut flush)
        .await
        .is_err()
    {
        tracing::warn!("sinks did not flush within shutdown_timeout; undelivered data stays in the spool for the next start");
        sink_abort.cancel();
        flush.await;
    }
    background.cancel();
    let snapshot = ledger.lock().unwrap_or_else(|e| e.into_inner()).clone();
    snapshot
        .save(&data_dir.join("ledger.json"))
        .context("cannot write the ledger")?;
    // The last figures into the bucket (5 s at most), after the file is safe.
    if let Some(task) = publishing {
        let _ = task.await;
    }
    tracing::info!("stopped cleanly");
    Ok(())
}
