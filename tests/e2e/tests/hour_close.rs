//! Hour close against moto, read with boto3 (tests/py/s3_hours.py), on a simulated
//! clock (`SLUICE_TEST_CLOCK`) so that hours pass in seconds: late events land in their
//! own hour and revise its manifest; an hour closes only after the store came back; six
//! hours of steady input roll into few objects and close on time.

use std::time::{Duration, Instant};

use sluice_core::units::Span;
use sluice_e2e::*;

/// 2026-11-23T10:59:00Z
const T_10_59: f64 = 1_795_431_540.0;
const HOUR_10: &str = "2026-11-23T10";
const HOUR_11: &str = "2026-11-23T11";

fn send(svc: &Services, relay: &Relay, tag: &str, first: u64, count: u64, time: &str, spread: f64) {
    svc.fluent_send(relay.forward.port(), tag, first, count, time, spread);
}

/// Where the relay's object sink writes, and how the test reads it back.
enum Store {
    /// The S3 server, read with boto3 (tests/py/s3_hours.py).
    S3 { bucket: String },
    /// A local directory, read here (the same answer, see [`local_hours`]).
    Local { dir: std::path::PathBuf },
}

impl Store {
    fn sink(&self, svc: &Services) -> sluice_relay::config::SinkConfig {
        match self {
            Store::S3 { bucket } => {
                svc.create_bucket(bucket);
                svc.s3_sink(bucket)
            }
            Store::Local { dir } => {
                let mut sink = svc.s3_sink("unused");
                let o = sink.object_store();
                o.url = format!("file://{}", dir.display());
                o.options.clear();
                sink
            }
        }
    }

    fn hours(&self, svc: &Services) -> serde_json::Value {
        match self {
            Store::S3 { bucket } => svc.s3_hours(bucket),
            Store::Local { dir } => local_hours(dir),
        }
    }
}

/// What s3_hours.py answers, for a local directory: per `<tag>|<hour>` partition the
/// objects and their lines, the manifests by writer and revision, the `_SUCCESS`
/// markers; and the hour markers. Keys are paths below the directory.
fn local_hours(root: &std::path::Path) -> serde_json::Value {
    use std::io::Read;
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if !p.to_string_lossy().contains('#') {
                // `<key>#<n>` is object_store's file for a put in progress (renamed to
                // the key when complete): not an object yet.
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(root, &mut files);
    files.sort();
    let mut partitions = serde_json::Map::new();
    let mut markers = serde_json::Map::new();
    for path in files {
        let key = path
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .to_string();
        let parts: Vec<&str> = key.split('/').collect();
        let json = || -> serde_json::Value {
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
        };
        if let Some(at) = parts.iter().position(|p| *p == "_sluice") {
            if parts.get(at + 1) == Some(&"hours") && parts.len() == at + 5 {
                let hour = format!(
                    "{}T{}",
                    parts[at + 2].trim_start_matches("dt="),
                    parts[at + 3].trim_start_matches("hour=")
                );
                let writer = parts[at + 4].trim_end_matches(".json");
                let doc = json();
                let tags: serde_json::Map<String, serde_json::Value> = doc["tags"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(t, v)| (t.clone(), v["records"].clone()))
                    .collect();
                markers
                    .entry(hour)
                    .or_insert_with(|| serde_json::json!({}))
                    .as_object_mut()
                    .unwrap()
                    .insert(writer.to_string(), tags.into());
            }
            continue;
        }
        let Some(dt) = parts.iter().position(|p| p.starts_with("dt=")) else {
            continue;
        };
        if dt == 0 || parts.len() < dt + 3 {
            continue;
        }
        let id = format!(
            "{}|{}T{}",
            parts[dt - 1],
            parts[dt].trim_start_matches("dt="),
            parts[dt + 1].trim_start_matches("hour=")
        );
        let part = partitions.entry(id).or_insert_with(
            || serde_json::json!({"objects": {}, "lines": 0, "manifests": {}, "success": {}}),
        );
        let rest = parts[dt + 2..].join("/");
        if rest.ends_with(".ndjson.gz") {
            let mut text = String::new();
            flate2::read::MultiGzDecoder::new(&std::fs::read(&path).unwrap()[..])
                .read_to_string(&mut text)
                .unwrap();
            let lines = text.lines().filter(|l| !l.trim().is_empty()).count() as u64;
            part["objects"][&key] = lines.into();
            part["lines"] = (part["lines"].as_u64().unwrap() + lines).into();
        } else if let Some(name) = rest.strip_prefix("_manifests/") {
            let (writer, rev) = name.trim_end_matches(".json").rsplit_once(".r").unwrap();
            let doc = json();
            let objects: serde_json::Map<String, serde_json::Value> = doc["objects"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| (o["key"].as_str().unwrap().to_string(), o["records"].clone()))
                .collect();
            let entry = serde_json::json!({
                "revision": rev.parse::<u64>().unwrap(),
                "records": doc["records"],
                "late_records": doc["late_records"],
                "closed_at": doc["closed_at"],
                "objects": objects,
            });
            let revs = part["manifests"]
                .as_object_mut()
                .unwrap()
                .entry(writer.to_string())
                .or_insert_with(|| serde_json::json!([]));
            revs.as_array_mut().unwrap().push(entry);
        } else if let Some(writer) = rest.strip_prefix("_SUCCESS-") {
            let doc = json();
            part["success"][writer] =
                serde_json::json!({"revision": doc["revision"], "records": doc["records"]});
        }
    }
    serde_json::json!({"partitions": partitions, "markers": markers})
}

fn relay_with_clock(
    svc: &Services,
    dir: &std::path::Path,
    store: &Store,
    clock: &str,
    lateness: Span,
    age: Span,
) -> Relay {
    let mut spec = RelaySpec::insecure(dir, "relay-hours");
    let mut sink = store.sink(svc);
    sink.object_store().allowed_lateness = lateness;
    sink.object_store().max_object_age = age;
    spec.config.sinks.push(sink);
    spec.env.push(("SLUICE_TEST_CLOCK".into(), clock.into()));
    spec.start()
}

fn partition<'a>(hours: &'a serde_json::Value, tag: &str, hour: &str) -> &'a serde_json::Value {
    &hours["partitions"][format!("{tag}|{hour}")]
}

