//! Token buckets keyed by who is asking — per address for things a stranger can attempt (pairing), per user
//! for things a person can start (tasks) — bounded in memory however many keys appear.
//!
//! IPv6 addresses are grouped by /64, since one host usually holds a whole /64.
//!
//! When the table is full, buckets that have refilled are forgotten first (they are indistinguishable from new
//! ones); if that frees nothing, the older half (by last use) is dropped. Forgetting a bucket hands its key a
//! fresh burst, but only to someone who brought as many distinct keys as the table holds within one refill
//! period — who would get those bursts from the new keys anyway. Refusing new keys instead would let that same
//! flood lock every newcomer out.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Allows `burst` attempts at once per key, refilled at one per `every`.
#[derive(Debug)]
pub struct RateLimiter<K = IpAddr> {
    buckets: Mutex<HashMap<K, Bucket>>,
    burst: f64,
    every: Duration,
    max_keys: usize,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// `burst` is raised to 1 and `every` to a millisecond: a limiter that allows nothing would be a bug.
    pub fn new(burst: u32, every: Duration, max_keys: usize) -> Self {
        Self {
            buckets: Mutex::new(HashMap::new()),
            burst: burst.max(1).into(),
            every: every.max(Duration::from_millis(1)),
            max_keys: max_keys.max(2),
        }
    }

    /// Takes one token for `key`, or says how long until one is available.
    pub fn take(&self, key: &K) -> Result<(), Duration> {
        self.take_at(key, Instant::now())
    }

    /// Keys currently remembered (for tests and metrics).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Bucket>> {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take_at(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.lock();
        if buckets.len() >= self.max_keys && !buckets.contains_key(key) {
            self.make_room(&mut buckets, now);
        }
        let b = buckets.entry(key.clone()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let refill = now.saturating_duration_since(b.at).as_secs_f64() / self.every.as_secs_f64();
        b.tokens = (b.tokens + refill).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(self.every.mul_f64(1.0 - b.tokens))
        }
    }

    /// Frees at least one slot; amortised O(1) per new key, since each sweep frees half the table or more.
    fn make_room(&self, buckets: &mut HashMap<K, Bucket>, now: Instant) {
        let full_after = self.every.mul_f64(self.burst);
        buckets.retain(|_, b| now.saturating_duration_since(b.at) < full_after);
        if buckets.len() < self.max_keys {
            return;
        }
        let mut ages: Vec<Instant> = buckets.values().map(|b| b.at).collect();
        let mid = ages.len() / 2;
        let (_, median, _) = ages.select_nth_unstable(mid);
        let median = *median;
        buckets.retain(|_, b| b.at > median);
        // Many buckets touched at the same instant could all survive the cut: drop arbitrary ones then.
        let excess = buckets.len().saturating_sub(self.max_keys / 2);
        if excess > 0 {
            let drop: Vec<K> = buckets.keys().take(excess).cloned().collect();
            for k in drop {
                buckets.remove(&k);
            }
        }
    }
}

impl RateLimiter<IpAddr> {
    /// Takes one token for `addr` (grouped: an IPv6 host's whole /64 shares one bucket); false when none is
    /// left.
    pub fn allow(&self, addr: IpAddr) -> bool {
        self.take_addr(addr).is_ok()
    }

    /// Like [`allow`](Self::allow), saying how long until the next attempt would be allowed.
    pub fn take_addr(&self, addr: IpAddr) -> Result<(), Duration> {
        self.take(&group(addr))
    }
}

/// The key one party is counted under: the address itself, or for IPv6 its /64 (one host usually holds a
/// whole /64, so counting single addresses would let it rotate past any cap).
pub(crate) fn group(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        IpAddr::V6(v6) => IpAddr::V4(
            v6.to_ipv4_mapped()
                .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
        ),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow_at(rl: &RateLimiter, ip: &str, t: Instant) -> bool {
        rl.take_at(&group(ip.parse().unwrap()), t).is_ok()
    }

    #[test]
    fn burst_then_refill() {
        let rl = RateLimiter::new(3, Duration::from_secs(10), 100);
        let t0 = Instant::now();
        assert!((0..3).all(|_| allow_at(&rl, "10.0.0.1", t0)));
        assert!(!allow_at(&rl, "10.0.0.1", t0));
        assert!(
            allow_at(&rl, "10.0.0.2", t0),
            "other addresses are unaffected"
        );
        assert!(!allow_at(&rl, "10.0.0.1", t0 + Duration::from_secs(9)));
        assert!(allow_at(&rl, "10.0.0.1", t0 + Duration::from_secs(11)));
    }

    #[test]
    fn a_refusal_says_when_to_try_again() {
        let rl: RateLimiter<String> = RateLimiter::new(1, Duration::from_secs(60), 100);
        let t0 = Instant::now();
        assert!(rl.take_at(&"1".into(), t0).is_ok());
        let wait = rl
            .take_at(&"1".into(), t0 + Duration::from_secs(15))
            .unwrap_err();
        assert!(
            wait > Duration::from_secs(44) && wait <= Duration::from_secs(45),
            "{wait:?}"
        );
    }

    #[test]
    fn one_ipv6_host_cannot_rotate_addresses_within_its_64() {
        let rl = RateLimiter::new(1, Duration::from_secs(60), 100);
        let t0 = Instant::now();
        assert!(allow_at(&rl, "2001:db8::1", t0));
        assert!(!allow_at(&rl, "2001:db8::2", t0));
    }

    #[test]
    fn memory_is_bounded_under_many_addresses() {
        let rl = RateLimiter::new(1, Duration::from_secs(60), 10);
        let t0 = Instant::now();
        for i in 0..1000u32 {
            rl.take_at(&IpAddr::V4(i.into()), t0).unwrap();
        }
        assert!(rl.len() <= 10);
    }

    #[test]
    fn a_full_table_forgets_the_least_recently_used_keys_first() {
        let rl: RateLimiter<u32> = RateLimiter::new(1, Duration::from_secs(3600), 100);
        let t0 = Instant::now();
        // Key 0 is used last, just before the table fills: it must survive the sweep and stay limited.
        for k in 1..100 {
            rl.take_at(&k, t0 + Duration::from_millis(k.into()))
                .unwrap();
        }
        rl.take_at(&0, t0 + Duration::from_secs(1)).unwrap();
        rl.take_at(&1000, t0 + Duration::from_secs(2)).unwrap();
        assert!(rl.len() <= 100);
        assert!(
            rl.take_at(&0, t0 + Duration::from_secs(3)).is_err(),
            "a recently used key keeps its empty bucket"
        );
    }
}
