//! What one party may cost the endpoint: connections per address, the connection limit the descriptor limit
//! allows, and quiet backoff when `accept` fails.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the endpoint admits: the connection limit and each address's share of it. One per relay, shared by
/// the QUIC and TCP endpoints.
#[derive(Debug, Clone)]
pub struct Admission {
    /// One permit per connection being served; see `CoreConfig::max_connections`.
    pub connections: Arc<tokio::sync::Semaphore>,
    /// Connections each address holds; see `CoreConfig::max_connections_per_address`.
    pub per_address: Arc<PerAddress>,
}

impl Admission {
    pub fn new(max_connections: usize, per_address: usize) -> Self {
        Self {
            connections: Arc::new(tokio::sync::Semaphore::new(max_connections)),
            per_address: PerAddress::new(per_address),
        }
    }
}

/// Counts the connections each address (IPv6: each /64) holds, so one party cannot take every slot of the
/// global limit. The table only holds addresses with a live connection, so it is bounded by that limit.
#[derive(Debug, Default)]
pub struct PerAddress {
    held: Mutex<HashMap<IpAddr, usize>>,
    cap: usize,
}

impl PerAddress {
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            held: Mutex::default(),
            cap: cap.max(1),
        })
    }

    /// A slot for one more connection from `addr`, or `None` when it already holds `cap` of them.
    pub fn try_acquire(self: &Arc<Self>, addr: IpAddr) -> Option<AddressSlot> {
        let key = crate::ratelimit::group(addr);
        let mut held = self.lock();
        let n = held.entry(key).or_insert(0);
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            table: self.clone(),
            key,
        })
    }

    /// Connections `addr` holds now.
    pub fn held_by(&self, addr: IpAddr) -> usize {
        self.lock()
            .get(&crate::ratelimit::group(addr))
            .copied()
            .unwrap_or(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One connection's place in [`PerAddress`]; dropping it frees the place.
#[derive(Debug)]
pub struct AddressSlot {
    table: Arc<PerAddress>,
    key: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut held = self.table.lock();
        if let Some(n) = held.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

/// Descriptors kept back from connections for everything else the relay opens: the store's files, the
/// listeners, the admin socket and its clients, the runtime's own. An eighth of the limit, at least 32 and at
/// most 1024.
pub fn descriptor_reserve(limit: u64) -> u64 {
    (limit / 8).clamp(32, 1024)
}

/// The connection limit a descriptor limit allows: what is left after [`descriptor_reserve`] (at least 16),
/// and never more than `ceiling`.
pub fn connections_for(descriptors: u64, ceiling: usize) -> usize {
    let left = descriptors
        .saturating_sub(descriptor_reserve(descriptors))
        .max(16);
    usize::try_from(left).unwrap_or(usize::MAX).min(ceiling)
}

/// Backoff for a failing `accept` (EMFILE, ENFILE, ENOBUFS...): waits longer each time it fails in a row, up
/// to a second, and logs at most once per [`ACCEPT_LOG_INTERVAL`], saying how many failures it left out.
/// Without it a descriptor shortage turns into a busy loop and thousands of identical log lines.
#[derive(Debug)]
pub struct AcceptBackoff {
    delay: Duration,
    last_log: Option<Instant>,
    unlogged: u64,
}

/// How often a run of accept failures is logged.
pub const ACCEPT_LOG_INTERVAL: Duration = Duration::from_secs(10);
const FIRST_DELAY: Duration = Duration::from_millis(10);
const MAX_DELAY: Duration = Duration::from_secs(1);

impl Default for AcceptBackoff {
    fn default() -> Self {
        Self {
            delay: FIRST_DELAY,
            last_log: None,
            unlogged: 0,
        }
    }
}

impl AcceptBackoff {
    /// Records a failure, logs it if due, and returns how long to wait before accepting again.
    pub fn failed(&mut self, error: &std::io::Error, side: &str) -> Duration {
        let now = Instant::now();
        if self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= ACCEPT_LOG_INTERVAL)
        {
            tracing::warn!(
                %error,
                side,
                left_out = self.unlogged,
                "accept failed (too few file descriptors? see --max-connections); backing off, and logging \
                 this at most every {}s",
                ACCEPT_LOG_INTERVAL.as_secs()
            );
            self.last_log = Some(now);
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
        let wait = self.delay;
        self.delay = (self.delay * 2).min(MAX_DELAY);
        wait
    }

    /// An accept succeeded: the next failure starts from the shortest wait again.
    pub fn succeeded(&mut self) {
        self.delay = FIRST_DELAY;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_holds_at_most_its_cap_and_dropping_frees_a_place() {
        let table = PerAddress::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let one = table.try_acquire(a).unwrap();
        let _two = table.try_acquire(a).unwrap();
        assert!(table.try_acquire(a).is_none());
        assert!(
            table.try_acquire(b).is_some(),
            "another address is unaffected"
        );
        drop(one);
        assert!(table.try_acquire(a).is_some());
    }

    #[test]
    fn an_ipv6_host_cannot_rotate_past_the_cap_within_its_64() {
        let table = PerAddress::new(1);
        let _held = table.try_acquire("2001:db8::1".parse().unwrap()).unwrap();
        assert!(table.try_acquire("2001:db8::2".parse().unwrap()).is_none());
        assert!(table
            .try_acquire("2001:db8:0:1::1".parse().unwrap())
            .is_some());
    }

    #[test]
    fn the_table_forgets_addresses_that_hold_nothing() {
        let table = PerAddress::new(3);
        let slot = table.try_acquire("10.0.0.9".parse().unwrap()).unwrap();
        drop(slot);
        assert!(table.lock().is_empty());
    }

    #[test]
    fn the_connection_limit_leaves_descriptors_for_the_rest() {
        assert_eq!(connections_for(1024, 50_000), 1024 - 128);
        assert_eq!(connections_for(64, 50_000), 32);
        assert_eq!(connections_for(1 << 20, 50_000), 50_000);
        assert_eq!(connections_for(10, 50_000), 16);
    }

    #[test]
    fn accept_failures_back_off_up_to_a_second() {
        let mut b = AcceptBackoff::default();
        let e = std::io::Error::from_raw_os_error(libc::EMFILE);
        let waits: Vec<Duration> = (0..10).map(|_| b.failed(&e, "tcp")).collect();
        assert_eq!(waits[0], FIRST_DELAY);
        assert!(waits.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*waits.last().unwrap(), MAX_DELAY);
        assert_eq!(
            b.unlogged, 9,
            "only the first failure of the run was logged"
        );
        b.succeeded();
        assert_eq!(b.failed(&e, "tcp"), FIRST_DELAY);
    }
}
