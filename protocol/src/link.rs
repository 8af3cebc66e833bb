//! The transport contract both sides share: how to reach the relay, and how fast a dead link is noticed.
//!
//! The relay serves QUIC on UDP and HTTPS (WebSocket at [`WS_PATH`]) on TCP at the same port number. One
//! session runs over one QUIC bidirectional stream, or over one WebSocket's binary messages.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// ALPN for the agent protocol over QUIC.
pub const QUIC_ALPN: &[u8] = b"codetogether/1";

/// Where the relay accepts agent WebSockets.
pub const WS_PATH: &str = "/agent/v1";

/// Largest WebSocket message either side accepts: one maximum frame plus its header.
pub const WS_MAX_MESSAGE: usize = crate::frame::MAX_FRAME_LEN + crate::frame::HEADER_LEN;

/// How the agent reached the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    Quic,
    WebSocket,
}

impl Transport {
    /// Keep-alive timing for this transport.
    pub fn timing(self) -> LinkTiming {
        match self {
            // QUIC also has its own keep-alive and idle timeout (set to the same figures), so a silent peer is
            // dropped by the transport even if the application is busy.
            Transport::Quic => LinkTiming {
                heartbeat: Duration::from_secs(1),
                dead_after: Duration::from_secs(4),
                // A live node's QUIC stack answers within milliseconds whatever its application is doing
                // (ACKs of our heartbeats, its own keep-alive every second), so two seconds without a single
                // datagram means the machine or the path is gone, not that the node is slow.
                suspect_after: Duration::from_secs(2),
            },
            // TCP needs no such watch: a dead node's kernel (or the path) resets the connection, and a
            // WebSocket stack offers no packet counter to watch anyway.
            Transport::WebSocket => LinkTiming {
                heartbeat: Duration::from_secs(3),
                dead_after: Duration::from_secs(9),
                suspect_after: Duration::from_secs(9),
            },
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::WebSocket => "websocket",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Keep-alive figures: each side sends any frame at least every `heartbeat`, and declares the link dead when
/// nothing at all has arrived for `dead_after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkTiming {
    pub heartbeat: Duration,
    pub dead_after: Duration,
    /// An agent that knows another node of the cluster leaves its node once the *transport* has received
    /// nothing at all for this long (see [`TransportSilence`]), without waiting for `dead_after`: a SIGKILLed
    /// or unplugged node sends no reset, and every second spent waiting on it is a second its agents are
    /// unreachable. Equal to `dead_after` where there is no transport to watch.
    pub suspect_after: Duration,
}

/// How often an agent looks at its transport's packet counter for [`TransportSilence`].
pub const SILENCE_POLL: Duration = Duration::from_millis(250);

/// Whether an agent that knows `nodes` relay addresses watches its transport for silence. With a single
/// address there is nowhere else to go, and reconnecting to the same (perhaps only busy) relay early would
/// only add to its load, so the app-level `dead_after` alone decides.
pub fn watches_transport(nodes: usize) -> bool {
    nodes > 1
}

/// Watches a counter of datagrams received on a link (QUIC's `udp_rx`), polled every [`SILENCE_POLL`]:
/// the link is silent once the counter has not moved for `suspect_after`. Shared by `ct-agent` and the load
/// generator's agents so the benchmark measures the rule the agent runs.
#[derive(Debug, Clone)]
pub struct TransportSilence {
    suspect_after: Duration,
    last: Option<u64>,
    /// When the counter last moved (or watching started).
    since: Instant,
    /// When the counter was last read.
    polled: Instant,
}

impl TransportSilence {
    /// Starts watching at `now` (a link that never receives anything is silent `suspect_after` from now).
    pub fn new(suspect_after: Duration, now: Instant) -> Self {
        Self {
            suspect_after,
            last: None,
            since: now,
            polled: now,
        }
    }

    /// Records the counter's value at `now`; true when it has not grown for `suspect_after`.
    pub fn silent(&mut self, received: u64, now: Instant) -> bool {
        let gap = now.saturating_duration_since(self.polled);
        self.polled = now;
        if self.last != Some(received) {
            // The first reading counts as "heard" as well: it may include datagrams from just before `new`,
            // and a handshake that just completed is proof enough of life.
            self.last = Some(received);
            self.since = now;
        } else if gap > self.suspect_after / 2 {
            // The watcher itself did not run for a while (a stalled runtime, a suspended machine): datagrams
            // that arrived meanwhile may not be counted yet, so this reading proves nothing. Start over.
            self.since = now;
        }
        now.saturating_duration_since(self.since) >= self.suspect_after
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counter_that_stops_is_silent_only_after_suspect_after() {
        let t0 = Instant::now();
        let mut watch = TransportSilence::new(Duration::from_secs(2), t0);
        // Readings every 250 ms of a counter that moves at `moves` (ms); the first silent reading, if any.
        let mut counter = 0;
        let mut first_silent = |from: u64, to: u64, moves: &[u64]| {
            (from..=to).step_by(250).find(|&ms| {
                if moves.contains(&ms) {
                    counter += 1;
                }
                watch.silent(counter, t0 + Duration::from_millis(ms))
            })
        };
        assert_eq!(first_silent(0, 1000, &[0, 500, 1000]), None);
        assert_eq!(
            first_silent(1250, 5000, &[]),
            Some(3000),
            "2 s after it last moved"
        );
        assert_eq!(
            first_silent(5250, 6000, &[5250]),
            None,
            "a datagram clears it"
        );
        assert_eq!(first_silent(6250, 9000, &[]), Some(7250));
    }

    #[test]
    fn a_watcher_that_did_not_run_for_a_while_does_not_call_the_link_silent() {
        let t0 = Instant::now();
        let mut watch = TransportSilence::new(Duration::from_secs(2), t0);
        let at = |ms| t0 + Duration::from_millis(ms);
        assert!(!watch.silent(5, at(0)));
        assert!(!watch.silent(5, at(250)));
        // Three seconds without a reading: the counter may simply not have been updated yet.
        assert!(!watch.silent(5, at(3250)));
        assert!(!watch.silent(5, at(4250)));
        assert!(
            watch.silent(5, at(5250)),
            "silence seen by a running watcher counts"
        );
    }

    #[test]
    fn only_an_agent_with_somewhere_else_to_go_watches() {
        assert!(!watches_transport(0));
        assert!(!watches_transport(1));
        assert!(watches_transport(2));
        let quic = Transport::Quic.timing();
        assert!(quic.suspect_after < quic.dead_after);
        assert!(
            quic.suspect_after >= quic.heartbeat * 2,
            "two missed keep-alives at least"
        );
        let ws = Transport::WebSocket.timing();
        assert_eq!(ws.suspect_after, ws.dead_after);
    }
}
