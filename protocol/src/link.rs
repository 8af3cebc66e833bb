//! The transport contract both sides share: how to reach the relay, and how fast a dead link is noticed.
//!
//! The relay serves QUIC on UDP and HTTPS (WebSocket at [`WS_PATH`]) on TCP at the same port number. One
//! session runs over one QUIC bidirectional stream, or over one WebSocket's binary messages.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

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
            },
            Transport::WebSocket => LinkTiming {
                heartbeat: Duration::from_secs(3),
                dead_after: Duration::from_secs(9),
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
}
