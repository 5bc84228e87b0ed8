//! The HELO/PING/PONG handshake as a sans-IO state machine, one for each end.
//!
//! Each state is a type and each transition consumes it, so the order of the protocol is
//! checked by the compiler rather than by the caller: a client cannot build a PING
//! without the HELO it answers, cannot check a PONG it has not asked for, and the only
//! way to obtain an [`Authenticated`] (client side) or [`AuthenticatedClient`] (server
//! side) is to go through the whole exchange. No I/O happens here; the caller moves the
//! messages (with [`ClientCodec`](crate::ClientCodec) / [`ServerCodec`](crate::ServerCodec)
//! or anything else) and applies its own timeouts.
//!
//! ```text
//! server: ServerHandshake::new ──helo()──► HELO ─────────────────────► client: ClientHandshake::new
//!                                                                           │ ping()
//!         receive_ping(PING, keys) ◄──────────────────── PING ◄─────────────┘
//!           │ Verdict::{Accepted, Refused}                                  AwaitingPong
//!           └──────────────────────────► PONG ─────────────────────────────► receive_pong()
//!                                                                           │
//!                                                                           ▼ Authenticated
//! ```
//!
//! A HELO's auth salt is an offer, not a demand: Fluent Bit's in_forward sends one in
//! every HELO and checks users only when it has some. A client without a user answers
//! with an empty user name and an empty password digest and lets the PONG decide, as
//! Fluentd's out_forward does (it sends the digest of the empty name and password, which
//! proves no more than an empty field); it never refuses to answer a HELO.
//!
//! Security properties kept here, whatever the caller does:
//!
//! - A refused PONG carries an **empty** digest (as Fluentd does). Sending the digest of
//!   the key for a salt the client chose would hand an unauthenticated peer a value it
//!   can test key guesses against offline.
//! - Every digest and password comparison is constant-time ([`ct_eq`]).
//! - Refusal details (unknown host, which user) are for the server's log only; the PONG
//!   says just "shared key mismatch" or "user authentication failed".
//!
//! ```
//! use sluice_forward::*;
//!
//! struct Keys;
//! impl KeyLookup for Keys {
//!     fn shared_key(&self, _client_hostname: &str) -> SharedKey<'_> { SharedKey::Default("k") }
//!     fn password(&self, _username: &str) -> Option<&str> { None }
//! }
//!
//! let server = ServerHandshake::new("relay-1", false);
//! let client = ClientHandshake::new(server.helo().clone());
//! let (ping, client) = client.ping("agent-1", "k", None);
//! let Verdict::Accepted { pong, client: who } = server.receive_ping(ping, &Keys) else { panic!() };
//! assert_eq!(who.hostname(), "agent-1");
//! let done = client.receive_pong(pong).unwrap();
//! assert_eq!(done.server_hostname(), "relay-1");
//! ```

use crate::handshake::{Helo, Ping, Pong};

/// The PONG reason when the shared key is wrong (or the client unknown).
const KEY_REFUSED: &str = "shared key mismatch";
/// The PONG reason when the key is right but the user or password is not.
const USER_REFUSED: &str = "user authentication failed";

// ---- client -------------------------------------------------------------------------------

/// The client's first state: a HELO has arrived.
#[derive(Debug)]
pub struct ClientHandshake {
    helo: Helo,
}

/// The client has sent its PING and waits for the verdict.
#[derive(Debug)]
pub struct AwaitingPong {
    nonce: Vec<u8>,
    salt: Vec<u8>,
    shared_key: String,
    /// Our own hostname: a PONG claiming it is our PING's digest reflected back.
    client_hostname: String,
    /// The HELO had an auth salt and we sent no user: said on a refusal.
    user_offered_but_none_sent: bool,
}

/// The client end after a successful handshake: the server knows our key and we know
/// it knows it.
#[derive(Debug)]
pub struct Authenticated {
    server_hostname: String,
}

/// Why the client side of the handshake failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientHandshakeError {
    /// The PONG says no; `reason` is the server's (deliberately vague) word for it.
    /// `without_user`: its HELO had an auth salt and we sent no user name, so a missing
    /// user may be why (or the shared key: only the server knows).
    #[error("the server refused the handshake: {reason:?}")]
    Refused { reason: String, without_user: bool },
    /// The PONG says yes but its digest is wrong: the server does not know our key.
    #[error("the server's PONG digest is wrong: it does not know our shared key")]
    WrongDigest,
    /// The PONG names our own hostname: the two digests differ only in the hostname, so
    /// a server that does not know the key could pass by echoing our PING's digest.
    /// Refused, as Fluentd's out_forward does.
    #[error("the server's PONG claims our own hostname: refused (a reflected PING digest proves nothing)")]
    SameHostname,
}

