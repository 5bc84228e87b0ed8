//! Every example config in `configs/` loads, and `--check-config` explains mistakes in
//! plain words (naming the file and the key).

use std::path::{Path, PathBuf};
use std::process::Command;

use sluice_e2e::{bin, files_under, run_check_config};

fn repo() -> PathBuf {
    sluice_core::configdoc::manifest_dir(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn check(binary: &str, config: &Path) -> (bool, String) {
    run_check_config(binary, config, &[])
}

#[test]
fn every_example_config_loads() {
    let all = files_under(&repo().join("configs"), &|p| {
        p.extension().is_some_and(|e| e == "toml")
    });
    assert!(all.len() >= 4, "expected example configs, found {all:?}");
    for path in all {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let binary = if name.contains("agent") {
            "sluice-agent"
        } else if name.contains("relay") {
            "sluice-relay"
        } else {
            panic!(
                "{}: name it *agent*.toml or *relay*.toml so the test knows which binary reads it",
                path.display()
            )
        };
        let (ok, text) = check(binary, &path);
        assert!(ok, "{} does not load:\n{text}", path.display());
        assert!(text.contains(": ok"), "{text}");
    }
}

fn broken(binary: &str, text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.toml");
    std::fs::write(&path, text).unwrap();
    let (ok, out) = check(binary, &path);
    assert!(!ok, "a broken config was accepted:\n{text}");
    assert!(
        out.contains("broken.toml"),
        "the error does not name the file: {out}"
    );
    out
}

#[test]
fn check_config_explains_mistakes() {
    let relay_base = std::fs::read_to_string(repo().join("configs/relay.toml")).unwrap();

    let out = broken(
        "sluice-relay",
        &relay_base.replace("max_connections = 4096", "max_conections = 4096"),
    );
    assert!(
        out.contains("max_conections"),
        "unknown key not named: {out}"
    );

    let out = broken(
        "sluice-relay",
        &relay_base.replace("tls = { cert", "# tls = { cert"),
    );
    assert!(out.contains("server.tls is missing"), "{out}");

    let out = broken(
        "sluice-relay",
        &relay_base.replace("max_size = \"20 GiB\"", "max_size = \"20 parsecs\""),
    );
    assert!(out.contains("unknown size unit"), "{out}");

    let out = broken(
        "sluice-relay",
        &relay_base.replace("topic = \"logs\"", "topic = \"logs\"\ncompresion = \"lz4\""),
    );
    assert!(
        out.contains("compresion") && out.contains("kafka"),
        "sink typo not named: {out}"
    );

    let out = broken(
        "sluice-relay",
        &relay_base.replace("type = \"kafka\"", "type = \"kafak\""),
    );
    assert!(out.contains("kafak"), "{out}");

    let out = broken(
        "sluice-relay",
        &relay_base.replace("default_topic = \"logs\"\n", ""),
    );
    assert!(
        out.contains("has placeholders: set default_topic"),
        "a topic template needs a default topic: {out}"
    );

    let out = broken(
        "sluice-relay",
        &relay_base.replace("topic = \"logs.{record.service}\"", "topic = \"logs\""),
    );
    assert!(
        out.contains("default_topic applies to a topic template"),
        "a default topic beside a fixed one is refused: {out}"
    );

    let out = broken(
        "sluice-relay",
        &relay_base.replace("{record.service}", "{record.sevrice.}"),
    );
    assert!(
        out.contains("unknown placeholder {record.sevrice.}"),
        "a bad placeholder is named: {out}"
    );

    let agent_base = std::fs::read_to_string(repo().join("configs/agent.toml")).unwrap();
    let out = broken(
        "sluice-agent",
        &agent_base.replace("include = [\"/var/log/app/*.log\"]", "include = []"),
    );
    assert!(out.contains("include is empty"), "{out}");

    let out = broken(
        "sluice-agent",
        &agent_base.replace("relay-1.internal:24224", "relay-1.internal"),
    );
    assert!(out.contains("host:port"), "{out}");

    let out = broken(
        "sluice-agent",
        &agent_base.replace("chunk_age = \"1s\"", "chunk_age = \"soon\""),
    );
    assert!(out.contains("not a duration"), "{out}");

    let parsers_base = std::fs::read_to_string(repo().join("configs/agent-parsers.toml")).unwrap();
    let out = broken(
        "sluice-agent",
        &parsers_base.replace("time_format = \"auto\"", "time_format = \"iso8601\""),
    );
    assert!(
        out.contains("\"api\"") && out.contains("iso8601") && out.contains("rfc3339, epoch"),
        "{out}"
    );
    let out = broken(
        "sluice-agent",
        &parsers_base.replace("time_key = \"ts\"", "# no time_key"),
    );
    assert!(
        out.contains("time_format is set but time_key is not"),
        "{out}"
    );
    let out = broken(
        "sluice-agent",
        &parsers_base.replace("time_zone = \"local\"", "time_zone = \"CEST\""),
    );
    assert!(
        out.contains("\"syslog\"") && out.contains("CEST") && out.contains("+02:00"),
        "{out}"
    );
}

/// `--check-config | head -1`: the reader closes the pipe after the first line; the
/// check still exits 0 and does not panic on the broken pipe.
#[test]
fn check_config_into_a_closed_pipe_is_not_an_error() {
    for (binary, config) in [
        ("sluice-relay", "configs/relay.toml"),
        ("sluice-agent", "configs/agent.toml"),
    ] {
        let mut child = Command::new(bin(binary))
            .arg("--config")
            .arg(repo().join(config))
            .arg("--check-config")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Close the read end at once, as `head` does once it has its line.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{binary}: {stderr}");
        assert!(out.status.success(), "{binary}: {} {stderr}", out.status);
    }
}
