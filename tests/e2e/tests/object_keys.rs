//! Object keys never overwrite archived data (issue 12): a relay restarted with the same
//! `relay.id` and an empty data directory writes new keys, and tags that differ only in
//! characters a key cannot hold (`a/b`, `a_b`) stay in their own folders. The bucket is
//! read with boto3 (ETags before and after, then every line).

use std::time::Duration;

use sluice_e2e::*;

const N: u64 = 2_000;
/// One event hour for both lives, so the keys of the second would meet the first's if
/// nothing told the spools apart.
const TIME: &str = "2026-11-23T05:00:00Z";
const TAGS: [&str; 2] = ["keys/a/b", "keys/a_b"];

fn send(svc: &Services, relay: &Relay, tag: &str, first: u64) {
    svc.fluent_send(relay.forward.port(), tag, first, N, TIME, 0.0);
}

#[test]
fn a_relay_restarted_with_an_empty_data_dir_overwrites_nothing() {
    let svc = Services::from_env();
    let tmp = tempfile::tempdir().unwrap();
    let bucket = unique_name("keys");
    svc.create_bucket(&bucket);
    let mut spec = RelaySpec::insecure(tmp.path(), "relay-keys");
    spec.config.sinks.push(svc.s3_sink(&bucket));
    let mut relay = spec.start();

    for tag in TAGS {
        send(&svc, &relay, tag, 1);
    }
    relay.wait_delivered("s3", 2 * N, Duration::from_secs(120));
    relay.stop(Duration::from_secs(60));
    // Data objects only: the relay's lease object is rewritten by design.
    let data = |mut etags: std::collections::BTreeMap<String, String>| {
        etags.retain(|k, _| k.ends_with(".ndjson.gz"));
        etags
    };
    let before = data(svc.s3_etags(&bucket));
    assert!(!before.is_empty());

    // The data directory is lost (docs/cluster.md: a drained spool may be deleted).
    std::fs::remove_dir_all(relay.data_dir()).unwrap();
    relay.start();
    for tag in TAGS {
        send(&svc, &relay, tag, N + 1);
    }
    relay.wait_delivered("s3", 2 * N, Duration::from_secs(120));
    relay.stop(Duration::from_secs(60));
    let after = data(svc.s3_etags(&bucket));

    let replaced: Vec<_> = before
        .iter()
        .filter(|(key, etag)| after.get(*key) != Some(*etag))
        .map(|(key, _)| key)
        .collect();
    assert!(
        replaced.is_empty(),
        "objects of the first life replaced or removed by the second: {replaced:?}"
    );
    assert!(
        after.len() > before.len(),
        "the second life wrote no new object"
    );

    let s3 = svc.s3_summary(&bucket);
    assert_eq!(s3["messages"], 4 * N, "{s3}");
    assert_eq!(s3["distinct_messages"], 4 * N, "{s3}");
    assert_eq!(s3["duplicates"], 0, "{s3}");
    assert_eq!(s3["bad"], 0, "{s3}");
    assert_eq!(s3["misplaced"], 0, "an event in another tag's folder: {s3}");
    for tag in TAGS {
        assert_eq!(
            s3["per_tag_hour"][format!("{tag}|2026-11-23T05")],
            2 * N,
            "tag {tag}: {s3}"
        );
    }
    let folders: std::collections::BTreeSet<&str> =
        after.keys().filter_map(|k| k.split('/').nth(1)).collect();
    assert_eq!(folders.len(), 2, "one folder per tag: {folders:?}");
}

