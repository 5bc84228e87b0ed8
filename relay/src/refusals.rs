//! Backing off an address whose frames keep being refused (`server.refusal_backoff`).
//!
//! A client that sends a frame the relay refuses (over `max_frame` or `max_decompressed`,
//! or not a Forward frame) has its connection closed; nothing stops it from reconnecting
//! at once and sending the same gzip bomb again, each time costing a TLS handshake and,
//! for a bomb whose trailer lies, an inflate. After [`STREAK`] such refusals in a row
//! from one address, its new connections are closed right after the accept, before TLS,
//! for `refusal_backoff`, doubling with every further refusal up to [`MAX_BACKOFF`].
//! A connection from the address that ends without a refusal clears the streak.
//! Connections already open are not touched, so a well-behaved client sharing the
//! address (NAT) keeps its connection; a new one waits out the backoff, nothing is lost.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Refusals in a row before an address is backed off: one bad frame (a misconfigured
/// client, a port scan) costs nothing more than its own connection.
pub const STREAK: u32 = 3;
/// The longest backoff.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

pub struct Refusals {
    base: Duration,
    table: Mutex<HashMap<IpAddr, Streak>>,
}

#[derive(Clone, Copy)]
struct Streak {
    count: u32,
    /// When the last refusal was.
    last: Instant,
    /// The end of the backoff in force, if one is.
    until: Option<Instant>,
}

impl Refusals {
    /// `base` zero turns backing off off.
    pub fn new(base: Duration) -> Refusals {
        Refusals {
            base,
            table: Mutex::new(HashMap::new()),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Streak>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How much longer new connections from `ip` are refused, if they are.
    pub fn blocked(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let until = self.table().get(&ip)?.until?;
        until.checked_duration_since(now).filter(|d| !d.is_zero())
    }

    /// A connection from `ip` was closed for a refused frame. Returns the backoff that
    /// starts now, if this refusal starts or extends one.
    pub fn refused(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        if self.base.is_zero() {
            return None;
        }
        let mut table = self.table();
        let streak = table.entry(ip).or_insert(Streak {
            count: 0,
            last: now,
            until: None,
        });
        streak.count = streak.count.saturating_add(1);
        streak.last = now;
        if streak.count < STREAK {
            return None;
        }
        let doublings = (streak.count - STREAK).min(16);
        let backoff = self.base.saturating_mul(1 << doublings).min(MAX_BACKOFF);
        streak.until = Some(now + backoff);
        Some(backoff)
    }

    /// A connection from `ip` ended without a refusal.
    pub fn cleared(&self, ip: IpAddr) {
        let mut table = self.table();
        if !table.is_empty() {
            table.remove(&ip);
        }
    }

    /// Forgets addresses that were last refused (or whose backoff ended) more than
    /// [`MAX_BACKOFF`] ago: the table holds only the addresses that misbehaved lately.
    pub fn forget_expired(&self, now: Instant) {
        self.table()
            .retain(|_, s| now < s.until.unwrap_or(s.last).max(s.last) + MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streak_of_refusals_backs_an_address_off_and_doubles() {
        let r = Refusals::new(Duration::from_secs(1));
        let (ip, other): (IpAddr, IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t = Instant::now();
        assert_eq!(r.refused(ip, t), None);
        assert_eq!(
            r.refused(ip, t),
            None,
            "two refusals cost only their connections"
        );
        assert_eq!(r.blocked(ip, t), None);
        assert_eq!(r.refused(ip, t), Some(Duration::from_secs(1)));
        assert_eq!(r.blocked(ip, t), Some(Duration::from_secs(1)));
        assert_eq!(
            r.blocked(other, t),
            None,
            "other addresses are not affected"
        );
        assert_eq!(
            r.blocked(ip, t + Duration::from_secs(1)),
            None,
            "over after the backoff"
        );
        assert_eq!(r.refused(ip, t), Some(Duration::from_secs(2)), "doubles");
        for _ in 0..20 {
            r.refused(ip, t);
        }
        assert_eq!(r.blocked(ip, t), Some(MAX_BACKOFF), "capped");
        r.cleared(ip);
        assert_eq!(r.blocked(ip, t), None, "a good connection clears it");
        assert_eq!(r.refused(ip, t), None, "and the streak starts over");
    }

    #[test]
    fn a_zero_backoff_never_blocks_and_expired_entries_go() {
        let ip: IpAddr = "::1".parse().unwrap();
        let t = Instant::now();
        let off = Refusals::new(Duration::ZERO);
        for _ in 0..10 {
            assert_eq!(off.refused(ip, t), None);
        }
        let r = Refusals::new(Duration::from_secs(1));
        for _ in 0..STREAK {
            r.refused(ip, t);
        }
        r.refused("10.9.9.9".parse().unwrap(), t); // one refusal, no backoff
        r.forget_expired(t + Duration::from_secs(1) + MAX_BACKOFF);
        assert!(r.table().is_empty());
    }
}
