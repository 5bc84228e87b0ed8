//! `sluice-relay reconcile`: compares, per tag and event-time hour, what the relay
//! received (its ledger), what each sink was offered and says it delivered, and what is
//! really in Kafka and object storage as read back from them, and lists every difference.
//!
//! Each sink type reads its own destination back ([`crate::sinks::SinkSpec::read_back`]);
//! what was found is counted by distinct provenance ([`crate::readback::Found`]).
//!
//! A sink is held to what it was *offered*, not to everything received: a sink added with
//! `start_from = "now"` (and, later, a routed or filtered sink) is offered less than the
//! relay received. For a sink with `start_from = "oldest"` every received event must be
//! offered, so a shortfall there is reported as not offered yet — or, for a sink that
//! passed over damaged spool batches (`SinkCounts::spool_lost`), as lost to spool damage:
//! the damaged batches are unreadable, so their events are known only as that shortfall.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::config::{RelayConfig, StartFrom};
use crate::envelope::hour_label;
use crate::ledger::Ledger;
use crate::readback::Found;
use crate::sinks::ReadBackContext;

/// Builds the report; returns it with `true` when everything agrees.
pub async fn report(
    config: &RelayConfig,
    kafka_timeout: Duration,
) -> Result<(String, bool), String> {
    let ledger_path = config.relay.data_dir.join("ledger.json");
    let ledger = Ledger::load(&ledger_path)?;
    let mut actuals: BTreeMap<String, (StartFrom, Found)> = BTreeMap::new();
    let incarnation = crate::incarnation::read(&config.spool_dir())?;
    let ctx = ReadBackContext {
        relay: &config.relay.id,
        incarnation: incarnation.as_deref(),
        kafka_timeout,
    };
    for sink in config.sinks.iter().filter(|s| s.enabled) {
        if let Some(found) = sink.kind.spec().read_back(&ctx).await? {
            actuals.insert(sink.name.clone(), (sink.start_from, found));
        }
    }
    let mut keys: std::collections::BTreeSet<(String, u64)> = ledger
        .received
        .keys()
        .map(|(t, h)| (t.to_string(), h))
        .collect();
    for (_, a) in actuals.values() {
        keys.extend(a.counts.keys().map(|(t, h)| (t.to_string(), h)));
    }
    // Hours past relay.ledger_retention are forgotten by the ledger, not missing.
    keys.retain(|(_, hour)| *hour >= ledger.forgotten_before);
    let mut out = String::new();
    use std::fmt::Write;
    let _ = writeln!(
        out,
        "reconciliation for relay {} (ledger {})",
        ledger.relay,
        ledger_path.display()
    );
    let _ = write!(out, "{:<24} {:<13} {:>10}", "tag", "hour (UTC)", "received");
    for name in actuals.keys() {
        let _ = write!(
            out,
            " {:>12} {:>12} {:>12}",
            format!("{name}:offered"),
            format!("{name}:ledger"),
            format!("{name}:found")
        );
    }
    let _ = writeln!(out, "  status");
    let mut all_ok = true;
    for (tag, hour) in &keys {
        let received = ledger.received.get(tag, *hour);
        let _ = write!(
            out,
            "{:<24} {:<13} {:>10}",
            tag,
            hour_label(*hour),
            received
        );
        let mut problems = Vec::new();
        for (name, (start_from, actual)) in &actuals {
            let counts = ledger.sinks.get(name).cloned().unwrap_or_default();
            let offered = counts.offered.get(tag, *hour);
            let delivered = counts.delivered.get(tag, *hour);
            let dropped = counts.dropped.get(tag, *hour);
            let found = actual.counts.get(tag, *hour);
            let _ = write!(out, " {:>12} {:>12} {:>12}", offered, delivered, found);
            if *start_from == StartFrom::Oldest && offered < received {
                if counts.spool_lost.batches > 0 {
                    // The sink passed over damaged spool batches: this is their events.
                    problems.push(format!(
                        "{name}: {} lost to spool damage",
                        received - offered
                    ));
                } else {
                    problems.push(format!("{name}: {} not offered yet", received - offered));
                }
            }
            if delivered + dropped < offered {
                problems.push(format!(
                    "{name}: {} not delivered yet",
                    offered - delivered - dropped
                ));
            }
            if dropped > 0 {
                problems.push(format!("{name}: {dropped} dropped (see sink_dropped)"));
            }
            if found < delivered {
                problems.push(format!("{name}: {} missing", delivered - found));
            } else if found > delivered {
                problems.push(format!(
                    "{name}: {} more than the ledger",
                    found - delivered
                ));
            }
        }
        if problems.is_empty() {
            let _ = writeln!(out, "  ok");
        } else {
            all_ok = false;
            let _ = writeln!(out, "  {}", problems.join("; "));
        }
    }
    let _ = writeln!(
        out,
        "total received {} (duplicates trimmed by dedup: {})",
        ledger.received.total(),
        ledger.duplicates
    );
    for (name, (_, a)) in &actuals {
        let _ = writeln!(
            out,
            "{name}: {} events found, {} distinct, {} duplicates, {} unreadable",
            a.events,
            a.counts.total(),
            a.duplicates,
            a.unreadable
        );
        if a.unreadable > 0 {
            all_ok = false;
        }
        let lost = ledger
            .sinks
            .get(name)
            .map(|c| c.spool_lost.clone())
            .unwrap_or_default();
        if !lost.is_empty() {
            all_ok = false;
            let _ = writeln!(
                out,
                "{name}: {} spool batches ({} bytes) lost to damage on disk before this sink read them:",
                lost.batches, lost.bytes
            );
            for r in &lost.ranges {
                let _ = writeln!(
                    out,
                    "  segment {:020}.seg bytes {}..{}: {} batches, {}",
                    r.segment,
                    r.from,
                    r.to,
                    r.batches,
                    if r.acknowledged {
                        "acknowledged to clients (they will not resend them)"
                    } else {
                        "not known to have been acknowledged"
                    }
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "{}",
        if all_ok {
            "RESULT: all sinks agree with the ledger"
        } else {
            "RESULT: differences found (see status column)"
        }
    );
    Ok((out, all_ok))
}
