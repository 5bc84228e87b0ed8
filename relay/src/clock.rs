//! The relay's wall clock, as the object sink's hour close reads it: the system clock,
//! or (for tests) a simulated one so that hours pass in seconds.
//!
//! `SLUICE_TEST_CLOCK=<unix seconds>:<rate>` starts the clock at that time when the
//! relay starts and runs it `rate` times as fast as real time. It moves nothing but the
//! hour close (and its delay metric): event times are the senders', timers and backoff
//! stay in real time.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// Simulated: the real instant the clock started, its time then and its rate.
    simulated: Option<(Instant, f64, f64)>,
}

impl Clock {
    pub fn system() -> Clock {
        Clock { simulated: None }
    }

    /// Starts at `unix_secs` now and runs `rate` times as fast as real time.
    pub fn simulated(unix_secs: f64, rate: f64) -> Clock {
        Clock {
            simulated: Some((Instant::now(), unix_secs, rate.max(f64::MIN_POSITIVE))),
        }
    }

    /// The system clock, or the one `SLUICE_TEST_CLOCK` asks for.
    pub fn from_env() -> Result<Clock, String> {
        let Ok(spec) = std::env::var("SLUICE_TEST_CLOCK") else {
            return Ok(Clock::system());
        };
        let parsed = spec.split_once(':').and_then(|(start, rate)| {
            Some((
                start.trim().parse::<f64>().ok()?,
                rate.trim().parse::<f64>().ok()?,
            ))
        });
        match parsed {
            Some((start, rate)) if rate > 0.0 && start >= 0.0 => {
                tracing::warn!(
                    start,
                    rate,
                    "SLUICE_TEST_CLOCK: hours close on a simulated clock (a test setting)"
                );
                Ok(Clock::simulated(start, rate))
            }
            _ => Err(format!(
                "SLUICE_TEST_CLOCK={spec:?}: expected <unix seconds>:<rate>, e.g. 1795000000:60"
            )),
        }
    }

    /// Seconds since the epoch.
    pub fn now(&self) -> f64 {
        match self.simulated {
            Some((started, at, rate)) => at + started.elapsed().as_secs_f64() * rate,
            None => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
        }
    }

    /// What this clock read at `instant` (a moment in the past).
    pub fn at(&self, instant: Instant) -> f64 {
        let ago = Instant::now()
            .saturating_duration_since(instant)
            .as_secs_f64();
        let rate = self.simulated.map_or(1.0, |(_, _, rate)| rate);
        self.now() - ago * rate
    }

    /// The real instant at which this clock reads `unix_secs` (now, if it is past).
    pub fn instant_at(&self, unix_secs: f64) -> Instant {
        let ahead = (unix_secs - self.now()).max(0.0);
        let rate = self.simulated.map_or(1.0, |(_, _, rate)| rate);
        Instant::now() + Duration::from_secs_f64((ahead / rate).min(1e9))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_simulated_clock_runs_at_its_rate() {
        let c = Clock::simulated(3600.0, 1000.0);
        let t0 = c.now();
        assert!((3600.0..3700.0).contains(&t0), "{t0}");
        // An hour ahead on the clock is 3.6 s of real time.
        let wait = c
            .instant_at(t0 + 3600.0)
            .saturating_duration_since(Instant::now());
        assert!(wait <= Duration::from_millis(3600), "{wait:?}");
        assert!(wait >= Duration::from_millis(3000), "{wait:?}");
        assert!(c.instant_at(0.0) <= Instant::now());
    }

    #[test]
    fn the_system_clock_is_the_time() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!((Clock::system().now() - now).abs() < 5.0);
    }
}
