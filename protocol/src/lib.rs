//! The CodeTogether wire protocol, shared by the relay and the agent.
//!
//! Nothing here opens a socket: every piece works over any `AsyncRead + AsyncWrite`, so it is tested over
//! `tokio::io::duplex` and used unchanged over a QUIC stream or a WebSocket.
//!
//! - [`files`]: files attached to a task, in parts that fit a frame, and their safe names.
//! - [`frame`]: length-prefixed JSON frames with a hard size limit, and typed reader/writer halves.
//! - [`message`]: the two directional enums that make up a session after the handshake.
//! - [`handshake`]: mutual ed25519 challenge–response bound to the TLS channel.
//! - [`identity`]: key fingerprints, the names people see for keys.
//! - [`link`]: ALPN, WebSocket path, keep-alive timing per transport.
//! - [`pairing`]: the copy-pasteable pairing token and the one-time code inside it.
//! - [`project`]: project requests the relay forwards to an agent, and the agent's report of its projects.
//! - [`scope`]: what an "allow for the session" rule covers, shared by the agent, the relay and the bot.
//! - [`task`]: task specs, decisions and the sequenced events that come back.
//! - [`ws`]: carries the byte stream over WebSocket binary messages.
//! - [`version`]: protocol and software versions and the compatibility rule.

pub mod b64;
pub mod files;
pub mod frame;
pub mod handshake;
pub mod identity;
pub mod link;
pub mod message;
pub mod pairing;
pub mod project;
pub mod scope;
pub mod task;
pub mod version;
pub mod ws;

pub use frame::{FrameError, FrameReader, FrameWriter, MAX_FRAME_LEN};
pub use identity::Fingerprint;
pub use link::Transport;
pub use message::{AgentMessage, RelayMessage};
