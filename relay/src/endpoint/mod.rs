//! The agent endpoint: QUIC on UDP and HTTPS/WebSocket on TCP, both ending in the same session code.

pub mod https;
pub mod limits;
pub mod quic;
pub mod session;
