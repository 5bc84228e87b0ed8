//! `sluice-agent`: tails files, cuts them into chunks, forwards the chunks to a relay
//! over TLS, and advances its checkpoints only after the relay acknowledged them.

use std::path::PathBuf;

use clap::Parser;
use sluice_agent::config::AgentConfig;
use sluice_agent::run;

#[derive(Parser)]
#[command(
    name = "sluice-agent",
    version,
    about = "Tails log files and forwards them to sluice relays over TLS"
)]
struct Cli {
    /// Configuration file.
    #[arg(long, short, default_value = "/etc/sluice/agent.toml")]
    config: PathBuf,
    /// Load and check the configuration, print a summary, and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    sluice_core::logging::init();
    let config = match AgentConfig::load(&cli.config) {
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
            "  agent {} (checkpoints in {})",
            config.agent.id,
            config.agent.data_dir.display()
        );
        for input in &config.inputs {
            let spec = input.spec();
            let _ = writeln!(out, "  input {:?}: {}", spec.name(), spec.describe());
        }
        let _ = writeln!(
            out,
            "  output: relays {:?} ({}), chunks of {} or {}, {} in flight",
            config.output.relays,
            if config.output.insecure {
                "plain TCP, insecure"
            } else {
                "TLS"
            },
            config.output.chunk_size,
            config.output.chunk_age,
            config.output.in_flight
        );
        let _ = writeln!(out, "  settings (defaults filled in, secrets redacted):");
        for line in config.settings() {
            let _ = writeln!(out, "    {line}");
        }
        let _ = std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes());
        return std::process::ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