/// The latest manifest of the one relay incarnation that wrote the partition.
fn latest(part: &serde_json::Value) -> &serde_json::Value {
    let writers = part["manifests"].as_object().expect("manifests");
    assert_eq!(writers.len(), 1, "one relay incarnation: {part}");
    let revs = writers.values().next().unwrap().as_array().unwrap();
    revs.last().unwrap()
}

/// The manifest lists exactly the objects boto3 finds, with their line counts.
fn assert_manifest_matches_objects(part: &serde_json::Value) {
    let m = latest(part);
    assert_eq!(
        m["objects"], part["objects"],
        "manifest objects vs bucket: {part}"
    );
    assert_eq!(
        m["records"], part["lines"],
        "manifest records vs lines: {part}"
    );
}

/// Events stamped 10:59:50–11:00:10, half of them sent after hour 10 closed: each lands
/// in its own hour; hour 10 gets a second revision counting the late ones; every
/// manifest's counts equal the lines boto3 reads; `_SUCCESS` shows only complete hours.
#[test]
fn late_events_land_in_their_hour_and_revise_its_manifest() {
    late_events(Store::S3 {
        bucket: unique_name("hours"),
    });
}

/// The same with the local directory store, read from the disk.
#[test]
fn late_events_land_in_their_hour_in_a_local_directory() {
    let dir = tempfile::tempdir().unwrap();
    late_events(Store::Local {
        dir: dir.path().join("objects"),
    });
}

