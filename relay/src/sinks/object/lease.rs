//! The relay's lease in the bucket: `<prefix>/_sluice/relays/<relay>.json`, written at
//! start and renewed every third of `lease_ttl` by the relay whose id it names.
//!
//! - It stops two live relays from sharing one `relay.id` (a Kubernetes Deployment
//!   instead of a StatefulSet, a copied config): a relay that finds its id's lease held
//!   by another incarnation, renewed less than that holder's `ttl_secs` ago and not
//!   marked stopped, refuses to start; if it finds that out later (a renewal), it stops
//!   delivering to this sink, loudly. Keys carry the incarnation as well, so even two
//!   relays that raced past the check cannot overwrite each other's objects.
//! - It tells a loader which relays write under the prefix: list `_sluice/relays/`.
//! - A relay that stops cleanly marks its lease `stopped`, so a successor with an empty
//!   data directory need not wait for the TTL. One that crashed holds it until the TTL
//!   passes (a restart with the same data directory is the same incarnation and takes
//!   it over at once).
//!
//! Time is the relays' clocks (`renewed_at`, Unix seconds): keep them within a small
//! part of the TTL of each other (NTP).
//!
//! The store being unreachable at start does not stop the relay (the spool takes the
//! data meanwhile): the lease is then taken before the first upload.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct LeaseDoc {
    pub relay: String,
    pub incarnation: String,
    pub host: String,
    pub pid: u32,
    pub started_at: u64,
    pub renewed_at: u64,
    pub ttl_secs: u64,
    #[serde(default)]
    pub stopped: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum LeaseError {
    /// Another live incarnation holds the id.
    Held(String),
    /// The store could not be asked.
    Unreachable(String),
    /// The credentials may not read the lease.
    Forbidden(String),
}

impl std::fmt::Display for LeaseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeaseError::Held(m) | LeaseError::Unreachable(m) | LeaseError::Forbidden(m) => {
                f.write_str(m)
            }
        }
    }
}

#[derive(Debug, Clone)]
enum Status {
    NotYet,
    Held,
    Lost(String),
    /// The credentials may not read the bucket: no lease (logged once).
    Disabled,
}

pub struct Lease {
    store: Arc<dyn ObjectStore>,
    path: ObjectPath,
    doc: Mutex<LeaseDoc>,
    ttl: Duration,
    status: Mutex<Status>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// Where the lease of `relay` lives under `prefix`.
pub fn lease_path(prefix: &str, relay: &str) -> ObjectPath {
    let base = ObjectPath::from(prefix);
    base.parts()
        .chain(["_sluice", "relays"].map(object_store::path::PathPart::from))
        .chain(std::iter::once(object_store::path::PathPart::from(
            format!("{relay}.json").as_str(),
        )))
        .collect()
}

impl Lease {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        relay: &str,
        incarnation: &str,
        ttl: Duration,
    ) -> Lease {
        let now = now_secs();
        Lease {
            store,
            path: lease_path(prefix, relay),
            doc: Mutex::new(LeaseDoc {
                relay: relay.to_string(),
                incarnation: incarnation.to_string(),
                host: host_name(),
                pid: std::process::id(),
                started_at: now,
                renewed_at: now,
                ttl_secs: ttl.as_secs().max(1),
                stopped: false,
            }),
            ttl,
            status: Mutex::new(Status::NotYet),
        }
    }

    pub fn path(&self) -> &ObjectPath {
        &self.path
    }

    /// How often the holder renews.
    pub fn renew_every(&self) -> Duration {
        (self.ttl / 3).max(Duration::from_millis(100))
    }

    fn status(&self) -> Status {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_status(&self, status: Status) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = status;
    }

    fn mine(&self) -> LeaseDoc {
        self.doc.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn read(&self) -> Result<Option<LeaseDoc>, LeaseError> {
        let unreachable = |e: object_store::Error| {
            LeaseError::Unreachable(format!("cannot read the relay lease {}: {e}", self.path))
        };
        let bytes = match self.store.get(&self.path).await {
            Ok(got) => got.bytes().await.map_err(unreachable)?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(
                e @ (object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. }),
            ) => return Err(LeaseError::Forbidden(format!("{e}"))),
            Err(e) => return Err(unreachable(e)),
        };
        // An unreadable lease (not ours to interpret) is treated as absent, and replaced.
        Ok(serde_json::from_slice(&bytes).ok())
    }

