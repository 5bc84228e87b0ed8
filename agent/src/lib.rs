//! The sluice agent as a library: inputs, the reading pipeline, checkpoints and the
//! Forward output. `src/main.rs` is the thin command line on top; the end-to-end tests
//! build their configs from [`config`]'s types.

pub mod config;
pub mod inputs;
pub mod metrics;
pub mod output;
pub mod pipeline;
pub mod report;
pub mod source;
pub mod transform;

use std::sync::Arc;

use anyhow::Context;
use sluice_core::shutdown::StopSignals;
use sluice_tail::CheckpointStore;
use tokio_util::sync::CancellationToken;

use config::AgentConfig;
use metrics::AgentMetrics;
use pipeline::Pipeline;

/// Sealed chunks queued between the reading thread and the output.
const SEALED_QUEUE: usize = 2;

/// Runs the agent until SIGTERM or SIGINT, then waits for in-flight acknowledgements.
pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let mut signals = StopSignals::install().context("cannot install the SIGTERM handler")?;
    std::fs::create_dir_all(&config.agent.data_dir)
        .with_context(|| format!("cannot create data_dir {}", config.agent.data_dir.display()))?;
    let metrics = Arc::new(AgentMetrics::default());
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);

    let checkpoint_path = config.agent.data_dir.join("checkpoints.json");
    let (mut store, saved) = CheckpointStore::open(&checkpoint_path)?;
    let report = report::Report::restore(store.take_opened_sent());
    let inputs = config
        .inputs
        .iter()
        .map(|i| i.spec().build(&saved, &metrics))
        .collect::<anyhow::Result<Vec<_>>>()?;

    let tls = if config.output.insecure {
        tracing::warn!("output.insecure = true: sending plain TCP without TLS");
        None
    } else {
        Some(sluice_core::tls::client_config(&config.output.tls)?)
    };

    let background = CancellationToken::new();
    let ready = Arc::new(sluice_core::metrics::Readiness::default());
    sluice_core::metrics::serve_if_configured(
        config.metrics.listen,
        registry,
        ready.clone(),
        background.clone(),
    )
    .await?;

    // Sealed chunks waiting for the output, beyond the `in_flight` ones it holds: two are
    // enough to keep the reading thread compressing while a lane sends, and against a
    // slow relay every queued chunk is memory (bench/RESULTS.md, issue 16: a queue of
    // `in_flight` = 8 was 2-3 MiB of the agent's peak).
    let (chunk_tx, chunk_rx) = tokio::sync::mpsc::channel(SEALED_QUEUE);
    let (commit_tx, commit_rx) = std::sync::mpsc::channel();
    let stop_reading = CancellationToken::new();
    let pipeline = Pipeline {
        agent_id: config.agent.id.clone(),
        inputs,
        store,
        chunk_size: config.output.chunk_size.as_usize(),
        chunk_age: config.output.chunk_age.get(),
        metrics: metrics.clone(),
        frames: Default::default(),
        report,
        report_interval: Some(config.output.report_interval.get()).filter(|d| !d.is_zero()),
    };
    let reader = {
        let stop = stop_reading.clone();
        std::thread::Builder::new()
            .name("tail".into())
            .spawn(move || pipeline.run(chunk_tx, commit_rx, stop))
            .context("cannot start the reading thread")?
    };
    let abort_output = CancellationToken::new();
    let output = output::Output {
        config: config.output.clone(),
        agent_id: config.agent.id.clone(),
        tls,
        metrics: metrics.clone(),
        assignments: Some(config.agent.data_dir.join(output::ASSIGNMENTS_FILE)),
    };
    let mut output_task = tokio::spawn(output.run(chunk_rx, commit_tx, abort_output.clone()));
    ready.set(true);
    tracing::info!(agent = %config.agent.id, relays = ?config.output.relays, "agent started");

    tokio::select! {
        _ = signals.wait() => {}
        _ = &mut output_task => {
            anyhow::bail!("the output stopped unexpectedly");
        }
    }
    tracing::info!(timeout = ?config.agent.shutdown_timeout.get(), "shutting down: sending what was read, waiting for acknowledgements");
    ready.set(false);
    stop_reading.cancel();
    if tokio::time::timeout(config.agent.shutdown_timeout.get(), &mut output_task)
        .await
        .is_err()
    {
        abort_output.cancel();
        let _ = output_task.await;
    }
    let _ = tokio::task::spawn_blocking(move || reader.join()).await;
    background.cancel();
    tracing::info!("stopped; checkpoints saved");
    Ok(())
}