fn late_events(store: Store) {
    const N: u64 = 1_000; // per tag and wave: half in hour 10, half in hour 11
    let svc = Services::from_env();
    let tmp = tempfile::tempdir().unwrap();
    // 120× real time: hour 10 closes (11:30) about 15 s after the start, hour 11 (12:30)
    // about 45 s after.
    let relay = relay_with_clock(
        &svc,
        tmp.path(),
        &store,
        &format!("{T_10_59}:120"),
        Span::secs(1800),
        Span::secs(1),
    );
    let tags = ["hc.a", "hc.b"];
    for tag in tags {
        send(&svc, &relay, tag, 1, N, "2026-11-23T10:59:50Z", 20.0);
    }
    let closed = relay.counter("sluice_relay_hours_closed_total", "");
    let early = store.hours(&svc);
    assert!(
        partition(&early, "hc.a", HOUR_10)["success"]
            .as_object()
            .is_none_or(|s| s.is_empty()),
        "the first wave must be acknowledged before hour 10 closes (the machine was too slow for this test's clock: {closed} hours closed): {early}"
    );

    wait_for("hour 10 closed", Duration::from_secs(120), || {
        let h = store.hours(&svc);
        tags.iter().all(|t| {
            partition(&h, t, HOUR_10)["success"]
                .as_object()
                .is_some_and(|s| !s.is_empty())
        })
    });
    let at_close = store.hours(&svc);
    for tag in tags {
        let part = partition(&at_close, tag, HOUR_10);
        // Everything acknowledged before the close is in it, and nothing else.
        assert_eq!(latest(part)["revision"], 1, "{part}");
        assert_eq!(latest(part)["records"], N / 2, "{part}");
        assert_manifest_matches_objects(part);
        assert!(
            partition(&at_close, tag, HOUR_11)["success"]
                .as_object()
                .is_none_or(|s| s.is_empty()),
            "hour 11 is not complete yet: {at_close}"
        );
    }

    // The second wave: the same times, minutes (of the relay's clock) after hour 10 closed.
    for tag in tags {
        send(&svc, &relay, tag, N + 1, N, "2026-11-23T10:59:50Z", 20.0);
    }
    relay.wait("the late half counted", Duration::from_secs(60), || {
        relay.counter("sluice_relay_late_events_total", "") as u64 >= N
    });
    // The hour marker is written after every tag's manifest and `_SUCCESS`: wait for it
    // too, and for hour 10's marker to list its second revision.
    wait_for("hour 11 closed", Duration::from_secs(180), || {
        let h = store.hours(&svc);
        let marked = |hour: &str| {
            h["markers"][hour]
                .as_object()
                .and_then(|m| m.values().next())
                .is_some_and(|w| tags.iter().all(|t| w[*t].as_u64().is_some()))
        };
        tags.iter().all(|t| {
            partition(&h, t, HOUR_11)["success"]
                .as_object()
                .is_some_and(|s| !s.is_empty())
        }) && marked(HOUR_10)
            && marked(HOUR_11)
            && tags.iter().all(|t| {
                h["markers"][HOUR_10]
                    .as_object()
                    .and_then(|m| m.values().next())
                    .is_some_and(|w| w[*t] == N)
            })
    });
    let hours = store.hours(&svc);
    for tag in tags {
        let h10 = partition(&hours, tag, HOUR_10);
        assert_eq!(
            latest(h10)["revision"],
            2,
            "a revision for the late events: {h10}"
        );
        assert_eq!(latest(h10)["records"], N, "{h10}");
        assert_eq!(latest(h10)["late_records"], N / 2, "{h10}");
        let writers = h10["manifests"].as_object().unwrap();
        let revs = writers.values().next().unwrap().as_array().unwrap();
        assert_eq!(revs.len(), 2, "revision 1 is kept: {h10}");
        assert_eq!(revs[0]["records"], N / 2, "{h10}");
        assert_manifest_matches_objects(h10);
        let h11 = partition(&hours, tag, HOUR_11);
        assert_eq!(
            latest(h11)["revision"],
            1,
            "hour 11 had no late events: {h11}"
        );
        assert_eq!(latest(h11)["records"], N, "{h11}");
        assert_manifest_matches_objects(h11);
    }
    assert_eq!(
        relay.counter("sluice_relay_late_events_total", "") as u64,
        N
    );
    for hour in [HOUR_10, HOUR_11] {
        let marker = &hours["markers"][hour];
        let writer = marker.as_object().and_then(|m| m.values().next());
        let writer = writer.unwrap_or_else(|| panic!("no hour marker for {hour}: {hours}"));
        for tag in tags {
            assert!(
                writer[tag].as_u64().is_some(),
                "{hour} marker lists {tag}: {marker}"
            );
        }
    }
    match &store {
        Store::S3 { bucket } => {
            let s3 = svc.s3_summary(bucket);
            assert_eq!(
                s3["misplaced"], 0,
                "an event outside its hour's folder: {s3}"
            );
            assert_eq!(s3["bad"], 0, "{s3}");
            assert_eq!(s3["distinct_messages"], 4 * N, "{s3}");
            assert_eq!(s3["duplicates"], 0, "{s3}");
        }
        Store::Local { .. } => {
            let lines: u64 = hours["partitions"]
                .as_object()
                .unwrap()
                .values()
                .map(|p| p["lines"].as_u64().unwrap())
                .sum();
            assert_eq!(lines, 4 * N, "every event once: {hours}");
        }
    }
}