impl ClientHandshake {
    pub fn new(helo: Helo) -> Self {
        ClientHandshake { helo }
    }

    /// Whether the HELO carries an auth salt, i.e. the server *may* check a user name
    /// and password. It is an offer, not a requirement: Fluent Bit's in_forward sends a
    /// salt in every HELO and checks users only when it has some, and a sluice relay
    /// sends one only when `server.users` is set. Only the PONG says what was needed.
    pub fn offers_user_auth(&self) -> bool {
        !self.helo.auth_salt.is_empty()
    }

    /// Answers the HELO with a PING for `shared_key`, under a fresh random salt.
    /// `user` (name, password) is sent only when the HELO has an auth salt. With a salt
    /// and no `user` the PING carries an empty user name and an empty password digest,
    /// as Fluentd's out_forward does without a user: a server without users accepts
    /// that, one with users refuses it in its PONG ([`ClientHandshakeError::Refused`]
    /// with `without_user`).
    pub fn ping(
        self,
        client_hostname: &str,
        shared_key: &str,
        user: Option<(&str, &str)>,
    ) -> (Ping, AwaitingPong) {
        let user_offered_but_none_sent = self.offers_user_auth() && user.is_none();
        let ping = Ping::new(&self.helo, client_hostname, shared_key, user);
        let next = AwaitingPong {
            nonce: self.helo.nonce,
            salt: ping.shared_key_salt.clone(),
            shared_key: shared_key.to_string(),
            client_hostname: client_hostname.to_string(),
            user_offered_but_none_sent,
        };
        (ping, next)
    }
}

impl AwaitingPong {
    /// Checks the verdict and, on success, the server's proof that it knows the key.
    pub fn receive_pong(self, pong: Pong) -> Result<Authenticated, ClientHandshakeError> {
        if !pong.auth_ok {
            return Err(ClientHandshakeError::Refused {
                reason: pong.reason,
                without_user: self.user_offered_but_none_sent,
            });
        }
        if pong.server_hostname == self.client_hostname {
            return Err(ClientHandshakeError::SameHostname);
        }
        if !pong.shared_key_matches(&self.salt, &self.nonce, &self.shared_key) {
            return Err(ClientHandshakeError::WrongDigest);
        }
        Ok(Authenticated {
            server_hostname: pong.server_hostname,
        })
    }
}

impl Authenticated {
    /// The hostname the server proved its key with.
    pub fn server_hostname(&self) -> &str {
        &self.server_hostname
    }
}

// ---- server -------------------------------------------------------------------------------

/// Where the server's keys and users come from (its configuration).
pub trait KeyLookup {
    /// The shared key a client with this hostname must prove it knows.
    fn shared_key(&self, client_hostname: &str) -> SharedKey<'_>;
    /// The password of `username`; `None` for an unknown user.
    fn password(&self, username: &str) -> Option<&str>;
}

/// Which key a client hostname must use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SharedKey<'a> {
    /// A key configured for this hostname only.
    Own(&'a str),
    /// The key every client without its own uses.
    Default(&'a str),
    /// No key for this client: it cannot authenticate.
    Unknown,
}

/// The server's only state before a verdict: HELO made (fresh nonce, and a fresh salt
/// for password digests when users are required), PING awaited.
#[derive(Debug)]
pub struct ServerHandshake {
    helo: Helo,
    hostname: String,
}

/// Who the server let in.
#[derive(Debug)]
pub struct AuthenticatedClient {
    hostname: String,
    username: String,
}

/// Why the server refused a PING: for the server's log, never sent to the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The client has its own key and the PING does not prove it.
    OwnKeyMismatch,
    /// The PING does not prove the default key.
    KeyMismatch,
    /// The client has no own key and there is no default key.
    UnknownClient,
    /// Users are required and the PING names none.
    NoUsername,
    UnknownUser(String),
    WrongPassword(String),
}

/// The server's decision on a PING. Either way `pong` must be sent; after `Refused`
/// the connection is closed.
#[derive(Debug)]
pub enum Verdict {
    Accepted {
        pong: Pong,
        client: AuthenticatedClient,
    },
    Refused {
        pong: Pong,
        /// The PING's hostname, for the log line.
        client_hostname: String,
        refusal: Refusal,
    },
}

