//! The relay's Prometheus metrics. Every place the relay can drop or refuse data has a
//! counter here, labelled by reason, and a warning in the log next to it.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use sluice_forward::RejectReason;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabel {
    pub sink: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkReason {
    pub sink: String,
    pub reason: String,
}

pub struct RelayMetrics {
    pub connections_active: Gauge,
    /// Bytes of `server.max_inflight_bytes` held now.
    pub inflight_bytes: Gauge,
    pub connections_total: Counter,
    /// Connections closed because of the client: TLS failure, auth, malformed frame, ...
    pub connections_rejected: Family<Reason, Counter>,
    pub chunks_received: Counter,
    pub events_received: Counter,
    pub bytes_received: Counter,
    /// Events of resent chunks that were already accepted, trimmed by dedup.
    pub events_duplicate: Counter,
    pub acks_sent: Counter,
    pub spool_bytes: Gauge,
    pub spool_full: Gauge,
    pub spool_commits: Counter,
    pub spool_errors: Counter,
    pub spool_torn_bytes: Counter,
    pub spool_corrupt_segments: Counter,
    pub spool_corrupt_batches: Counter,
    pub spool_corrupt_bytes: Counter,
    /// Chunks not accepted (not acknowledged, the connection closed) by reason, e.g.
    /// `max_tags_per_client`.
    pub chunks_refused: Family<Reason, Counter>,
    /// Sources in the dedup table.
    pub dedup_sources: Gauge,
    /// Sources forgotten after `spool.dedup_retention`.
    pub dedup_sources_pruned: Counter,
    /// Ledger (tag, hour) cells forgotten after `relay.ledger_retention`.
    pub ledger_hours_pruned: Counter,
    /// Agent reports taken into the ledger ...
    pub agent_reports: Counter,
    /// ... and refused (unreadable, or naming sources not the client's own): logged with the peer.
    pub agent_reports_refused: Counter,
    /// Bytes written to persist the relay state (dedup marks and counts): change
    /// records, compactions and their manifest.
    pub state_bytes_written: Counter,
    /// Bytes written to persist each sink's cursor, counts and recovery data.
    pub sink_state_bytes_written: Family<SinkLabel, Counter>,
    pub sink_events: Family<SinkLabel, Counter>,
    pub sink_bytes: Family<SinkLabel, Counter>,
    pub sink_retries: Family<SinkLabel, Counter>,
    pub sink_permanent_errors: Family<SinkLabel, Counter>,
    pub sink_dropped: Family<SinkReason, Counter>,
    pub sink_lag_bytes: Family<SinkLabel, Gauge>,
    pub sink_latency: Family<SinkLabel, Histogram>,
    /// Object sinks: events written after their hour's manifest (a new revision).
    pub late_events: Family<SinkLabel, Counter>,
    /// Object sinks: hours closed (manifests and markers written).
    pub hours_closed: Family<SinkLabel, Counter>,
    /// Object sinks: seconds from the end of the last closed hour to its manifest.
    pub hour_close_delay: Family<SinkLabel, Gauge>,
    /// Kafka sinks: events sent to `default_topic` instead of their own, by reason.
    pub kafka_rerouted: Family<SinkReason, Counter>,
    /// Events kept in a sink's dead-letter location, by reason.
    pub dead_letters: Family<SinkReason, Counter>,
    /// Kafka sinks: messages read back to find what a cut-short delivery wrote.
    pub kafka_readback_messages: Family<SinkLabel, Counter>,
    /// Kafka sinks: read-backs given up after stalling (the delivery went on without).
    pub kafka_readback_abandoned: Family<SinkLabel, Counter>,
    /// Kafka sinks: seconds the last read-back took.
    pub kafka_readback_seconds: Family<SinkLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// 1 while a sink's last delivery failed with an error that will not go away by
    /// itself (it also makes /ready false).
    pub sink_failing: Family<SinkLabel, Gauge>,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

impl Default for RelayMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl RelayMetrics {
    pub fn new() -> Self {
        RelayMetrics {
            connections_active: Default::default(),
            inflight_bytes: Default::default(),
            connections_total: Default::default(),
            connections_rejected: Default::default(),
            chunks_received: Default::default(),
            events_received: Default::default(),
            bytes_received: Default::default(),
            events_duplicate: Default::default(),
            acks_sent: Default::default(),
            spool_bytes: Default::default(),
            spool_full: Default::default(),
            spool_commits: Default::default(),
            spool_errors: Default::default(),
            spool_torn_bytes: Default::default(),
            spool_corrupt_segments: Default::default(),
            spool_corrupt_batches: Default::default(),
            spool_corrupt_bytes: Default::default(),
            chunks_refused: Default::default(),
            dedup_sources: Default::default(),
            dedup_sources_pruned: Default::default(),
            ledger_hours_pruned: Default::default(),
            agent_reports: Default::default(),
            agent_reports_refused: Default::default(),
            state_bytes_written: Default::default(),
            sink_state_bytes_written: Default::default(),
            sink_events: Default::default(),
            sink_bytes: Default::default(),
            sink_retries: Default::default(),
            sink_permanent_errors: Default::default(),
            sink_dropped: Default::default(),
            sink_lag_bytes: Default::default(),
            sink_latency: Family::new_with_constructor(latency_histogram),
            late_events: Default::default(),
            hours_closed: Default::default(),
            hour_close_delay: Default::default(),
            kafka_rerouted: Default::default(),
            dead_letters: Default::default(),
            kafka_readback_messages: Default::default(),
            kafka_readback_seconds: Default::default(),
            kafka_readback_abandoned: Default::default(),
            sink_failing: Default::default(),
        }
    }

