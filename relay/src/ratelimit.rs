//! Per-address token buckets, bounded in memory, for things a stranger can attempt (pairing).
//!
//! IPv6 addresses are grouped by /64, since one host usually holds a whole /64.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Allows `burst` attempts at once per address, refilled at one per `every`.
#[derive(Debug)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
    burst: f64,
    every: Duration,
    max_addresses: usize,
}

impl RateLimiter {
    pub fn new(burst: u32, every: Duration, max_addresses: usize) -> Self {
        Self {
            buckets: Mutex::new(HashMap::new()),
            burst: burst.into(),
            every,
            max_addresses,
        }
    }

    /// Takes one token for `addr`; false when it has none left.
    pub fn allow(&self, addr: IpAddr) -> bool {
        self.allow_at(addr, Instant::now())
    }

    fn allow_at(&self, addr: IpAddr, now: Instant) -> bool {
        let key = group(addr);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= self.max_addresses && !buckets.contains_key(&key) {
            // Forget addresses whose buckets have refilled: they are indistinguishable from new ones.
            let full_after = self.every.mul_f64(self.burst);
            buckets.retain(|_, b| now.duration_since(b.at) < full_after);
            if buckets.len() >= self.max_addresses {
                return false;
            }
        }
        let b = buckets.entry(key).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let refill = now.duration_since(b.at).as_secs_f64() / self.every.as_secs_f64();
        b.tokens = (b.tokens + refill).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn group(addr: IpAddr) -> IpAddr {
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

    #[test]
    fn burst_then_refill() {
        let rl = RateLimiter::new(3, Duration::from_secs(10), 100);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        assert!((0..3).all(|_| rl.allow_at(ip, t0)));
        assert!(!rl.allow_at(ip, t0));
        assert!(
            rl.allow_at("10.0.0.2".parse().unwrap(), t0),
            "other addresses are unaffected"
        );
        assert!(!rl.allow_at(ip, t0 + Duration::from_secs(9)));
        assert!(rl.allow_at(ip, t0 + Duration::from_secs(11)));
    }

    #[test]
    fn one_ipv6_host_cannot_rotate_addresses_within_its_64() {
        let rl = RateLimiter::new(1, Duration::from_secs(60), 100);
        let t0 = Instant::now();
        assert!(rl.allow_at("2001:db8::1".parse().unwrap(), t0));
        assert!(!rl.allow_at("2001:db8::2".parse().unwrap(), t0));
    }

    #[test]
    fn memory_is_bounded_under_many_addresses() {
        let rl = RateLimiter::new(1, Duration::from_secs(60), 10);
        let t0 = Instant::now();
        for i in 0..1000u32 {
            rl.allow_at(IpAddr::V4(i.into()), t0);
        }
        assert!(rl.buckets.lock().unwrap().len() <= 10);
    }
}