impl ServerHandshake {
    /// A handshake with a fresh HELO; `require_users` adds the auth salt that asks the
    /// client for a user name and password digest.
    pub fn new(server_hostname: &str, require_users: bool) -> Self {
        ServerHandshake {
            helo: Helo::generate(require_users, true),
            hostname: server_hostname.to_string(),
        }
    }

    /// The HELO to send first.
    pub fn helo(&self) -> &Helo {
        &self.helo
    }

    /// Decides on the client's PING and makes the PONG that says so.
    pub fn receive_ping(self, ping: Ping, keys: &impl KeyLookup) -> Verdict {
        let lookup = keys.shared_key(&ping.client_hostname);
        let key = match lookup {
            SharedKey::Own(key) | SharedKey::Default(key) => Some(key),
            SharedKey::Unknown => None,
        };
        let key_ok = key.is_some_and(|key| ping.shared_key_matches(&self.helo.nonce, key));
        let refusal = match (key_ok, lookup) {
            (true, _) => self.user_refusal(&ping, keys),
            (false, SharedKey::Own(_)) => Some(Refusal::OwnKeyMismatch),
            (false, SharedKey::Default(_)) => Some(Refusal::KeyMismatch),
            (false, SharedKey::Unknown) => Some(Refusal::UnknownClient),
        };
        let result = match &refusal {
            None => Ok(()),
            Some(_) if key_ok => Err(USER_REFUSED.to_string()),
            Some(_) => Err(KEY_REFUSED.to_string()),
        };
        // On a refusal Pong::new leaves the digest empty: see the module docs.
        let pong = Pong::new(
            &ping,
            &self.helo.nonce,
            &self.hostname,
            key.unwrap_or_default(),
            result,
        );
        match refusal {
            None => Verdict::Accepted {
                pong,
                client: AuthenticatedClient {
                    hostname: ping.client_hostname,
                    username: ping.username,
                },
            },
            Some(refusal) => Verdict::Refused {
                pong,
                client_hostname: ping.client_hostname,
                refusal,
            },
        }
    }

    fn user_refusal(&self, ping: &Ping, keys: &impl KeyLookup) -> Option<Refusal> {
        if self.helo.auth_salt.is_empty() {
            return None;
        }
        if ping.username.is_empty() {
            return Some(Refusal::NoUsername);
        }
        match keys.password(&ping.username) {
            None => Some(Refusal::UnknownUser(ping.username.clone())),
            Some(password) if !ping.password_matches(&self.helo.auth_salt, password) => {
                Some(Refusal::WrongPassword(ping.username.clone()))
            }
            Some(_) => None,
        }
    }
}

impl Verdict {
    /// The PONG to send, whatever the verdict.
    pub fn pong(&self) -> &Pong {
        match self {
            Verdict::Accepted { pong, .. } | Verdict::Refused { pong, .. } => pong,
        }
    }
}

impl AuthenticatedClient {
    /// The hostname the client proved its key for; it names the client from here on.
    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    /// The user it authenticated as; empty when the server requires no users.
    pub fn username(&self) -> &str {
        &self.username
    }

    pub fn into_hostname(self) -> String {
        self.hostname
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::handshake::{ct_eq, shared_key_digest};

    #[derive(Default)]
    struct Keys {
        default: Option<&'static str>,
        own: BTreeMap<&'static str, &'static str>,
        users: BTreeMap<&'static str, &'static str>,
    }

    impl KeyLookup for Keys {
        fn shared_key(&self, client_hostname: &str) -> SharedKey<'_> {
            match (self.own.get(client_hostname), self.default) {
                (Some(key), _) => SharedKey::Own(key),
                (None, Some(key)) => SharedKey::Default(key),
                (None, None) => SharedKey::Unknown,
            }
        }

        fn password(&self, username: &str) -> Option<&str> {
            self.users.get(username).copied()
        }
    }

    fn keys(default: &'static str) -> Keys {
        Keys {
            default: Some(default),
            ..Keys::default()
        }
    }

    /// Runs both ends; returns the server's verdict and the client's result.
    fn run(
        keys: &Keys,
        hostname: &str,
        client_key: &str,
        user: Option<(&str, &str)>,
    ) -> (Verdict, Result<Authenticated, ClientHandshakeError>) {
        let server = ServerHandshake::new("relay-1", !keys.users.is_empty());
        let client = ClientHandshake::new(server.helo().clone());
        let (ping, client) = client.ping(hostname, client_key, user);
        let verdict = server.receive_ping(ping, keys);
        let result = client.receive_pong(verdict.pong().clone());
        (verdict, result)
    }

