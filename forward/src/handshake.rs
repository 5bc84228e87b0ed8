//! The optional handshake: the server says HELO (with a nonce), the client answers PING
//! (proving it knows the shared key), the server answers PONG (proving the same).
//!
//! Digests are SHA-512 in lowercase hex over the concatenated bytes, as the spec puts it:
//! `sha512_hex(shared_key_salt + hostname + nonce + shared_key)` and
//! `sha512_hex(auth_salt + username + password)`.

use bytes::BytesMut;
use sha2::{Digest, Sha512};

use crate::error::{malformed, DecodeError};
use crate::limits::MAX_DEPTH;
use crate::msgpack::{
    read_bool, read_bytes, read_key, read_map_len, read_string, write_array_len, write_bin,
    write_bool, write_map_len, write_str, Reader,
};

/// The server's greeting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Helo {
    pub nonce: Vec<u8>,
    /// Salt for the user's password digest; empty when no user authentication is required.
    pub auth_salt: Vec<u8>,
    /// `false`: the server closes the connection after each frame.
    pub keepalive: bool,
}

/// The client's answer to HELO.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ping {
    pub client_hostname: String,
    /// 32 lowercase hex digits when we make it (as Fluentd does), sent as a msgpack str:
    /// Fluent Bit's in_forward refuses a PING whose salt is not a str.
    pub shared_key_salt: Vec<u8>,
    pub shared_key_hexdigest: String,
    /// Empty when the client sends no user (none configured, or none asked for).
    pub username: String,
    /// [`password_digest`], or empty when the client sends no user.
    pub password_digest: String,
}

/// The server's verdict on a PING.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pong {
    pub auth_ok: bool,
    /// Why authentication failed; empty on success.
    pub reason: String,
    pub server_hostname: String,
    pub shared_key_hexdigest: String,
}

fn sha512_hex(parts: &[&[u8]]) -> String {
    let mut hasher = Sha512::new();
    for part in parts {
        hasher.update(part);
    }
    hex(&hasher.finalize())
}

fn hex(bytes: &[u8]) -> String {
    let mut hex = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        hex.push(char::from(b"0123456789abcdef"[(byte >> 4) as usize]));
        hex.push(char::from(b"0123456789abcdef"[(byte & 0x0f) as usize]));
    }
    hex
}

/// The shared-key digest of PING (with the client's hostname) and PONG (with the
/// server's): `sha512_hex(salt + hostname + nonce + shared_key)`.
///
/// ```
/// # use sluice_forward::shared_key_digest;
/// let digest = shared_key_digest(b"salt", "client.example.com", b"nonce", "key");
/// assert_eq!(digest.len(), 128);
/// ```
pub fn shared_key_digest(salt: &[u8], hostname: &str, nonce: &[u8], shared_key: &str) -> String {
    sha512_hex(&[salt, hostname.as_bytes(), nonce, shared_key.as_bytes()])
}

/// The password digest of PING: `sha512_hex(auth_salt + username + password)`.
pub fn password_digest(auth_salt: &[u8], username: &str, password: &str) -> String {
    sha512_hex(&[auth_salt, username.as_bytes(), password.as_bytes()])
}

/// Compares secrets (digests, passwords) in time that depends on their lengths only,
/// never on where the first difference is, so a peer cannot find a digest byte by byte
/// by timing refusals. Lengths are not secret here: digests are always 128 hex digits.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the optimiser from turning the fold into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

impl Helo {
    /// A greeting with a fresh random nonce, and a fresh auth salt when `user_auth`.
    pub fn generate(user_auth: bool, keepalive: bool) -> Self {
        Helo {
            nonce: rand::random::<[u8; 16]>().to_vec(),
            auth_salt: if user_auth {
                rand::random::<[u8; 16]>().to_vec()
            } else {
                Vec::new()
            },
            keepalive,
        }
    }

    pub(crate) fn encode(&self, out: &mut BytesMut) {
        write_array_len(out, 2);
        write_str(out, "HELO");
        write_map_len(out, 3);
        write_str(out, "nonce");
        write_bin(out, &self.nonce);
        write_str(out, "auth");
        write_bin(out, &self.auth_salt);
        write_str(out, "keepalive");
        write_bool(out, self.keepalive);
    }

