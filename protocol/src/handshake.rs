//! The mutual ed25519 handshake that opens every agent session.
//!
//! ```text
//! agent                                             relay
//!   ── ClientHello {protocol, agent_key, nonce_a} ──▶
//!   ◀── ServerHello::Challenge {protocol, relay_key, nonce_r, sig_r} ──   (or ::Incompatible, then close)
//!   ── ClientAuth {sig_a, pair?} ──▶
//!   ◀── Verdict::Welcome {...} | Verdict::Rejected {...} ──
//! ```
//!
//! Each signature covers a transcript of both nonces, both keys, the negotiated protocol, the signer's role
//! and the TLS channel binding (RFC 9266-style keying-material exporter, [`CHANNEL_BINDING_LABEL`]). So:
//! a signature from one connection is useless on another (fresh nonces, different TLS keys); a man in the
//! middle who terminates TLS himself sees a different channel binding and cannot produce the relay's
//! signature; and neither side's signature can be reflected as the other's (role label). The agent checks
//! the relay key against the fingerprint it pinned from its pairing token before sending anything secret:
//! the pairing code travels in `ClientAuth`, after the relay has proven who it is.

use std::time::Duration;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::b64;
use crate::frame::{FrameError, FrameReader, FrameWriter};
use crate::identity::Fingerprint;
use crate::version::{self, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, SOFTWARE_VERSION};

/// How long either side waits for the whole handshake before closing the connection.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS exporter label both sides use to derive the channel binding.
pub const CHANNEL_BINDING_LABEL: &[u8] = b"EXPORTER-codetogether-channel-binding";

/// Bytes of channel binding taken from the exporter.
pub const CHANNEL_BINDING_LEN: usize = 32;

const TRANSCRIPT_DOMAIN: &[u8] = b"codetogether-handshake\0";

/// The agent's opening message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientHello {
    /// The newest protocol the agent speaks.
    pub protocol: u32,
    /// The oldest protocol the agent speaks.
    #[serde(default = "one")]
    pub min_protocol: u32,
    /// The agent's software version, for human error messages.
    pub software: String,
    #[serde(with = "b64::array")]
    pub agent_key: [u8; 32],
    #[serde(with = "b64::array")]
    pub nonce: [u8; 32],
}

fn one() -> u32 {
    1
}

/// The relay's answer to [`ClientHello`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerHello {
    /// The relay proves its key and asks the agent to prove its own.
    Challenge {
        /// The protocol this session speaks.
        protocol: u32,
        software: String,
        #[serde(with = "b64::array")]
        relay_key: [u8; 32],
        #[serde(with = "b64::array")]
        nonce: [u8; 32],
        #[serde(with = "b64::array")]
        signature: [u8; 64],
    },
    /// The agent is too old (or too new) for this relay; `message` says what to do. The relay closes next.
    Incompatible {
        relay_protocol: u32,
        relay_min_protocol: u32,
        relay_software: String,
        message: String,
    },
}

/// The agent's proof of its key, and optionally the pairing code that binds the key to a user.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientAuth {
    #[serde(with = "b64::array")]
    pub signature: [u8; 64],
    #[serde(default)]
    pub pair: Option<PairRequest>,
}

/// Sent only while pairing: the one-time code from the token and the name the agent wants to be known by.
#[derive(Clone, Serialize, Deserialize)]
pub struct PairRequest {
    pub code: String,
    pub name: String,
}

impl std::fmt::Debug for PairRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairRequest")
            .field("code", &"MASKED")
            .field("name", &self.name)
            .finish()
    }
}

/// The relay's decision once it has verified the agent's signature.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Verdict {
    Welcome(Welcome),
    Rejected { reason: Rejection, message: String },
}

/// What the agent learns when it is admitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The Discord user id of the owner.
    pub owner: String,
    /// The owner's display name, when the relay knows it.
    #[serde(default)]
    pub owner_name: Option<String>,
    /// The name this agent is listed under.
    pub agent_name: String,
    /// True when this handshake paired the key just now.
    #[serde(default)]
    pub paired: bool,
    /// How often the relay expects a heartbeat, in milliseconds.
    pub heartbeat_ms: u64,
    /// In a cluster, the addresses of its live nodes (`host:port`), so an agent paired before a node joined,
    /// or before the relay became a cluster, can fail over to it. Empty from a single relay. The agent
    /// verifies the relay key wherever it connects, so an address here can cost an attempt, never trust.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub relays: Vec<String>,
    /// The relay understands [`TaskEvent::Context`](crate::task::TaskEvent::Context): the agent sends the
    /// conversation's context usage as it changes. An older relay cannot decode an event kind it does not
    /// know (and would drop the link over it), so the agent sends none unless the relay says so.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub live_usage: bool,
    /// The relay shows tool output: the agent may send tool results whole (bounded), with their exit status,
    /// the tool use they answer and the diff of an edit (the new fields of
    /// [`TaskEvent::Tool`](crate::task::TaskEvent::Tool) and [`TaskEvent::ToolResult`](crate::task::TaskEvent::ToolResult)).
    /// Absent from older relays, whose agents then send the short previews they always sent.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tool_output: bool,
}