    #[test]
    fn the_right_key_authenticates_both_ends() {
        let (verdict, client) = run(&keys("k"), "agent-1", "k", None);
        let Verdict::Accepted { pong, client: who } = verdict else {
            panic!("refused: {verdict:?}")
        };
        assert!(pong.auth_ok && pong.reason.is_empty());
        assert_eq!(pong.shared_key_hexdigest.len(), 128);
        assert_eq!((who.hostname(), who.username()), ("agent-1", ""));
        assert_eq!(client.unwrap().server_hostname(), "relay-1");
    }

    #[test]
    fn a_wrong_key_is_refused_with_an_empty_digest() {
        let (verdict, client) = run(&keys("k"), "agent-1", "guess", None);
        let Verdict::Refused {
            pong,
            client_hostname,
            refusal,
        } = verdict
        else {
            panic!("accepted a wrong key")
        };
        assert!(!pong.auth_ok);
        assert_eq!(pong.reason, "shared key mismatch");
        assert_eq!(
            pong.shared_key_hexdigest, "",
            "no digest of the key on failure"
        );
        assert_eq!(
            (client_hostname.as_str(), refusal),
            ("agent-1", Refusal::KeyMismatch)
        );
        assert_eq!(
            client.unwrap_err(),
            ClientHandshakeError::Refused {
                reason: "shared key mismatch".into(),
                without_user: false,
            }
        );
    }

    #[test]
    fn own_keys_and_unknown_clients() {
        let mut k = keys("default");
        k.own.insert("agent-a", "key of a");
        assert!(matches!(
            run(&k, "agent-a", "key of a", None).0,
            Verdict::Accepted { .. }
        ));
        let refused = |v: Verdict| match v {
            Verdict::Refused { refusal, pong, .. } => {
                assert!(pong.shared_key_hexdigest.is_empty());
                refusal
            }
            Verdict::Accepted { .. } => panic!("accepted"),
        };
        // A client with its own key may not use the default one.
        assert_eq!(
            refused(run(&k, "agent-a", "default", None).0),
            Refusal::OwnKeyMismatch
        );
        k.default = None;
        assert_eq!(
            refused(run(&k, "stranger", "anything", None).0),
            Refusal::UnknownClient
        );
    }

    #[test]
    fn users_and_passwords() {
        let mut k = keys("k");
        k.users.insert("alice", "s3cret");
        let (verdict, client) = run(&k, "agent-1", "k", Some(("alice", "s3cret")));
        assert!(client.is_ok());
        let Verdict::Accepted { client: who, .. } = verdict else {
            panic!("refused alice")
        };
        assert_eq!(who.username(), "alice");

        for (user, refusal) in [
            (("alice", "wrong"), Refusal::WrongPassword("alice".into())),
            (("bob", "s3cret"), Refusal::UnknownUser("bob".into())),
            (("", ""), Refusal::NoUsername),
        ] {
            let (verdict, client) = run(&k, "agent-1", "k", Some(user));
            let Verdict::Refused {
                pong, refusal: r, ..
            } = verdict
            else {
                panic!("accepted {user:?}")
            };
            assert_eq!(r, refusal);
            assert_eq!(pong.reason, "user authentication failed");
            assert!(pong.shared_key_hexdigest.is_empty());
            assert!(matches!(client, Err(ClientHandshakeError::Refused { .. })));
        }

        // Without a user the client still answers, with an empty one, and the relay's
        // PONG says no; the client's error says it sent none.
        let (verdict, client) = run(&k, "agent-1", "k", None);
        let Verdict::Refused { refusal, .. } = verdict else {
            panic!("accepted a PING without a user although users are required")
        };
        assert_eq!(refusal, Refusal::NoUsername);
        assert_eq!(
            client.unwrap_err(),
            ClientHandshakeError::Refused {
                reason: "user authentication failed".into(),
                without_user: true,
            }
        );
    }

