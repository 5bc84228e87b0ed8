//! The HTTP endpoint every sluice process serves: `/metrics` (Prometheus text format),
//! `/health` (the process runs) and `/ready` (it accepts and delivers data).
//!
//! Each binary builds its own [`prometheus_client::registry::Registry`] with the metrics
//! of its stages and hands it to [`serve`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Readiness: ready once inputs and outputs are up (the binary's [`set`](Self::set)), not
/// while shutting down, and not while the relay's spool refuses writes (full, or its
/// appends and commits failing: [`set_refusing`](Self::set_refusing)), so that a load
/// balancer or Kubernetes sends new agents elsewhere while this relay cannot take data.
#[derive(Debug, Default)]
pub struct Readiness {
    started: AtomicBool,
    refusing: AtomicBool,
    /// Destinations failing with an error someone must fix (refused credentials or
    /// permissions, a missing topic), with the error: data only piles up in the spool.
    failing: std::sync::Mutex<std::collections::BTreeMap<String, String>>,
}

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.started.store(ready, Ordering::Relaxed)
    }
    /// The spool refuses writes (`true`) or takes them again (`false`).
    pub fn set_refusing(&self, refusing: bool) {
        self.refusing.store(refusing, Ordering::Relaxed)
    }
    /// A destination fails with an error that needs someone to act (`Some(error)`), or
    /// delivers again (`None`).
    pub fn set_failing(&self, what: &str, error: Option<&str>) {
        let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        match error {
            Some(e) => failing.insert(what.to_string(), e.to_string()),
            None => failing.remove(what),
        };
    }
    pub fn get(&self) -> bool {
        self.started.load(Ordering::Relaxed)
            && !self.refusing.load(Ordering::Relaxed)
            && self
                .failing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
    }
    fn reason(&self) -> String {
        if !self.started.load(Ordering::Relaxed) {
            return "not ready: starting or stopping\n".into();
        }
        if self.refusing.load(Ordering::Relaxed) {
            return "not ready: the spool refuses writes (full, or failing); see sluice_relay_spool_full and sluice_relay_spool_errors_total\n".into();
        }
        let failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::from(
            "not ready: a destination fails until someone acts (data waits in the spool):\n",
        );
        for (what, error) in failing.iter() {
            out.push_str(&format!("  {what}: {error}\n"));
        }
        out
    }
}

/// Renders the registry in the Prometheus text exposition format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::with_capacity(16 * 1024);
    // Encoding into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// The `[metrics] listen` of either binary: serves there (and says where) when set,
/// does nothing when unset.
pub async fn serve_if_configured(
    listen: Option<SocketAddr>,
    registry: Registry,
    ready: Arc<Readiness>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let Some(addr) = listen else { return Ok(()) };
    let bound = serve(addr, Arc::new(registry), ready, cancel)
        .await
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot bind the metrics endpoint {addr}: {e}"),
            )
        })?;
    tracing::info!(%bound, "metrics endpoint listening");
    Ok(())
}

/// Binds `addr` and serves until `cancel` fires. Returns the bound address (so tests can
/// ask for port 0).
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
    ready: Arc<Readiness>,
    cancel: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = cancel.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics endpoint: accept failed");
                        continue;
                    }
                },
            };
            let registry = registry.clone();
            let ready = ready.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let registry = registry.clone();
                    let ready = ready.clone();
                    async move { Ok::<_, Infallible>(respond(req.uri().path(), &registry, &ready)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(local)
}

fn respond(path: &str, registry: &Registry, ready: &Readiness) -> Response<Full<Bytes>> {
    let (status, body, content_type) = match path {
        "/metrics" => (
            StatusCode::OK,
            render(registry),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        "/health" => (StatusCode::OK, "ok\n".to_string(), "text/plain"),
        "/ready" if ready.get() => (StatusCode::OK, "ready\n".to_string(), "text/plain"),
        "/ready" => (
            StatusCode::SERVICE_UNAVAILABLE,
            ready.reason().to_string(),
            "text/plain",
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "not found\n".to_string(),
            "text/plain",
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, v);
    }
    response
}
