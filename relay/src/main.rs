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
    Reconcile {
        /// How long to read Kafka before giving up.
        #[arg(long, default_value = "120")]
        kafka_timeout_secs: u64,
    },
}

/// How long the exit waits for blocking calls still running after the relay stopped
/// cleanly (docs/relay.md: SIGTERM ends within `shutdown_timeout` + 5 s + this).
const RUNTIME_STRAGGLERS: Duration = Duration::from_secs(1);

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
        Some(Command::Reconcile { kafka_timeout_secs }) => runtime.block_on(async {
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