    /// A sluice relay with a shared key and no users sends no auth salt, and accepts a
    /// PING with an empty user name (and would ignore a user if one were sent).
    #[test]
    fn a_relay_without_users_sends_no_auth_salt_and_accepts_an_empty_user() {
        let server = ServerHandshake::new("relay-1", false);
        assert!(server.helo().auth_salt.is_empty());
        let client = ClientHandshake::new(server.helo().clone());
        assert!(!client.offers_user_auth());
        let (ping, client) = client.ping("agent-1", "k", None);
        assert_eq!(
            (ping.username.as_str(), ping.password_digest.as_str()),
            ("", "")
        );
        let verdict = server.receive_ping(ping, &keys("k"));
        let Verdict::Accepted { pong, client: who } = verdict else {
            panic!("refused an empty user: {verdict:?}")
        };
        assert_eq!(who.username(), "");
        assert!(client.receive_pong(pong).is_ok());
    }

    #[test]
    fn user_credentials_are_not_sent_unless_asked_for() {
        let server = ServerHandshake::new("relay-1", false);
        let client = ClientHandshake::new(server.helo().clone());
        let (ping, _) = client.ping("agent-1", "k", Some(("alice", "pw")));
        assert_eq!(
            (ping.username.as_str(), ping.password_digest.as_str()),
            ("", "")
        );
    }

    /// Fluent Bit's in_forward puts an auth salt in every HELO, with or without users
    /// (plugins/in_forward/fw_prot.c, send_helo), and checks users only when it has
    /// some. A client without a user must still answer, as Fluentd's out_forward does,
    /// and let the PONG decide.
    #[test]
    fn an_auth_salt_without_a_configured_user_still_gets_a_ping() {
        let helo = Helo {
            nonce: b"0123456789abcdef".to_vec(),
            auth_salt: b"fedcba9876543210".to_vec(),
            keepalive: true,
        };
        // Before the fix this was an error (CredentialsRequired) and no PING was sent.
        let (ping, client) = ClientHandshake::new(helo.clone()).ping("agent-1", "k", None);
        assert_eq!(
            (ping.username.as_str(), ping.password_digest.as_str()),
            ("", ""),
            "no user: empty user name and empty password digest"
        );
        assert!(ping.shared_key_matches(&helo.nonce, "k"));
        // The PONG of a server that has no users and knows the key.
        let pong = Pong::new(&ping, &helo.nonce, "fluent-bit", "k", Ok(()));
        let done = client.receive_pong(pong).expect("authenticated");
        assert_eq!(done.server_hostname(), "fluent-bit");
    }

    #[test]
    fn a_ping_for_another_nonce_is_refused() {
        let server = ServerHandshake::new("relay-1", false);
        let other = ServerHandshake::new("relay-1", false);
        assert_ne!(server.helo().nonce, other.helo().nonce, "nonces are fresh");
        // A PING replayed from another connection (another nonce) proves nothing.
        let (ping, _) = ClientHandshake::new(other.helo().clone()).ping("agent-1", "k", None);
        assert!(matches!(
            server.receive_ping(ping, &keys("k")),
            Verdict::Refused {
                refusal: Refusal::KeyMismatch,
                ..
            }
        ));
    }

    #[test]
    fn a_pong_for_another_nonce_is_not_trusted() {
        let server = ServerHandshake::new("relay-1", false);
        let (ping, client) = ClientHandshake::new(server.helo().clone()).ping("agent-1", "k", None);
        // A PONG that says yes with a digest for another nonce (replayed from another
        // connection, or made by someone who does not know the key).
        let forged = Pong {
            auth_ok: true,
            reason: String::new(),
            server_hostname: "relay-1".into(),
            shared_key_hexdigest: shared_key_digest(
                &ping.shared_key_salt,
                "relay-1",
                &[0; 16],
                "k",
            ),
        };
        assert_eq!(
            client.receive_pong(forged).unwrap_err(),
            ClientHandshakeError::WrongDigest
        );
    }

    /// A fake relay that does not know the key echoes our PING's digest under our own
    /// hostname: the digests differ only in the hostname, so it would verify. Refused.
    #[test]
    fn a_pong_reflecting_our_own_ping_is_refused() {
        let server = ServerHandshake::new("relay-1", false);
        let (ping, client) = ClientHandshake::new(server.helo().clone()).ping("agent-1", "k", None);
        let reflected = Pong {
            auth_ok: true,
            reason: String::new(),
            server_hostname: "agent-1".into(),
            shared_key_hexdigest: ping.shared_key_hexdigest.clone(),
        };
        assert_eq!(
            client.receive_pong(reflected).unwrap_err(),
            ClientHandshakeError::SameHostname
        );
    }

    #[test]
    fn ct_eq_compares_whole_slices() {
        assert!(ct_eq(b"", b""));
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
        assert!(!ct_eq(b"xbc", b"abc"));
    }
}