/// The store stops answering (SIGSTOP) across the moment hour 10 is due to close: the
/// upload waits (object_store retries the request), the spool holds what keeps arriving, no `_SUCCESS` is written while the
/// hour's objects cannot be, and once the store is back the hour closes with every event.
#[test]
fn an_hour_closes_only_after_the_store_comes_back() {
    const N: u64 = 1_000;
    let outage = Duration::from_secs(env_u64("SLUICE_S3_OUTAGE_SECS", 30));
    let shared = Services::from_env();
    let tmp = tempfile::tempdir().unwrap();
    let private = PrivateService::moto(&shared, &tmp.path().join("moto.log"));
    let svc = shared.with(None, Some(&private.addr));
    let store = Store::S3 {
        bucket: unique_name("outage-hours"),
    };
    // 30× real time, lateness 10 min: hour 10 is due to close 22 s after the start, well
    // after the store is paused (a few seconds in) and before it is back (30 s later).
    let relay = relay_with_clock(
        &svc,
        tmp.path(),
        &store,
        &format!("{T_10_59}:30"),
        Span::secs(600),
        Span::secs(1),
    );
    send(&svc, &relay, "out.a", 1, N, "2026-11-23T10:59:00Z", 50.0);
    relay.wait_delivered("s3", N, Duration::from_secs(60));

    private.pause();
    let paused = Instant::now();
    // More of hour 10, acknowledged from the spool while the store is down.
    send(&svc, &relay, "out.a", N + 1, N, "2026-11-23T10:59:51Z", 8.0);
    relay.wait("a backlog in the spool", Duration::from_secs(30), || {
        relay.lag("s3").unwrap_or(0.0) > 0.0
    });
    let closed_before = relay.counter("sluice_relay_hours_closed_total", "");
    while paused.elapsed() < outage {
        relay.assert_running();
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        relay.counter("sluice_relay_hours_closed_total", ""),
        closed_before,
        "no hour closes while the store is down"
    );
    private.resume();

    wait_for(
        "hour 10 closed after the outage",
        Duration::from_secs(120),
        || {
            let h = store.hours(&svc);
            partition(&h, "out.a", HOUR_10)["success"]
                .as_object()
                .is_some_and(|s| !s.is_empty())
        },
    );
    let hours = store.hours(&svc);
    let part = partition(&hours, "out.a", HOUR_10);
    assert_eq!(latest(part)["revision"], 1, "{part}");
    assert_eq!(
        latest(part)["records"],
        2 * N,
        "every event, none late: {part}"
    );
    assert_manifest_matches_objects(part);
    assert_eq!(relay.counter("sluice_relay_late_events_total", ""), 0.0);
    let delay = relay
        .metric("sluice_relay_hour_close_delay_seconds", "")
        .unwrap_or(0.0);
    assert!(
        delay >= 600.0,
        "closed after the outage, past its lateness: {delay}"
    );
}

/// Steady input over six hours of the relay's clock, two tags: objects per hour per tag
/// stay within what `max_object_age` implies, and each hour closes within
/// `allowed_lateness` plus one roll interval of its end.
#[test]
fn six_hours_of_steady_input_roll_and_close_on_time() {
    const RATE: f64 = 600.0;
    const AGE_SECS: u64 = 2; // real seconds: 20 minutes of the relay's clock
    const LATENESS: f64 = 300.0;
    let svc = Services::from_env();
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::S3 {
        bucket: unique_name("six-hours"),
    };
    let start = T_10_59 + 60.0; // 11:00
                                // The test's own view of the relay's clock starts before the relay does, so the
                                // events it stamps are never behind the relay's clock (never late).
    let t0 = Instant::now();
    let relay = relay_with_clock(
        &svc,
        tmp.path(),
        &store,
        &format!("{start}:{RATE}"),
        Span::secs(LATENESS as u64),
        Span::secs(AGE_SECS),
    );
    let now = || start + t0.elapsed().as_secs_f64() * RATE;
    let end = start + 6.0 * 3600.0;
    let tags = ["six.a", "six.b"];
    let mut first = 1;
    let deadline = Instant::now() + Duration::from_secs(300);
    while now() < end {
        assert!(
            Instant::now() < deadline,
            "the input loop ran past its time"
        );
        let at = now();
        let t = format!("{}Z", &rfc3339(at)[..19]);
        for tag in tags {
            send(&svc, &relay, tag, first, 50, &t, 30.0);
        }
        first += 50;
    }
    // Hours 11..=16 of 2026-11-23 are inside the input.
    let hours: Vec<String> = (11..=16).map(|h| format!("2026-11-23T{h:02}")).collect();
    wait_for("six hours closed", Duration::from_secs(120), || {
        let h = store.hours(&svc);
        tags.iter().all(|t| {
            hours.iter().all(|hour| {
                partition(&h, t, hour)["success"]
                    .as_object()
                    .is_some_and(|s| !s.is_empty())
            })
        })
    });
    let found = store.hours(&svc);
    let roll = AGE_SECS as f64 * RATE;
    // Cut by age every roll interval, plus the cut at the hour's close, plus one.
    let most = (3600.0 / roll).ceil() as usize + 2;
    for tag in tags {
        for (i, hour) in hours.iter().enumerate() {
            let part = partition(&found, tag, hour);
            let objects = part["objects"].as_object().unwrap().len();
            assert!(
                (1..=most).contains(&objects),
                "{tag} {hour}: {objects} objects, at most {most} expected: {part}"
            );
            assert_manifest_matches_objects(part);
            let closed = parse_rfc3339(latest(part)["closed_at"].as_str().unwrap());
            let hour_end = start + (i + 1) as f64 * 3600.0;
            assert!(
                closed - hour_end <= LATENESS + roll,
                "{tag} {hour} closed {} s after its end, more than lateness + one roll interval ({} s)",
                closed - hour_end,
                LATENESS + roll
            );
        }
    }
    assert_eq!(relay.counter("sluice_relay_late_events_total", ""), 0.0);
}