    /// Writes this relay's lease; `create` only where there is none (two relays that
    /// start at once both find none: one create wins, the other reads the winner's).
    /// Returns `false` when `create` found one after all.
    async fn write(&self, stopped: bool, create: bool) -> Result<bool, LeaseError> {
        let bytes = {
            let mut doc = self.doc.lock().unwrap_or_else(|e| e.into_inner());
            doc.renewed_at = now_secs();
            doc.stopped = stopped;
            serde_json::to_vec_pretty(&*doc).unwrap_or_default()
        };
        let mode = if create {
            object_store::PutMode::Create
        } else {
            object_store::PutMode::Overwrite
        };
        let put = self
            .store
            .put_opts(&self.path, PutPayload::from(bytes.clone()), mode.into())
            .await;
        let put = match put {
            Err(object_store::Error::AlreadyExists { .. }) => return Ok(false),
            Err(
                object_store::Error::NotImplemented { .. }
                | object_store::Error::NotSupported { .. },
            ) if create => self.store.put(&self.path, PutPayload::from(bytes)).await,
            other => other,
        };
        put.map(|_| true).map_err(|e| {
            LeaseError::Unreachable(format!("cannot write the relay lease {}: {e}", self.path))
        })
    }

    /// Whether `other` (read from the bucket) is another relay still alive: another
    /// incarnation, or this incarnation on another host (a copied data directory).
    /// This incarnation on this host is this relay restarted, and takes over at once.
    fn held_by_other(&self, other: &LeaseDoc) -> Option<String> {
        let mine = self.mine();
        let age = now_secs().saturating_sub(other.renewed_at);
        let someone_else = other.incarnation != mine.incarnation || other.host != mine.host;
        (someone_else && !other.stopped && age < other.ttl_secs).then(|| {
            format!(
                "relay id {:?} is in use: its lease {} is held by incarnation {} on host {:?} (pid {}), renewed {age} s ago (ttl {} s). Give every relay its own relay.id (a StatefulSet, not a Deployment); if that relay is gone, start this one again after {} s",
                mine.relay,
                self.path,
                other.incarnation,
                other.host,
                other.pid,
                other.ttl_secs,
                other.ttl_secs.saturating_sub(age)
            )
        })
    }

