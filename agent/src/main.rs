//! `sluice-agent`: tails files, cuts them into chunks, forwards the chunks to a relay
//! over TLS, and advances its checkpoints only after the relay acknowledged them.

use std::path::PathBuf;

use clap::Parser;
use sluice_agent::config::{AgentConfig, InputConfig};
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
        println!("{}: ok", cli.config.display());
        println!(
            "  agent {} (checkpoints in {})",
            config.agent.id,
            config.agent.data_dir.display()
        );
        for InputConfig::Tail(t) in &config.inputs {
            // check() built the parser already: this cannot fail here.
            let time = match t.build_parser().ok().as_ref().and_then(|p| p.time_field()) {
                Some(f) => format!(
                    "field {:?} as {:?}, zone {:?}",
                    f.key(),
                    f.format(),
                    f.zone()
                ),
                None => "when read".to_string(),
            };
            println!(
                "  input {:?}: tail {:?} as tag {:?}, start at {:?}, parser {:?}, event time {time}",
                t.name, t.include, t.tag, t.start_at, t.parser
            );
        }
        println!(
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