/// Why the relay refused an agent whose signature was valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rejection {
    /// The key is not paired with this relay.
    UnknownKey,
    /// The key was revoked.
    Revoked,
    /// The pairing code does not exist or its secret is wrong.
    CodeWrong,
    /// The pairing code was already used.
    CodeUsed,
    /// The pairing code expired.
    CodeExpired,
    /// Too many attempts from this address.
    RateLimited,
    /// The relay could not decide (storage failure); try again later.
    Unavailable,
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("handshake did not complete within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Incompatible(String),
    #[error(
        "the relay presented key {got}, but this agent is pinned to {expected}: refusing to talk to it \
         (if the relay's key really changed, pair again with a new token)"
    )]
    WrongRelayKey {
        expected: Fingerprint,
        got: Fingerprint,
    },
    #[error("the {0} signature does not verify for this connection")]
    BadSignature(&'static str),
    #[error("the peer sent an invalid public key")]
    InvalidKey,
    #[error("the peer closed the connection during the handshake")]
    Closed,
    #[error("refused by the relay: {message}")]
    Rejected { reason: Rejection, message: String },
}

impl HandshakeError {
    /// Whether this failure is about this one connection (worth retrying) or about who we are.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Self::Incompatible(_)
                | Self::WrongRelayKey { .. }
                | Self::Rejected {
                    reason: Rejection::UnknownKey | Rejection::Revoked,
                    ..
                }
                | Self::Rejected {
                    reason: Rejection::CodeWrong | Rejection::CodeUsed | Rejection::CodeExpired,
                    ..
                }
        )
    }
}

/// The bytes each side signs.
fn transcript(
    role: &str,
    protocol: u32,
    nonce_a: &[u8; 32],
    nonce_r: &[u8; 32],
    agent_key: &[u8; 32],
    relay_key: &[u8; 32],
    channel_binding: &[u8],
) -> Vec<u8> {
    let mut t = Vec::with_capacity(256);
    t.extend_from_slice(TRANSCRIPT_DOMAIN);
    t.extend_from_slice(role.as_bytes());
    t.push(0);
    t.extend_from_slice(&protocol.to_be_bytes());
    t.extend_from_slice(nonce_a);
    t.extend_from_slice(nonce_r);
    t.extend_from_slice(agent_key);
    t.extend_from_slice(relay_key);
    t.extend_from_slice(&(channel_binding.len() as u32).to_be_bytes());
    t.extend_from_slice(channel_binding);
    t
}

fn nonce() -> [u8; 32] {
    let mut n = [0; 32];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

async fn recv<R: AsyncRead + Unpin, T: serde::de::DeserializeOwned>(
    r: &mut FrameReader<R>,
) -> Result<T, HandshakeError> {
    r.recv().await?.ok_or(HandshakeError::Closed)
}

/// What the agent brings to a handshake.
#[derive(Debug)]
pub struct ClientParams<'a> {
    pub key: &'a SigningKey,
    /// The relay key fingerprint pinned at pairing.
    pub relay: Fingerprint,
    /// The TLS exporter output for this connection.
    pub channel_binding: &'a [u8],
    pub pair: Option<PairRequest>,
}

/// Runs the agent's side. On success the connection is authenticated both ways.
pub async fn client<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    params: ClientParams<'_>,
) -> Result<Welcome, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    tokio::time::timeout(HANDSHAKE_TIMEOUT, client_inner(reader, writer, params))
        .await
        .map_err(|_| HandshakeError::Timeout(HANDSHAKE_TIMEOUT))?
}