/// Two relays given one `relay.id` (a Deployment instead of a StatefulSet): the second
/// finds the first's live lease in the bucket and refuses to start, naming the holder;
/// once the first stops cleanly, its lease is free and the second starts at once.
#[test]
fn a_second_relay_with_the_same_id_refuses_to_start() {
    let svc = Services::from_env();
    let tmp = tempfile::tempdir().unwrap();
    let bucket = unique_name("lease");
    svc.create_bucket(&bucket);
    let spec = |dir: &std::path::Path| {
        let mut spec = RelaySpec::insecure(dir, "relay-lease");
        spec.config.sinks.push(svc.s3_sink(&bucket));
        spec
    };
    let (a_dir, b_dir) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&a_dir).unwrap();
    std::fs::create_dir_all(&b_dir).unwrap();
    let mut a = spec(&a_dir).start();
    let mut b = spec(&b_dir).spawn();
    wait_for(
        "the second relay to give up",
        Duration::from_secs(60),
        || !b.is_running(),
    );
    let log = b.log_text();
    assert!(
        log.contains("relay id \\\"relay-lease\\\" is in use")
            || log.contains("relay id \"relay-lease\" is in use"),
        "the refusal names the id and the holder:\n{log}"
    );
    let holder = std::fs::read_to_string(a.spool_dir().join("incarnation")).unwrap();
    assert!(
        log.contains(holder.trim()),
        "the refusal names the holder's incarnation:\n{log}"
    );
    a.assert_running();

    let etags = svc.s3_etags(&bucket);
    assert_eq!(
        etags.keys().collect::<Vec<_>>(),
        ["logs/_sluice/relays/relay-lease.json"],
        "the lease is the only object"
    );
    a.stop(Duration::from_secs(60));
    b.start();
    b.assert_running();
    b.stop(Duration::from_secs(60));
}

/// The crash window the keys are built for: the relay dies (abort, like kill -9) right
/// after an upload created an object and before the sink saved its cursor, 10 times in
/// a row. Each next life repeats that delivery with exactly the same events, finds the
/// object already there with the same bytes, and moves on: no object twice, no line
/// twice, nothing missing (boto3 reads the bucket).
#[test]
fn a_crash_between_upload_and_cursor_save_duplicates_nothing() {
    const LIVES: u64 = 10;
    const PER_LIFE: u64 = 500;
    let svc = Services::from_env();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let bucket = unique_name("crash-upload");
    svc.create_bucket(&bucket);
    let certs = Certs::generate(dir, "relay");
    let mut spec = RelaySpec::new(dir, "relay-crash", certs.server_tls());
    let mut s3 = svc.s3_sink(&bucket);
    s3.object_store().max_object_age = Span::millis(200);
    spec.config.sinks.push(s3);
    spec.env = vec![("SLUICE_TEST_CRASH_AFTER_UPLOAD".into(), "1".into())];
    let mut relay = spec.start();
    let log = dir.join("app.log");
    let mut agent = AgentSpec::new(
        dir,
        "agent-crash",
        &[relay.forward],
        certs.client_tls(),
        &log.display().to_string(),
    );
    agent.config.output.chunk_age = Span::millis(100);
    agent.config.output.retry_max = Span::millis(300);
    let mut agent = agent.spawn();

    for life in 0..LIVES {
        write_numbered_lines(&log, life * PER_LIFE + 1, PER_LIFE);
        wait_for(
            &format!("relay life {life} to crash after its upload"),
            Duration::from_secs(120),
            || !relay.is_running(),
        );
        assert!(
            relay
                .log_text()
                .contains("SLUICE_TEST_CRASH_AFTER_UPLOAD: aborting"),
            "life {life} ended otherwise:\n{}",
            relay.log_text()
        );
        if life + 1 == LIVES {
            relay.env.clear();
        }
        relay.start();
    }
    let lines = LIVES * PER_LIFE;
    relay.wait(
        "the agent to have every line acknowledged",
        Duration::from_secs(120),
        || agent.acked() >= lines,
    );
    wait_for("the bucket to catch up", Duration::from_secs(120), || {
        relay.caught_up(&["s3"])
    });
    agent.stop(Duration::from_secs(30));
    relay.stop(Duration::from_secs(60));

    let logs = relay.all_logs_text();
    let repeated = logs
        .matches("object already written with the same content")
        .count() as u64;
    assert!(
        repeated >= LIVES,
        "each restart repeats the cut-short delivery and finds its object: {repeated} of {LIVES}"
    );
    assert!(
        !logs.contains("written beside it"),
        "a key was reused with other content"
    );
    let s3 = svc.s3_summary(&bucket);
    assert_eq!(s3["distinct_messages"], lines, "{s3}");
    assert_eq!(s3["messages"], lines, "a line twice: {s3}");
    assert_eq!(s3["bad"], 0, "{s3}");
}