    /// Reads the options map that follows `"HELO"`.
    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let n = read_map_len(r, "HELO options")?.unwrap_or(0);
        let (mut nonce, mut auth_salt, mut keepalive) = (None, Vec::new(), true);
        for _ in 0..n {
            match read_key(r)? {
                Some(b"nonce") => nonce = Some(read_bytes(r, "HELO nonce")?),
                Some(b"auth") => auth_salt = read_bytes(r, "HELO auth")?,
                Some(b"keepalive") => keepalive = read_bool(r, "HELO keepalive")?,
                _ => {
                    r.value(MAX_DEPTH)?;
                }
            }
        }
        let nonce = nonce.ok_or_else(|| malformed("HELO without nonce"))?;
        Ok(Helo {
            nonce,
            auth_salt,
            keepalive,
        })
    }
}

impl Ping {
    /// The client's answer to `helo`, with a fresh random salt. `user` (name, password)
    /// is sent only when the HELO has an auth salt; without one (`None`), or when the
    /// HELO has no salt, the PING carries an empty user name and an empty password
    /// digest, and the server's PONG decides whether that is enough.
    pub fn new(
        helo: &Helo,
        client_hostname: &str,
        shared_key: &str,
        user: Option<(&str, &str)>,
    ) -> Self {
        // Random bytes as hex text: a str on the wire that every peer accepts.
        let salt = hex(&rand::random::<[u8; 16]>()).into_bytes();
        let (username, password_digest) = match user {
            Some((name, password)) if !helo.auth_salt.is_empty() => (
                name.to_string(),
                password_digest(&helo.auth_salt, name, password),
            ),
            _ => (String::new(), String::new()),
        };
        Ping {
            shared_key_hexdigest: shared_key_digest(
                &salt,
                client_hostname,
                &helo.nonce,
                shared_key,
            ),
            client_hostname: client_hostname.to_string(),
            shared_key_salt: salt,
            username,
            password_digest,
        }
    }

    /// Whether the client knows `shared_key` (the server checks this).
    pub fn shared_key_matches(&self, nonce: &[u8], shared_key: &str) -> bool {
        let expected = shared_key_digest(
            &self.shared_key_salt,
            &self.client_hostname,
            nonce,
            shared_key,
        );
        ct_eq(expected.as_bytes(), self.shared_key_hexdigest.as_bytes())
    }

    /// Whether the password digest matches `password` for `auth_salt` and the username.
    pub fn password_matches(&self, auth_salt: &[u8], password: &str) -> bool {
        let expected = password_digest(auth_salt, &self.username, password);
        ct_eq(expected.as_bytes(), self.password_digest.as_bytes())
    }

    pub(crate) fn encode(&self, out: &mut BytesMut) {
        write_array_len(out, 6);
        write_str(out, "PING");
        write_str(out, &self.client_hostname);
        // Our salts are hex text (see `new`); one that is not UTF-8 can only be bin.
        match std::str::from_utf8(&self.shared_key_salt) {
            Ok(salt) => write_str(out, salt),
            Err(_) => write_bin(out, &self.shared_key_salt),
        }
        write_str(out, &self.shared_key_hexdigest);
        write_str(out, &self.username);
        write_str(out, &self.password_digest);
    }

    /// Reads the five elements that follow `"PING"`.
    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Ping {
            client_hostname: read_string(r, "PING hostname")?,
            shared_key_salt: read_bytes(r, "PING shared_key_salt")?,
            shared_key_hexdigest: read_string(r, "PING shared_key_hexdigest")?,
            username: read_string(r, "PING username")?,
            password_digest: read_string(r, "PING password")?,
        })
    }
}

impl Pong {
    /// The server's answer to `ping`. On failure the digest is left empty, as Fluentd does.
    pub fn new(
        ping: &Ping,
        nonce: &[u8],
        server_hostname: &str,
        shared_key: &str,
        result: Result<(), String>,
    ) -> Self {
        match result {
            Ok(()) => Pong {
                auth_ok: true,
                reason: String::new(),
                server_hostname: server_hostname.to_string(),
                shared_key_hexdigest: shared_key_digest(
                    &ping.shared_key_salt,
                    server_hostname,
                    nonce,
                    shared_key,
                ),
            },
            Err(reason) => Pong {
                auth_ok: false,
                reason,
                server_hostname: server_hostname.to_string(),
                shared_key_hexdigest: String::new(),
            },
        }
    }

    /// Whether the server knows `shared_key` (the client checks this).
    pub fn shared_key_matches(&self, salt: &[u8], nonce: &[u8], shared_key: &str) -> bool {
        let expected = shared_key_digest(salt, &self.server_hostname, nonce, shared_key);
        ct_eq(expected.as_bytes(), self.shared_key_hexdigest.as_bytes())
    }

