//! The relay's memory budget for ingest, and the pool that decodes frames.
//!
//! **Budget** (`server.max_inflight_bytes`): every byte a connection buffers of a frame
//! beyond its first [`FREE_BUFFER`], every decoded batch from the moment it is decoded
//! until the spool writer has appended it, is held as budget, across all connections.
//! A connection that needs more waits for it before reading (TCP flow control then slows
//! the client) or before decoding. That makes the relay's ingest memory a number:
//! `max_inflight_bytes + max_connections × 128 KiB + (decode_threads + 1) ×
//! max_decompressed`: 128 KiB a connection covers its free read window, its TLS buffers
//! and its task (measured about 110 KiB); the last term is what decoding and the spool
//! writer's record buffer may hold beside the budget while allocator and copies catch up.
//! The sinks add their own delivery buffers (docs/relay.md).
//!
//! **Decode pool** (`server.decode_threads`): inflating and decoding run on blocking
//! threads, at most `decode_threads` at a time, never on the async workers that serve
//! TLS, handshakes and acks; so a client's gzip bomb costs that client's frame a pool
//! slot, not everyone's latency.

use std::sync::Arc;

use tokio::sync::Semaphore;

/// What a connection may buffer without budget: one read window. Handshakes and small
/// frames never wait for budget.
pub const FREE_BUFFER: usize = 64 * 1024;

/// The shared budget of bytes.
#[derive(Clone)]
pub struct Budget {
    permits: Arc<Semaphore>,
    total: usize,
}

/// A share of the [`Budget`], given back when dropped.
pub struct Held {
    permits: Arc<Semaphore>,
    bytes: usize,
}

impl Budget {
    pub fn new(bytes: usize) -> Budget {
        let total = bytes.min(Semaphore::MAX_PERMITS);
        Budget {
            permits: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// An empty share, to grow.
    pub fn none(&self) -> Held {
        Held {
            permits: self.permits.clone(),
            bytes: 0,
        }
    }

    /// Bytes held by all connections now.
    pub fn in_use(&self) -> usize {
        self.total - self.permits.available_permits()
    }

    /// Grows `held` to `to` bytes (capped at the whole budget, so one share can always be
    /// granted eventually), waiting until that much is free. Cancel-safe: a wait that is
    /// dropped takes nothing.
    pub async fn grow(&self, held: &mut Held, to: usize) {
        let to = to.min(self.total);
        while held.bytes < to {
            // acquire_many takes a u32; a budget over 4 GiB is granted in steps.
            let step = (to - held.bytes).min(u32::MAX as usize) as u32;
            match self.permits.acquire_many(step).await {
                Ok(p) => {
                    p.forget();
                    held.bytes += step as usize;
                }
                Err(_) => return, // never closed
            }
        }
    }

    /// Grows `held` to `to` bytes if that much is free now.
    pub fn try_grow(&self, held: &mut Held, to: usize) -> bool {
        let to = to.min(self.total);
        if held.bytes >= to {
            return true;
        }
        let step = (to - held.bytes).min(u32::MAX as usize) as u32;
        match self.permits.try_acquire_many(step) {
            Ok(p) => {
                p.forget();
                held.bytes += step as usize;
                held.bytes >= to
            }
            Err(_) => false,
        }
    }
}

impl Held {
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Gives back all but `to` bytes.
    pub fn shrink(&mut self, to: usize) {
        if to < self.bytes {
            self.permits.add_permits(self.bytes - to);
            self.bytes = to;
        }
    }

    /// Moves up to `n` bytes of this share into a share of their own.
    pub fn split(&mut self, n: usize) -> Held {
        let n = n.min(self.bytes);
        self.bytes -= n;
        Held {
            permits: self.permits.clone(),
            bytes: n,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.permits.add_permits(self.bytes);
        }
    }
}

/// At most `threads` decodes at a time, on tokio's blocking threads.
#[derive(Clone)]
pub struct DecodePool {
    slots: Arc<Semaphore>,
}

impl DecodePool {
    pub fn new(threads: usize) -> DecodePool {
        DecodePool {
            slots: Arc::new(Semaphore::new(threads.max(1))),
        }
    }

    /// Runs `f` on a pool thread once a slot is free.
    pub async fn run<T, F>(&self, f: F) -> T
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let slot = self.slots.clone().acquire_owned().await;
        let task = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            f()
        });
        match task.await {
            Ok(t) => t,
            // A panic in a decoder is a bug; surface it where it happened.
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shares_come_back_when_dropped_or_shrunk() {
        let budget = Budget::new(100);
        let mut a = budget.none();
        budget.grow(&mut a, 60).await;
        assert_eq!(budget.in_use(), 60);
        let mut b = budget.none();
        assert!(!budget.try_grow(&mut b, 50), "only 40 are free");
        assert_eq!(b.bytes(), 0, "a refused try takes nothing");
        let part = a.split(20);
        a.shrink(10);
        assert_eq!(budget.in_use(), 30);
        drop(part);
        assert_eq!(budget.in_use(), 10);
        assert!(budget.try_grow(&mut b, 90));
        drop((a, b));
        assert_eq!(budget.in_use(), 0);
    }

    #[tokio::test]
    async fn a_wait_ends_when_budget_is_given_back() {
        let budget = Budget::new(100);
        let mut a = budget.none();
        budget.grow(&mut a, 100).await;
        let waiter = {
            let budget = budget.clone();
            tokio::spawn(async move {
                let mut b = budget.none();
                budget.grow(&mut b, 70).await;
                b.bytes()
            })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        a.shrink(30);
        assert_eq!(waiter.await.unwrap(), 70);
        // More than the whole budget is capped at the whole budget, never a deadlock.
        let mut c = budget.none();
        drop(a);
        budget.grow(&mut c, 1_000).await;
        assert_eq!(c.bytes(), 100);
    }
}
