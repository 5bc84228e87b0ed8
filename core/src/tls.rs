//! rustls configuration from PEM files, for both ends of every sluice hop.
//!
//! The relay serves with [`ServerTlsFiles`] (certificate chain, key, and an optional
//! client CA for mutual TLS). [`ReloadingServerConfig`] re-reads the files when their
//! modification time changes, so certificates can be rotated without a restart: new
//! connections use the new certificate, established ones keep theirs.
//!
//! Errors name the file and what is wrong with it, because a TLS misconfiguration is the
//! most common reason a first deployment does not connect.

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Content { path: PathBuf, what: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Whether the relay asks connecting clients for a certificate.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// No client certificate is requested (authenticate with the shared key instead).
    #[default]
    None,
    /// A client certificate is verified if presented.
    Optional,
    /// Every client must present a certificate signed by `client_ca`.
    Required,
}

/// The relay's TLS files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA bundle that signs client certificates (mutual TLS).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    #[serde(default)]
    pub client_auth: ClientAuth,
}

/// The agent's TLS files for talking to relays.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsFiles {
    /// PEM CA bundle that signs the relays' certificates. Without it the Mozilla roots are used.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Client certificate and key, for relays that require mutual TLS.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// The private key (PEM) of `cert`.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Name to verify the relay's certificate against, when it differs from the host in
    /// the relay address (e.g. connecting by IP).
    #[serde(default)]
    pub server_name: Option<String>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Loads every certificate of a PEM file; an empty file is an error.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut BufReader::new(&bytes[..])).collect();
    let certs = certs.map_err(|e| TlsError::Content {
        path: path.to_owned(),
        what: format!("not a valid PEM certificate file: {e}"),
    })?;
    if certs.is_empty() {
        return Err(TlsError::Content {
            path: path.to_owned(),
            what: "contains no \"BEGIN CERTIFICATE\" block".into(),
        });
    }
    Ok(certs)
}

/// Loads the first private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    rustls_pemfile::private_key(&mut BufReader::new(&bytes[..]))
        .map_err(|e| TlsError::Content {
            path: path.to_owned(),
            what: format!("not a valid PEM key file: {e}"),
        })?
        .ok_or_else(|| TlsError::Content {
            path: path.to_owned(),
            what: "contains no private key (expected a \"BEGIN PRIVATE KEY\" block)".into(),
        })
}

fn root_store(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| TlsError::Content {
            path: path.to_owned(),
            what: format!("unusable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

/// Builds the relay's server configuration.
pub fn server_config(files: &ServerTlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match (files.client_auth, &files.client_ca) {
        (ClientAuth::None, _) => builder.with_no_client_auth(),
        (_, None) => {
            return Err(TlsError::Config(
                "client_auth is optional or required, but no client_ca file is set".into(),
            ))
        }
        (mode, Some(ca)) => {
            let roots = Arc::new(root_store(ca)?);
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider());
            let verifier = if mode == ClientAuth::Optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier
                .build()
                .map_err(|e| TlsError::Config(format!("client verifier: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Content {
            path: files.key.clone(),
            what: format!(
                "key does not match certificate {}: {e}",
                files.cert.display()
            ),
        })?;
    Ok(Arc::new(config))
}

/// Builds the agent's client configuration.
pub fn client_config(files: &ClientTlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = match &files.ca {
        Some(ca) => root_store(ca)?,
        None => RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        },
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots);
    let config = match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|e| TlsError::Content {
                path: key.clone(),
                what: format!("client key does not match {}: {e}", cert.display()),
            })?,
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(TlsError::Config(
                "tls.cert and tls.key must be set together".into(),
            ))
        }
    };
    Ok(Arc::new(config))
}

/// A server configuration that follows its files: [`ReloadingServerConfig::current`]
/// re-reads them when a modification time changed. A reload that fails keeps the
/// previous configuration (and returns the error so the caller can log it), so a
/// half-written certificate never takes the relay down.
pub struct ReloadingServerConfig {
    files: ServerTlsFiles,
    state: Mutex<(Vec<Option<SystemTime>>, Arc<ServerConfig>)>,
}

impl ReloadingServerConfig {
    pub fn new(files: ServerTlsFiles) -> Result<Self, TlsError> {
        let config = server_config(&files)?;
        let stamps = Self::stamps(&files);
        Ok(ReloadingServerConfig {
            files,
            state: Mutex::new((stamps, config)),
        })
    }

    fn stamps(files: &ServerTlsFiles) -> Vec<Option<SystemTime>> {
        [
            Some(&files.cert),
            Some(&files.key),
            files.client_ca.as_ref(),
        ]
        .into_iter()
        .map(|p| p.and_then(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok()))
        .collect()
    }

    /// The configuration to use for the next connection, and the error of a failed
    /// reload if the files changed but could not be loaded.
    pub fn current(&self) -> (Arc<ServerConfig>, Option<TlsError>) {
        let stamps = Self::stamps(&self.files);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if stamps != state.0 {
            match server_config(&self.files) {
                Ok(config) => {
                    tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                    *state = (stamps, config);
                }
                Err(e) => {
                    // Remember the stamps so a broken file is reported once, not per connection.
                    state.0 = stamps;
                    return (state.1.clone(), Some(e));
                }
            }
        }
        (state.1.clone(), None)
    }
}
