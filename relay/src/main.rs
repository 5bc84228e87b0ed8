//! `sluice-relay`: receives Forward v1 over TLS, spools durably, fans out to Kafka and
//! object storage, and reconciles the counts. See the README and docs/relay.md.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::{Parser, Subcommand};
use sluice_relay::config::RelayConfig;
use sluice_relay::{reconcile, run};

#[derive(Parser)]
#[command(
    name = "sluice-relay",
    version,
    about = "Receives logs over Forward v1/TLS and delivers them to Kafka and object storage"
)]
struct Cli {
    /// Configuration file.
    #[arg(long, short, default_value = "/etc/sluice/relay.toml", global = true)]
    config: PathBuf,
    /// Load and check the configuration, print a summary, and exit.
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Compare the ledger with what is really in every sink, per tag and hour.
    ///
    /// Without --from/--to: this relay's ledger against what its sinks wrote. With them:
    /// a window of event-time hours, for the whole cluster, from Kafka and the bucket only.
    Reconcile {
        /// How long to read Kafka before giving up.
        #[arg(long, default_value = "120")]
        kafka_timeout_secs: u64,
        /// The first hour of the window (UTC), `YYYY-MM-DDTHH`.
        #[arg(long, requires = "to")]
        from: Option<String>,
        /// The hour after the window's last (UTC), `YYYY-MM-DDTHH`.
        #[arg(long, requires = "from")]
        to: Option<String>,
        /// Only this tag.
        #[arg(long, requires = "from")]
        tag: Option<String>,
        /// Read and count every object of the window instead of trusting the manifests.
        #[arg(long, requires = "from")]
        deep: bool,
        /// `table` or `json`.
        #[arg(long, default_value = "table", requires = "from")]
        format: String,
        /// Also write the result as Prometheus metrics to this file (replaced
        /// atomically), for node_exporter's textfile collector: per tag the events
        /// missing and duplicated, the hours pending, and when it ran.
        #[arg(long, requires = "from")]
        metrics_file: Option<std::path::PathBuf>,
    },
    /// Write into one destination the events of a window that the other holds and it
    /// does not (what `reconcile --from --to` reports missing there), provenance kept.
    Replay {
        /// The first hour of the window (UTC), `YYYY-MM-DDTHH`.
        #[arg(long)]
        from: String,
        /// The hour after the window's last (UTC), `YYYY-MM-DDTHH`.
        #[arg(long)]
        to: String,
        /// Only this tag.
        #[arg(long)]
        tag: Option<String>,
        /// Where to: `objects` (from Kafka) or `kafka` (from object storage).
        #[arg(long)]
        into: String,
        /// Replay only what reconcile reports missing (the only mode built: a replay
        /// never writes what the destination already holds).
        #[arg(long)]
        missing: bool,
        /// Also the rows the relays' ledgers cast doubt on (events a spool may still
        /// hold, fewer offered to the sink than received): for a backfill of hours from
        /// before the sink existed, or after a relay's data directory was lost. Never
        /// hours some relay has not announced.
        #[arg(long)]
        force: bool,
        /// Events per second, at most: read from Kafka (into objects) or produced (into
        /// Kafka), so a replay can run beside production.
        #[arg(long)]
        rate: Option<u64>,
        /// How long to read Kafka before giving up.
        #[arg(long, default_value = "120")]
        kafka_timeout_secs: u64,
    },
}

/// How long the exit waits for blocking calls still running after the relay stopped
/// cleanly (docs/relay.md: SIGTERM ends within `shutdown_timeout` + 5 s + this).
const RUNTIME_STRAGGLERS: Duration = Duration::from_secs(1);

