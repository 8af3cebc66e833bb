//! The reconnect policy: quick first retry, then full-jitter exponential backoff that never gives up.
//!
//! Step `n` waits `uniform(0, min(cap, base · 2^n))`, with `base` = 200 ms and `cap` = 30 s, so the first
//! retry after a drop comes within 200 ms and a relay restart does not see every agent return at the same
//! instant (full jitter, as in the AWS architecture blog's analysis). After a connection stayed up for
//! `healthy_after` (60 s) the next drop starts again from step 0.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The ceiling of the first step.
pub const BASE: Duration = Duration::from_millis(200);
/// The largest delay ever drawn.
pub const CAP: Duration = Duration::from_secs(30);
/// A connection that lasted this long resets the backoff.
pub const HEALTHY_AFTER: Duration = Duration::from_secs(60);

/// Reconnect delays, one per failed attempt.
#[derive(Debug)]
pub struct Backoff {
    step: u32,
    base: Duration,
    cap: Duration,
    healthy_after: Duration,
    rng: StdRng,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(BASE, CAP, HEALTHY_AFTER)
    }
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration, healthy_after: Duration) -> Self {
        Self {
            step: 0,
            base,
            cap,
            healthy_after,
            rng: StdRng::from_entropy(),
        }
    }

    /// The same policy with a fixed random sequence, for tests.
    pub fn seeded(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            ..Self::default()
        }
    }

    /// The current ceiling: `min(cap, base · 2^step)`.
    pub fn ceiling(&self) -> Duration {
        // 2^20 · 200 ms is far past any sane cap; stopping the exponent there avoids overflow.
        let factor = 1u32 << self.step.min(20);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The delay before the next attempt; each call moves one step further.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.step = self.step.saturating_add(1);
        let nanos = ceiling.as_nanos().min(u64::MAX as u128) as u64;
        Duration::from_nanos(self.rng.gen_range(0..=nanos))
    }

    /// Back to the first step: the next delay is within `base` again.
    pub fn reset(&mut self) {
        self.step = 0;
    }

    /// Called when a session ends: a session that stayed up for `healthy_after` resets the backoff, so one
    /// drop after hours of service is retried at once rather than at the cap.
    pub fn session_ended(&mut self, lasted: Duration) {
        if lasted >= self.healthy_after {
            self.reset();
        }
    }

    /// How many delays have been drawn since the last reset.
    pub fn step(&self) -> u32 {
        self.step
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_within_their_ceiling_and_reach_the_cap() {
        for seed in 0..50 {
            let mut b = Backoff::seeded(seed);
            for n in 0..40u32 {
                let ceiling = BASE.saturating_mul(1 << n.min(20)).min(CAP);
                assert_eq!(b.ceiling(), ceiling);
                let d = b.next_delay();
                assert!(d <= ceiling, "step {n}: {d:?} > {ceiling:?}");
            }
            assert_eq!(b.ceiling(), CAP);
        }
    }

    #[test]
    fn first_delay_is_within_200ms_and_jitter_is_full() {
        let mut lo = Duration::MAX;
        let mut hi = Duration::ZERO;
        for seed in 0..2000 {
            let d = Backoff::seeded(seed).next_delay();
            assert!(d <= Duration::from_millis(200));
            lo = lo.min(d);
            hi = hi.max(d);
        }
        // Full jitter spreads over the whole range, not just near the ceiling.
        assert!(lo < Duration::from_millis(10), "{lo:?}");
        assert!(hi > Duration::from_millis(190), "{hi:?}");
    }

    #[test]
    fn capped_delays_spread_over_the_whole_range() {
        let mut b = Backoff::seeded(7);
        for _ in 0..10 {
            b.next_delay();
        }
        let draws: Vec<_> = (0..500).map(|_| b.next_delay()).collect();
        assert!(draws.iter().all(|d| *d <= CAP));
        assert!(draws.iter().any(|d| *d < Duration::from_secs(3)));
        assert!(draws.iter().any(|d| *d > Duration::from_secs(27)));
    }

    #[test]
    fn a_healthy_session_resets_and_a_short_one_does_not() {
        let mut b = Backoff::seeded(1);
        for _ in 0..8 {
            b.next_delay();
        }
        b.session_ended(Duration::from_secs(59));
        assert_eq!(b.step(), 8);
        b.session_ended(HEALTHY_AFTER);
        assert_eq!(b.step(), 0);
        assert!(b.next_delay() <= BASE);
        b.next_delay();
        b.reset();
        assert_eq!(b.ceiling(), BASE);
    }

    #[test]
    fn same_seed_same_delays() {
        let a: Vec<_> = {
            let mut b = Backoff::seeded(3);
            (0..10).map(|_| b.next_delay()).collect()
        };
        let mut b = Backoff::seeded(3);
        assert!(a.iter().all(|d| *d == b.next_delay()));
    }
}
