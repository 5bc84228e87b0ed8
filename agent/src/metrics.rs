//! The agent's Prometheus metrics, one per stage: read, chunk, send, acknowledge.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InputLabel {
    pub input: String,
}

#[derive(Default)]
pub struct AgentMetrics {
    pub parse_errors: Family<InputLabel, Counter>,
    pub time_errors: Family<InputLabel, Counter>,
    pub lines_read: Counter,
    pub bytes_read: Counter,
    pub lines_truncated: Gauge,
    pub bytes_lost_to_truncation: Gauge,
    pub files_open: Gauge,
    pub deleted_bytes_held: Gauge,
    pub deleted_bytes_alarm: Gauge,
    pub chunks_sealed: Counter,
    pub chunks_sent: Counter,
    pub heartbeats: Counter,
    pub chunks_resent: Counter,
    pub ack_waits: Counter,
    pub chunks_acked: Counter,
    pub events_acked: Counter,
    pub in_flight: Gauge,
    pub buffered_chunks: Gauge,
    pub relay_errors: Family<Reason, Counter>,
    pub relays_healthy: Gauge,
    pub probes: Counter,
    pub chunks_moved: Counter,
    pub events_moved: Counter,
    pub checkpoint_saves: Counter,
    pub checkpoint_errors: Counter,
}

impl AgentMetrics {
    pub fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("sluice_agent");
        r.register(
            "lines_read",
            "Lines read from files",
            self.lines_read.clone(),
        );
        r.register(
            "bytes_read",
            "Bytes read from files",
            self.bytes_read.clone(),
        );
        r.register(
            "lines_truncated",
            "Over-long lines split or truncated (since start)",
            self.lines_truncated.clone(),
        );
        r.register(
            "bytes_lost_to_truncation",
            "Bytes that could not be read because a file was truncated before they were read (copytruncate)",
            self.bytes_lost_to_truncation.clone(),
        );
        r.register(
            "parse_errors",
            "Lines the input's parser could not parse, sent raw with a parse_error field",
            self.parse_errors.clone(),
        );
        r.register(
            "time_errors",
            "Records whose time_key field was missing or did not match time_format; they keep the read time",
            self.time_errors.clone(),
        );
        r.register("files_open", "Files held open", self.files_open.clone());
        r.register(
            "relays_healthy",
            "Relays the agent is connected to and sends to",
            self.relays_healthy.clone(),
        );
        r.register(
            "probes",
            "Probes sent: empty chunks a relay answers at once, sent when it was silent while owing an ack, or as the heartbeat of an idle connection",
            self.probes.clone(),
        );
        r.register(
            "chunks_moved",
            "Unacknowledged or queued chunks handed to other relays because theirs became unusable",
            self.chunks_moved.clone(),
        );
        r.register(
            "events_moved",
            "Events in chunks_moved; an upper bound on what a relay that failed can have received twice",
            self.events_moved.clone(),
        );
        r.register(
            "deleted_bytes_held",
            "Unread bytes of deleted or rotated-away files still held open",
            self.deleted_bytes_held.clone(),
        );
        r.register(
            "deleted_bytes_alarm",
            "1 when deleted_bytes_held is over max_deleted",
            self.deleted_bytes_alarm.clone(),
        );
        r.register("chunks_sealed", "Chunks cut", self.chunks_sealed.clone());
        r.register(
            "heartbeats",
            "Heartbeats sent to an idle relay",
            self.heartbeats.clone(),
        );
        r.register(
            "chunks_sent",
            "Chunks written to a relay connection",
            self.chunks_sent.clone(),
        );
        r.register(
            "chunks_resent",
            "Chunks sent again on a new connection after a failure",
            self.chunks_resent.clone(),
        );
        r.register(
            "ack_waits",
            "Episodes of an ack later than ack_timeout from a relay that still answered a new connection: the agent waited on that relay instead of failing over",
            self.ack_waits.clone(),
        );
        r.register(
            "chunks_acked",
            "Chunks acknowledged by a relay",
            self.chunks_acked.clone(),
        );
        r.register(
            "events_acked",
            "Events acknowledged by a relay",
            self.events_acked.clone(),
        );
        r.register(
            "in_flight",
            "Chunks sent and not yet acknowledged",
            self.in_flight.clone(),
        );
        r.register(
            "buffered_chunks",
            "Sealed chunks waiting for a free in-flight slot",
            self.buffered_chunks.clone(),
        );
        r.register(
            "relay_errors",
            "Relay connection failures, by reason",
            self.relay_errors.clone(),
        );
        r.register(
            "checkpoint_saves",
            "Checkpoint file writes",
            self.checkpoint_saves.clone(),
        );
        r.register(
            "checkpoint_errors",
            "Checkpoint file write failures",
            self.checkpoint_errors.clone(),
        );
    }

    pub fn relay_error(&self, reason: &str) {
        self.relay_errors
            .get_or_create(&Reason {
                reason: reason.to_string(),
            })
            .inc();
    }
}