    /// Takes the lease unless another live relay holds it. Credentials that may not
    /// read the bucket turn the lease off (logged), rather than stop the sink.
    pub async fn acquire(&self) -> Result<(), LeaseError> {
        // Twice at most: a create that loses a race reads the winner's lease.
        for _ in 0..2 {
            let found = match self.read().await {
                Ok(found) => found,
                Err(LeaseError::Forbidden(e)) => {
                    tracing::error!(lease = %self.path, error = %e, "the credentials may not read the bucket: no relay lease, so a second relay with this relay.id would not be refused (grant GetObject to have it)");
                    self.set_status(Status::Disabled);
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            if let Some(other) = &found {
                if let Some(held) = self.held_by_other(other) {
                    self.set_status(Status::Lost(held.clone()));
                    return Err(LeaseError::Held(held));
                }
                if other.incarnation != self.mine().incarnation {
                    tracing::info!(lease = %self.path, previous = %other.incarnation, previous_host = %other.host,
                        stopped = other.stopped, "taking over the relay lease of an earlier incarnation of this relay id");
                }
            }
            if self.write(false, found.is_none()).await? {
                self.set_status(Status::Held);
                return Ok(());
            }
        }
        Err(LeaseError::Unreachable(format!(
            "the relay lease {} changed while it was being taken; retrying",
            self.path
        )))
    }

    /// Renews a held lease (or takes it, if not yet); finds out if another relay took it
    /// meanwhile.
    pub async fn renew(&self) -> Result<(), LeaseError> {
        match self.status() {
            Status::Lost(m) => Err(LeaseError::Held(m)),
            Status::Disabled => Ok(()),
            Status::NotYet => self.acquire().await,
            Status::Held => {
                if let Some(other) = self.read().await? {
                    if let Some(held) = self.held_by_other(&other) {
                        tracing::error!(lease = %self.path, "{held}; this relay stops uploading to this sink");
                        self.set_status(Status::Lost(held.clone()));
                        return Err(LeaseError::Held(held));
                    }
                }
                self.write(false, false).await.map(|_| ())
            }
        }
    }

    /// Before an upload: `Ok` while this relay holds the lease (taking it now if the
    /// store was unreachable at start).
    pub async fn check(&self) -> Result<(), LeaseError> {
        match self.status() {
            Status::Held | Status::Disabled => Ok(()),
            Status::Lost(m) => Err(LeaseError::Held(m)),
            Status::NotYet => self.acquire().await,
        }
    }

    /// Marks the lease stopped (a clean shutdown), if it is still this relay's: a lease
    /// another relay took meanwhile is left alone.
    pub async fn release(&self) {
        if !matches!(self.status(), Status::Held) {
            return;
        }
        let mine = self.mine();
        match self.read().await {
            Ok(Some(doc))
                if doc.incarnation == mine.incarnation
                    && doc.pid == mine.pid
                    && doc.host == mine.host => {}
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the relay lease at shutdown; it is left to expire");
                return;
            }
        }
        if let Err(e) = self.write(true, false).await {
            tracing::warn!(error = %e, "cannot mark the relay lease stopped; a successor with another data directory waits for its ttl");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    fn lease(store: &Arc<dyn ObjectStore>, incarnation: &str) -> Lease {
        Lease::new(
            store.clone(),
            "logs",
            "r1",
            incarnation,
            Duration::from_secs(60),
        )
    }

    #[tokio::test]
    async fn a_live_lease_of_another_incarnation_is_refused() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let first = lease(&store, "i0000000000000001");
        first.acquire().await.unwrap();
        assert_eq!(first.path().as_ref(), "logs/_sluice/relays/r1.json");
        // The same incarnation (a restart with the data directory) takes it over.
        lease(&store, "i0000000000000001").acquire().await.unwrap();
        let second = lease(&store, "i0000000000000002");
        let err = second.acquire().await.unwrap_err();
        assert!(
            matches!(&err, LeaseError::Held(m) if m.contains("relay id \"r1\" is in use") && m.contains("i0000000000000001")),
            "{err:?}"
        );
        assert!(
            second.check().await.is_err(),
            "a refused relay does not upload"
        );
        // Stopped cleanly: free at once.
        first.release().await;
        let third = lease(&store, "i0000000000000003");
        third.acquire().await.unwrap();
        // The first one, were it still running, finds out at its next renewal.
        assert!(matches!(first.renew().await, Err(LeaseError::Held(_))));
        assert!(first.check().await.is_err());
    }

    #[tokio::test]
    async fn an_expired_lease_is_taken_over() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let old = LeaseDoc {
            relay: "r1".into(),
            incarnation: "i0000000000000001".into(),
            host: "gone".into(),
            pid: 1,
            started_at: 0,
            renewed_at: now_secs() - 61,
            ttl_secs: 60,
            stopped: false,
        };
        store
            .put(
                &lease_path("logs", "r1"),
                PutPayload::from(serde_json::to_vec(&old).unwrap()),
            )
            .await
            .unwrap();
        lease(&store, "i0000000000000002").acquire().await.unwrap();
    }

    /// A copied data directory (same incarnation) on another host is another relay; the
    /// release of a relay whose lease was taken leaves the new holder's lease alone.
    #[tokio::test]
    async fn a_copied_data_directory_is_refused_and_release_is_careful() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let elsewhere = LeaseDoc {
            relay: "r1".into(),
            incarnation: "i0000000000000001".into(),
            host: "some-other-host".into(),
            pid: 1,
            started_at: 0,
            renewed_at: now_secs(),
            ttl_secs: 60,
            stopped: false,
        };
        let path = lease_path("logs", "r1");
        store
            .put(
                &path,
                PutPayload::from(serde_json::to_vec(&elsewhere).unwrap()),
            )
            .await
            .unwrap();
        let copy = lease(&store, "i0000000000000001");
        assert!(matches!(copy.acquire().await, Err(LeaseError::Held(_))));
        // An earlier holder that lost the lease does not mark the new one stopped.
        let old = lease(&store, "i0000000000000002");
        old.set_status(Status::Held);
        old.release().await;
        let now: LeaseDoc =
            serde_json::from_slice(&store.get(&path).await.unwrap().bytes().await.unwrap())
                .unwrap();
        assert_eq!(now, elsewhere);
    }
}