    pub(crate) fn encode(&self, out: &mut BytesMut) {
        write_array_len(out, 5);
        write_str(out, "PONG");
        write_bool(out, self.auth_ok);
        write_str(out, &self.reason);
        write_str(out, &self.server_hostname);
        write_str(out, &self.shared_key_hexdigest);
    }

    /// Reads the four elements that follow `"PONG"`.
    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Pong {
            auth_ok: read_bool(r, "PONG auth_result")?,
            reason: read_string(r, "PONG reason")?,
            server_hostname: read_string(r, "PONG hostname")?,
            shared_key_hexdigest: read_string(r, "PONG shared_key_hexdigest")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Both literals computed independently with Python:
    //   hashlib.sha512(b'salt-123' + b'client.example.com' + b'\x00\x01nonce\xff'
    //                  + b'secret key').hexdigest()
    //   hashlib.sha512(b'\x10\x20auth' + b'alice' + 'päss'.encode()).hexdigest()
    const SHARED_KEY_DIGEST: &str = "0c66789a4fc8cf4a47f4b51969513fa9b980382d3d070d9e15d7e7d14e3e58c97b3b32f0aa150d69c2fa6c1d4d68cd789159ee1c7c2cea14520e967e1b963c90";
    const PASSWORD_DIGEST: &str = "acc983fb574c162edde6829f4cb9c5084ace0651ea76b073d7d2c8a2bc823d82c5a18a19f6daedde64c346bd88a017672f841a8a1b10113009763687e97fccfb";

    #[test]
    fn digests_match_an_independent_implementation() {
        assert_eq!(
            shared_key_digest(
                b"salt-123",
                "client.example.com",
                b"\x00\x01nonce\xff",
                "secret key"
            ),
            SHARED_KEY_DIGEST
        );
        assert_eq!(
            password_digest(b"\x10\x20auth", "alice", "p\u{e4}ss"),
            PASSWORD_DIGEST
        );
    }

    #[test]
    fn ping_and_pong_verify_each_other() {
        let helo = Helo::generate(true, true);
        assert_eq!((helo.nonce.len(), helo.auth_salt.len()), (16, 16));
        let ping = Ping::new(&helo, "agent-1", "k", Some(("alice", "pw")));
        assert!(ping.shared_key_matches(&helo.nonce, "k"));
        assert!(!ping.shared_key_matches(&helo.nonce, "other"));
        assert!(ping.password_matches(&helo.auth_salt, "pw"));
        assert!(!ping.password_matches(&helo.auth_salt, "pw2"));
        let pong = Pong::new(&ping, &helo.nonce, "relay-1", "k", Ok(()));
        assert!(pong.auth_ok);
        assert!(pong.shared_key_matches(&ping.shared_key_salt, &helo.nonce, "k"));
        assert!(!pong.shared_key_matches(&ping.shared_key_salt, &helo.nonce, "x"));
        let denied = Pong::new(&ping, &helo.nonce, "relay-1", "k", Err("no".into()));
        assert!(!denied.auth_ok && denied.shared_key_hexdigest.is_empty());
        assert!(Helo::generate(false, true).auth_salt.is_empty());
    }

    #[test]
    fn ping_salt_is_a_hex_str_and_no_user_means_empty_fields() {
        let helo = Helo::generate(true, true);
        let ping = Ping::new(&helo, "agent-1", "k", None);
        assert_eq!(ping.shared_key_salt.len(), 32);
        assert!(ping.shared_key_salt.iter().all(u8::is_ascii_hexdigit));
        assert_eq!(
            (ping.username.as_str(), ping.password_digest.as_str()),
            ("", "")
        );
        let mut out = BytesMut::new();
        ping.encode(&mut out);
        // [fixarray 6, "PING", hostname, salt as a 32-byte str (0xd9 0x20), ...]
        let salt_at = 1 + 5 + 1 + "agent-1".len();
        assert_eq!(&out[salt_at..salt_at + 2], &[0xd9, 0x20]);
        // A user is sent only when the HELO asks for one.
        let no_salt = Helo::generate(false, true);
        let ping = Ping::new(&no_salt, "agent-1", "k", Some(("alice", "pw")));
        assert_eq!(
            (ping.username.as_str(), ping.password_digest.as_str()),
            ("", "")
        );
    }
}