    pub fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("sluice_relay");
        r.register(
            "connections_active",
            "Open client connections",
            self.connections_active.clone(),
        );
        r.register(
            "inflight_bytes",
            "Ingest memory held now: frames being read and chunks not yet spooled (at most server.max_inflight_bytes)",
            self.inflight_bytes.clone(),
        );
        r.register(
            "connections",
            "Client connections accepted",
            self.connections_total.clone(),
        );
        r.register(
            "connections_rejected",
            "Client connections closed because of the client, by reason",
            self.connections_rejected.clone(),
        );
        r.register(
            "chunks_received",
            "Chunks received and spooled",
            self.chunks_received.clone(),
        );
        r.register(
            "events_received",
            "Events received and spooled",
            self.events_received.clone(),
        );
        r.register(
            "bytes_received",
            "Bytes of the entries of received chunks, decompressed (what the spool stores)",
            self.bytes_received.clone(),
        );
        r.register(
            "events_duplicate",
            "Events of resent chunks trimmed by dedup",
            self.events_duplicate.clone(),
        );
        r.register(
            "acks_sent",
            "Chunk acknowledgements sent",
            self.acks_sent.clone(),
        );
        r.register(
            "spool_bytes",
            "Bytes held in the spool",
            self.spool_bytes.clone(),
        );
        r.register(
            "spool_full",
            "1 while the spool is at its size limit (the relay stops acknowledging)",
            self.spool_full.clone(),
        );
        r.register(
            "spool_commits",
            "Spool group commits",
            self.spool_commits.clone(),
        );
        r.register(
            "spool_errors",
            "Spool write errors",
            self.spool_errors.clone(),
        );
        r.register(
            "spool_torn_bytes",
            "Bytes of torn spool tails truncated at recovery",
            self.spool_torn_bytes.clone(),
        );
        r.register(
            "spool_corrupt_segments",
            "Corrupt spool segments set aside at recovery (a damaged segment header, or damage in a version 1 segment)",
            self.spool_corrupt_segments.clone(),
        );
        r.register(
            "spool_corrupt_batches",
            "Spool batches lost to damage on disk (found at recovery or while reading; each damaged stretch counted once per relay run)",
            self.spool_corrupt_batches.clone(),
        );
        r.register(
            "spool_corrupt_bytes",
            "Bytes of damaged spool stretches passed over, headers included",
            self.spool_corrupt_bytes.clone(),
        );
        r.register(
            "chunks_refused",
            "Chunks not accepted (unacknowledged, connection closed), by reason",
            self.chunks_refused.clone(),
        );
        r.register(
            "dedup_sources",
            "Sources in the dedup table",
            self.dedup_sources.clone(),
        );
        r.register(
            "dedup_sources_pruned",
            "Sources forgotten after spool.dedup_retention",
            self.dedup_sources_pruned.clone(),
        );
        r.register(
            "ledger_hours_pruned",
            "Ledger (tag, hour) cells forgotten after relay.ledger_retention",
            self.ledger_hours_pruned.clone(),
        );
        r.register(
            "agent_reports",
            "Reports of sluice agents (seqs acknowledged per tag, hour and source) taken into the ledger",
            self.agent_reports.clone(),
        );
        r.register(
            "agent_reports_refused",
            "Agent reports refused: unreadable, or naming a source that is not the client's own",
            self.agent_reports_refused.clone(),
        );
        r.register(
            "state_bytes_written",
            "Bytes written to persist the dedup table and received counts",
            self.state_bytes_written.clone(),
        );
        r.register(
            "sink_state_bytes_written",
            "Bytes written to persist a sink's cursor, counts and recovery data",
            self.sink_state_bytes_written.clone(),
        );
        r.register(
            "sink_events",
            "Events delivered, by sink",
            self.sink_events.clone(),
        );
        r.register(
            "sink_bytes",
            "Bytes delivered, by sink",
            self.sink_bytes.clone(),
        );
        r.register(
            "sink_retries",
            "Failed deliveries that will be retried",
            self.sink_retries.clone(),
        );
        r.register(
            "sink_permanent_errors",
            "Failed deliveries that will fail again until someone acts (credentials, permissions, a missing destination, an undecodable spool record), by sink",
            self.sink_permanent_errors.clone(),
        );
        r.register(
            "sink_dropped",
            "Events a sink could not take and skipped, by sink and reason",
            self.sink_dropped.clone(),
        );
        r.register(
            "sink_lag_bytes",
            "Spool bytes a sink has not delivered yet",
            self.sink_lag_bytes.clone(),
        );
        r.register(
            "sink_latency_seconds",
            "Time from receipt to delivery",
            self.sink_latency.clone(),
        );
        r.register(
            "late_events",
            "Object sinks: events that arrived after their hour's manifest was written (written to a new object; the manifest gets a new revision)",
            self.late_events.clone(),
        );
        r.register(
            "hours_closed",
            "Object sinks: event-time hours closed (manifest, _SUCCESS marker and hour marker written)",
            self.hours_closed.clone(),
        );
        r.register(
            "hour_close_delay_seconds",
            "Object sinks: seconds from the end of the last closed hour to its manifest (time to completeness)",
            self.hour_close_delay.clone(),
        );
        r.register(
            "kafka_rerouted",
            "Kafka sinks: events sent to default_topic because their topic could not be rendered (missing_field), is not a legal name (invalid_topic), does not exist (unknown_topic) or would be one topic too many (too_many_topics, over 1,000); events whose key fell back to the source id (key_missing_field) or raw value to the envelope (value_missing_field)",
            self.kafka_rerouted.clone(),
        );
        r.register(
            "dead_letters",
            "Events a sink could not deliver and kept in its dead-letter location, by sink and reason",
            self.dead_letters.clone(),
        );
        r.register(
            "kafka_readback_messages",
            "Kafka sinks: messages read back after a failed attempt or a crash, to find what was already written",
            self.kafka_readback_messages.clone(),
        );
        r.register(
            "kafka_readback_abandoned",
            "Kafka sinks: read-backs given up after stalling three times (a broker that does not serve a partition to its end); what the cut-short delivery had written may be written again",
            self.kafka_readback_abandoned.clone(),
        );
        r.register(
            "kafka_readback_seconds",
            "Kafka sinks: how long the last read-back took",
            self.kafka_readback_seconds.clone(),
        );
        r.register(
            "sink_failing",
            "1 while a sink fails with an error that needs someone to act (authentication, authorization, a missing topic); /ready is false then",
            self.sink_failing.clone(),
        );
    }

    pub fn reject(&self, reason: RejectReason) {
        self.connections_rejected
            .get_or_create(&Reason {
                reason: reason.as_label().to_string(),
            })
            .inc();
    }

    /// Counts a damaged spool stretch (once: by whoever reports it first).
    pub fn spool_damage(&self, d: &sluice_spool::Damage) {
        self.spool_corrupt_batches.inc_by(d.batches);
        self.spool_corrupt_bytes.inc_by(d.bytes());
    }

    pub fn refuse_chunk(&self, reason: &str) {
        self.chunks_refused
            .get_or_create(&Reason {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn sink(&self, sink: &str) -> SinkLabel {
        SinkLabel {
            sink: sink.to_string(),
        }
    }
}