/// `reconcile --from --to`: prints the report, exits 0 (all OK), 1 (differences), 2
/// (could not read), 3 (only hours still pending).
async fn reconcile_window(
    config: &sluice_relay::config::RelayConfig,
    window: Result<sluice_relay::reconcile_window::Window, String>,
    format: &str,
    metrics_file: Option<&std::path::Path>,
) -> std::process::ExitCode {
    use sluice_relay::reconcile_window as rw;
    let window = match window {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if format != "table" && format != "json" {
        eprintln!("error: --format {format:?}: write table or json");
        return std::process::ExitCode::from(2);
    }
    let result = rw::run(config, &window).await;
    if let Some(path) = metrics_file {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let text = rw::metrics_text(result.as_ref().ok(), &window, now);
        if let Err(e) = sluice_core::durable::write_atomic(path, text.as_bytes()) {
            eprintln!("error: cannot write --metrics-file {}: {e}", path.display());
            return std::process::ExitCode::from(2);
        }
    }
    match result {
        Ok(report) => {
            if format == "json" {
                match serde_json::to_string_pretty(&report) {
                    Ok(text) => println!("{text}"),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return std::process::ExitCode::from(2);
                    }
                }
            } else {
                print!("{}", rw::render(&report));
            }
            std::process::ExitCode::from(report.exit_code())
        }
        Err(e) => {
            eprintln!("error: reconciliation could not read its sources: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

/// `replay`: prints what it wrote as JSON; exits 0, or 2 when it could not.
async fn replay(
    config: &sluice_relay::config::RelayConfig,
    window: Result<sluice_relay::reconcile_window::Window, String>,
    into: &str,
    rate: Option<u64>,
    force: bool,
) -> std::process::ExitCode {
    if into != "objects" && into != "kafka" {
        eprintln!("error: --into {into:?}: write objects (from Kafka) or kafka (from objects)");
        return std::process::ExitCode::from(2);
    }
    let window = match window {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let done = if into == "kafka" {
        sluice_relay::replay::into_kafka(config, &window, rate, force).await
    } else {
        sluice_relay::replay::into_objects(config, &window, rate, force).await
    };
    match done {
        Ok(done) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&done).unwrap_or_default()
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: replay failed: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    sluice_core::logging::init();
    let config = match RelayConfig::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if cli.check_config {
        // Written at once, and a closed pipe (`--check-config | head`) is not an error.
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(out, "{}: ok", cli.config.display());
        let _ = writeln!(
            out,
            "  relay {} listening on {} ({})",
            config.relay.id,
            config.server.listen,
            if config.server.insecure {
                "plain TCP, insecure"
            } else {
                "TLS"
            }
        );
        let _ = writeln!(
            out,
            "  ack mode {:?}, spool {} (max {}, fsync {:?})",
            config.server.ack,
            config.spool_dir().display(),
            config.spool.max_size,
            config.spool.fsync
        );
        for s in &config.sinks {
            let kind = s.kind.spec().describe();
            let _ = writeln!(
                out,
                "  sink {:?}: {kind}{}{}",
                s.name,
                if s.enabled { "" } else { " (disabled)" },
                if s.required { "" } else { " (not required)" }
            );
        }
        let _ = writeln!(out, "  settings (defaults filled in, secrets redacted):");
        for line in config.settings() {
            let _ = writeln!(out, "    {line}");
        }
        let _ = std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes());
        return std::process::ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        None => runtime.block_on(run(config)),
        Some(Command::Reconcile {
            kafka_timeout_secs,
            from: Some(from),
            to: Some(to),
            tag,
            deep,
            format,
            metrics_file,
        }) => {
            let window = sluice_relay::reconcile_window::Window::parse(
                &from,
                &to,
                tag,
                deep,
                Duration::from_secs(kafka_timeout_secs),
            );
            let code = runtime.block_on(reconcile_window(
                &config,
                window,
                &format,
                metrics_file.as_deref(),
            ));
            runtime.shutdown_timeout(RUNTIME_STRAGGLERS);
            return code;
        }
        Some(Command::Replay {
            from,
            to,
            tag,
            into,
            missing: _,
            force,
            rate,
            kafka_timeout_secs,
        }) => {
            let window = sluice_relay::reconcile_window::Window::parse(
                &from,
                &to,
                tag,
                false,
                Duration::from_secs(kafka_timeout_secs),
            );
            let code = runtime.block_on(replay(&config, window, &into, rate, force));
            runtime.shutdown_timeout(RUNTIME_STRAGGLERS);
            return code;
        }
        Some(Command::Reconcile {
            kafka_timeout_secs, ..
        }) => runtime.block_on(async {
            let (text, ok) = reconcile::report(&config, Duration::from_secs(kafka_timeout_secs))
                .await
                .map_err(anyhow::Error::msg)?;
            print!("{text}");
            if !ok {
                bail!("reconciliation found differences");
            }
            Ok(())
        }),
    };
    // Everything is saved by now; a blocking call still running (a Kafka metadata fetch
    // a retry began during shutdown waits out its own timeout) must not hold the exit.
    runtime.shutdown_timeout(RUNTIME_STRAGGLERS);
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