async fn client_inner<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    params: ClientParams<'_>,
) -> Result<Welcome, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let agent_key = params.key.verifying_key().to_bytes();
    let nonce_a = nonce();
    writer
        .send(&ClientHello {
            protocol: PROTOCOL_VERSION,
            min_protocol: MIN_PROTOCOL_VERSION,
            software: SOFTWARE_VERSION.to_string(),
            agent_key,
            nonce: nonce_a,
        })
        .await?;

    let (protocol, relay_software, relay_key, nonce_r, signature) = match recv(reader).await? {
        ServerHello::Incompatible { message, .. } => {
            return Err(HandshakeError::Incompatible(message))
        }
        ServerHello::Challenge {
            protocol,
            software,
            relay_key,
            nonce,
            signature,
        } => (protocol, software, relay_key, nonce, signature),
    };
    if protocol < MIN_PROTOCOL_VERSION || protocol > PROTOCOL_VERSION {
        return Err(HandshakeError::Incompatible(format!(
            "the relay ({relay_software}) wants protocol {protocol}, but this agent ({SOFTWARE_VERSION}) speaks \
             {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}: upgrade the {}",
            if protocol > PROTOCOL_VERSION { "agent" } else { "relay" }
        )));
    }
    let got = Fingerprint::of_bytes(&relay_key);
    if got != params.relay {
        return Err(HandshakeError::WrongRelayKey {
            expected: params.relay,
            got,
        });
    }
    let relay_vk = VerifyingKey::from_bytes(&relay_key).map_err(|_| HandshakeError::InvalidKey)?;
    let t = transcript(
        "relay",
        protocol,
        &nonce_a,
        &nonce_r,
        &agent_key,
        &relay_key,
        params.channel_binding,
    );
    relay_vk
        .verify_strict(&t, &Signature::from_bytes(&signature))
        .map_err(|_| HandshakeError::BadSignature("relay"))?;

    let t = transcript(
        "agent",
        protocol,
        &nonce_a,
        &nonce_r,
        &agent_key,
        &relay_key,
        params.channel_binding,
    );
    let signature = params.key.sign(&t).to_bytes();
    writer
        .send(&ClientAuth {
            signature,
            pair: params.pair,
        })
        .await?;

    match recv(reader).await? {
        Verdict::Welcome(w) => Ok(w),
        Verdict::Rejected { reason, message } => Err(HandshakeError::Rejected { reason, message }),
    }
}

/// An agent that proved possession of its key on this connection. The relay decides what to do with it
/// and answers with a [`Verdict`].
#[derive(Debug, Clone)]
pub struct VerifiedAgent {
    pub key: VerifyingKey,
    pub fingerprint: Fingerprint,
    /// The protocol this session speaks.
    pub protocol: u32,
    pub software: String,
    pub pair: Option<PairRequest>,
}

/// Runs the relay's side up to the agent's proof. The caller sends the [`Verdict`].
pub async fn server<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    relay_key: &SigningKey,
    channel_binding: &[u8],
) -> Result<VerifiedAgent, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        server_inner(reader, writer, relay_key, channel_binding),
    )
    .await
    .map_err(|_| HandshakeError::Timeout(HANDSHAKE_TIMEOUT))?
}

async fn server_inner<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    relay_key: &SigningKey,
    channel_binding: &[u8],
) -> Result<VerifiedAgent, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let hello: ClientHello = recv(reader).await?;
    let Some(protocol) = version::negotiate(hello.protocol).filter(|p| *p >= hello.min_protocol)
    else {
        let message = if hello.protocol < MIN_PROTOCOL_VERSION {
            format!(
                "agent {} (protocol {}) is too old for this relay {SOFTWARE_VERSION}, which needs protocol ≥ \
                 {MIN_PROTOCOL_VERSION}: upgrade the agent (re-run the installer, or `cargo install --locked \
                 ct-agent`) and start it again",
                hello.software, hello.protocol
            )
        } else {
            format!(
                "agent {} needs protocol ≥ {}, but this relay {SOFTWARE_VERSION} speaks at most \
                 {PROTOCOL_VERSION}: ask the relay operator to upgrade the relay, or install an older agent",
                hello.software, hello.min_protocol
            )
        };
        writer
            .send(&ServerHello::Incompatible {
                relay_protocol: PROTOCOL_VERSION,
                relay_min_protocol: MIN_PROTOCOL_VERSION,
                relay_software: SOFTWARE_VERSION.to_string(),
                message: message.clone(),
            })
            .await?;
        return Err(HandshakeError::Incompatible(message));
    };
    let agent_vk =
        VerifyingKey::from_bytes(&hello.agent_key).map_err(|_| HandshakeError::InvalidKey)?;
    let relay_pub = relay_key.verifying_key().to_bytes();
    let nonce_r = nonce();
    let t = transcript(
        "relay",
        protocol,
        &hello.nonce,
        &nonce_r,
        &hello.agent_key,
        &relay_pub,
        channel_binding,
    );
    writer
        .send(&ServerHello::Challenge {
            protocol,
            software: SOFTWARE_VERSION.to_string(),
            relay_key: relay_pub,
            nonce: nonce_r,
            signature: relay_key.sign(&t).to_bytes(),
        })
        .await?;

    let auth: ClientAuth = recv(reader).await?;
    let t = transcript(
        "agent",
        protocol,
        &hello.nonce,
        &nonce_r,
        &hello.agent_key,
        &relay_pub,
        channel_binding,
    );
    agent_vk
        .verify_strict(&t, &Signature::from_bytes(&auth.signature))
        .map_err(|_| HandshakeError::BadSignature("agent"))?;
    Ok(VerifiedAgent {
        fingerprint: Fingerprint::of(&agent_vk),
        key: agent_vk,
        protocol,
        software: hello.software,
        pair: auth.pair,
    })
}
