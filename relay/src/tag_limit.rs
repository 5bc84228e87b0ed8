//! `server.max_tags_per_client`: tags (and event hours) are chosen by clients, and the
//! ledger counts every (tag, hour) it sees, so one client sending a fresh tag per chunk
//! would grow it without bound. Each client may have at most `max` distinct tags; a
//! chunk with one more is refused (the writer counts and logs it). A tag the client has
//! not sent for the ledger's retention no longer counts ([`TagsPerClient::forget_idle`]).
//!
//! Pure bookkeeping in memory, not persisted: after a restart every client starts with
//! no tags, which is harmless because the ledger forgets hours after its retention too.
//! Memory: at most `max` tags per client known.

use std::collections::HashMap;
use std::hash::Hash;

pub struct TagsPerClient<C> {
    max: usize,
    /// client -> tag -> when it last sent that tag (unix seconds).
    clients: HashMap<C, HashMap<String, u64>>,
}

/// A chunk whose tag would be the client's `max + 1`-th.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyTags {
    pub max: usize,
}

impl<C: Hash + Eq + Clone> TagsPerClient<C> {
    pub fn new(max: usize) -> Self {
        TagsPerClient {
            max,
            clients: HashMap::new(),
        }
    }

    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    /// Whether `client` may send a chunk tagged `tag` at `now`; remembers the tag if so.
    pub fn admit(&mut self, client: &C, tag: &str, now: u64) -> Result<(), TooManyTags> {
        let tags = match self.clients.get_mut(client) {
            Some(tags) => tags,
            None => self.clients.entry(client.clone()).or_default(),
        };
        if let Some(seen) = tags.get_mut(tag) {
            *seen = now;
            return Ok(());
        }
        if tags.len() >= self.max {
            return Err(TooManyTags { max: self.max });
        }
        tags.insert(tag.to_string(), now);
        Ok(())
    }

    /// Forgets tags not sent for more than `retention` seconds, and clients left without
    /// tags.
    pub fn forget_idle(&mut self, now: u64, retention: u64) {
        self.clients.retain(|_, tags| {
            tags.retain(|_, seen| now.saturating_sub(*seen) <= retention);
            !tags.is_empty()
        });
    }

    /// Forgets a client that cannot send again (a closed connection, while connections
    /// stand in for clients).
    pub fn forget_client(&mut self, client: &C) {
        self.clients.remove(client);
    }

    pub fn clients(&self) -> usize {
        self.clients.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_past_its_limit_is_refused_and_others_are_not() {
        let mut t = TagsPerClient::new(2);
        assert!(t.admit(&"a", "x", 0).is_ok());
        assert!(t.admit(&"a", "y", 0).is_ok());
        assert_eq!(t.admit(&"a", "z", 0), Err(TooManyTags { max: 2 }));
        assert!(t.admit(&"a", "x", 1).is_ok(), "known tags go on");
        assert!(
            t.admit(&"b", "z", 0).is_ok(),
            "other clients are not affected"
        );
        // After the retention the idle tag "y" is forgotten, so "z" fits.
        t.forget_idle(100, 50);
        assert_eq!(t.clients(), 0);
        assert!(t.admit(&"a", "z", 100).is_ok());
    }
}
