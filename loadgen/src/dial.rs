//! Reaching the relay the way an agent does: QUIC, or WebSocket over TLS, from a chosen loopback source
//! address, then the full mutual handshake; and the race `ct-agent` runs (QUIC alone first, WebSocket joins
//! after 500 ms or as soon as QUIC fails).
//!
//! Each agent dials from its own address in 127.0.0.0/8, as agents on separate machines would. Besides being
//! closer to a real fleet, it keeps the relay's per-address pairing limit (10 at once, then one per 6 s) from
//! throttling a benchmark that pairs thousands of keys from one host.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use ct_protocol::frame::{FrameReader, FrameWriter};
use ct_protocol::handshake::{
    self, ClientParams, PairRequest, Welcome, CHANNEL_BINDING_LABEL, CHANNEL_BINDING_LEN,
};
use ct_protocol::link::{QUIC_ALPN, WS_MAX_MESSAGE, WS_PATH};
use ct_protocol::ws::{WsFrame, WsIo};
use ct_protocol::{AgentMessage, Fingerprint, Transport};
use ed25519_dalek::SigningKey;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use crate::tls;

/// How long QUIC runs alone before WebSocket joins the race, as in `ct-agent`.
pub const RACE_DELAY: Duration = ct_agent::connect::RACE_DELAY;
/// Bound on one attempt over one transport, handshake included, as in `ct-agent`.
pub const ATTEMPT_TIMEOUT: Duration = ct_agent::connect::ATTEMPT_TIMEOUT;

pub type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
pub type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// Which transport an agent uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dial {
    Quic,
    WebSocket,
    /// What `ct-agent run` does: QUIC first, WebSocket raced after [`RACE_DELAY`].
    Race,
}

/// The relay to reach, with the client configurations every agent of a scenario shares.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// The relay key fingerprint agents pin.
    pub relay: Fingerprint,
    quic: quinn::ClientConfig,
    ws_tls: Arc<rustls::ClientConfig>,
}

impl Target {
    pub fn new(addr: SocketAddr, relay: Fingerprint) -> Self {
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(
            (*tls::client_config(QUIC_ALPN)).clone(),
        )
        .expect("a TLS 1.3 config is a valid QUIC config");
        let timing = Transport::Quic.timing();
        let mut transport = quinn::TransportConfig::default();
        // The agent's settings: keep-alive below the idle timeout, so a dead link is noticed in 4 s.
        transport.keep_alive_interval(Some(timing.heartbeat));
        transport.max_idle_timeout(Some(
            timing
                .dead_after
                .try_into()
                .expect("a few seconds is a valid idle timeout"),
        ));
        let mut quic = quinn::ClientConfig::new(Arc::new(crypto));
        quic.transport_config(Arc::new(transport));
        Self {
            addr,
            relay,
            quic,
            ws_tls: tls::client_config(b"http/1.1"),
        }
    }
}

/// Who is dialling: the agent key, and the loopback address it dials from.
#[derive(Debug)]
pub struct Identity {
    pub key: SigningKey,
    /// The Discord user the key is (or will be) paired with; one user per agent, as most users have one.
    pub user: String,
    pub name: String,
    pub source: IpAddr,
}

impl Identity {
    /// A fresh key for agent number `index`.
    pub fn generate(index: usize) -> Self {
        Self {
            key: SigningKey::generate(&mut rand::rngs::OsRng),
            user: (100_000_000_000_000_000u64 + index as u64).to_string(),
            name: format!("lg-{index}"),
            source: source_address(index),
        }
    }

    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.key.verifying_key())
    }
}

/// Eight agents per source address (under the pairing burst of ten), spread over 127.10.0.0/16.
pub fn source_address(index: usize) -> IpAddr {
    let group = index / 8;
    IpAddr::from([127, 10, (group / 250 % 256) as u8, (group % 250 + 1) as u8])
}

/// An authenticated session, ready for session messages.
pub struct Link {
    pub transport: Transport,
    pub reader: FrameReader<BoxRead>,
    pub writer: FrameWriter<BoxWrite>,
    pub welcome: Welcome,
    /// Both transports were tried at once for this link, so the loser's handshake may still complete at the
    /// relay and replace this session (the agent treats that as its own doing, not another agent's).
    pub raced: bool,
    /// Kept so the QUIC connection (and its endpoint's socket) lives as long as the link.
    quic: Option<(quinn::Endpoint, quinn::Connection)>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("transport", &self.transport)
            .field("agent", &self.welcome.agent_name)
            .finish()
    }
}

impl Link {
    /// The QUIC connection under the link, if it is one.
    pub fn quic_connection(&self) -> Option<&quinn::Connection> {
        self.quic.as_ref().map(|(_, conn)| conn)
    }

    /// UDP datagrams received so far on the QUIC connection under the link (None on WebSocket), as
    /// `ct-agent`'s `Link::datagrams_received`.
    pub fn datagrams_received(&self) -> Option<u64> {
        self.quic_connection()
            .map(|conn| conn.stats().udp_rx.datagrams)
    }

    /// Leaves politely, as `ct-agent` does on shutdown: Goodbye, then close, bounded so a dead relay cannot
    /// hold us up.
    pub async fn close(mut self, reason: &str) {
        let bye = AgentMessage::Goodbye {
            reason: reason.into(),
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = self.writer.send(&bye).await;
            let _ = self.writer.shutdown().await;
        })
        .await;
        if let Some((_, conn)) = &self.quic {
            conn.close(0u32.into(), b"goodbye");
        }
    }
}

/// Why an attempt failed, and whether trying again could help.
#[derive(Debug)]
pub struct DialError {
    /// The relay refused this key for good (unknown, revoked) or the pin is wrong.
    pub permanent: bool,
    pub error: anyhow::Error,
}

impl std::fmt::Display for DialError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

impl From<anyhow::Error> for DialError {
    fn from(error: anyhow::Error) -> Self {
        Self {
            permanent: false,
            error,
        }
    }
}

/// Connects and completes the handshake with `how`; `pair` carries a one-time code while pairing.
pub async fn dial(
    target: &Target,
    who: &Identity,
    how: Dial,
    pair: Option<PairRequest>,
) -> Result<Link, DialError> {
    match how {
        Dial::Quic => attempt(target, who, Transport::Quic, pair).await,
        Dial::WebSocket => attempt(target, who, Transport::WebSocket, pair).await,
        Dial::Race => race(target, who).await,
    }
}

/// QUIC alone for [`RACE_DELAY`], then WebSocket as well; the first handshake to complete wins and the other
/// attempt is dropped (which closes it).
async fn race(target: &Target, who: &Identity) -> Result<Link, DialError> {
    let quic = attempt(target, who, Transport::Quic, None);
    tokio::pin!(quic);
    let quic_failed = tokio::select! {
        r = &mut quic => match r {
            Ok(link) => return Ok(link),
            Err(e) if e.permanent => return Err(e),
            Err(e) => Some(e),
        },
        () = tokio::time::sleep(RACE_DELAY) => None,
    };
    let ws = attempt(target, who, Transport::WebSocket, None);
    if quic_failed.is_some() {
        return ws.await;
    }
    tokio::pin!(ws);
    let won = tokio::select! {
        r = &mut quic => match r {
            Ok(link) => Ok(link),
            Err(e) if e.permanent => Err(e),
            Err(_) => ws.await,
        },
        r = &mut ws => match r {
            Ok(link) => Ok(link),
            Err(e) if e.permanent => Err(e),
            Err(_) => quic.await,
        },
    };
    won.map(|link| Link {
        raced: true,
        ..link
    })
}

async fn attempt(
    target: &Target,
    who: &Identity,
    transport: Transport,
    pair: Option<PairRequest>,
) -> Result<Link, DialError> {
    let connect = async {
        let (read, write, binding, quic) = match transport {
            Transport::Quic => quic(target, who.source).await?,
            Transport::WebSocket => websocket(target, who.source).await?,
        };
        let (mut reader, mut writer) = (FrameReader::new(read), FrameWriter::new(write));
        let params = ClientParams {
            key: &who.key,
            relay: target.relay,
            channel_binding: &binding,
            pair,
        };
        match handshake::client(&mut reader, &mut writer, params).await {
            Ok(welcome) => Ok(Link {
                transport,
                reader,
                writer,
                welcome,
                raced: false,
                quic,
            }),
            Err(e) => Err(DialError {
                permanent: e.is_permanent(),
                error: anyhow!(e).context(format!("{transport} handshake")),
            }),
        }
    };
    tokio::time::timeout(ATTEMPT_TIMEOUT, connect)
        .await
        .unwrap_or_else(|_| Err(anyhow!("{transport} attempt timed out").into()))
}

type Opened = (
    BoxRead,
    BoxWrite,
    [u8; CHANNEL_BINDING_LEN],
    Option<(quinn::Endpoint, quinn::Connection)>,
);

async fn quic(target: &Target, source: IpAddr) -> anyhow::Result<Opened> {
    let socket = std::net::UdpSocket::bind(SocketAddr::new(source, 0))
        .with_context(|| format!("binding UDP on {source}"))?;
    // One endpoint (one socket) per agent, as on separate machines.
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .context("starting a QUIC endpoint")?;
    let conn = endpoint
        .connect_with(target.quic.clone(), target.addr, "relay")?
        .await
        .context("QUIC connect")?;
    let (send, recv) = conn.open_bi().await.context("opening the QUIC stream")?;
    let mut binding = [0u8; CHANNEL_BINDING_LEN];
    conn.export_keying_material(&mut binding, CHANNEL_BINDING_LABEL, b"")
        .map_err(|_| anyhow!("TLS exporter unavailable"))?;
    Ok((
        Box::new(recv),
        Box::new(send),
        binding,
        Some((endpoint, conn)),
    ))
}

async fn websocket(target: &Target, source: IpAddr) -> anyhow::Result<Opened> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket
        .bind(SocketAddr::new(source, 0))
        .with_context(|| format!("binding TCP on {source}"))?;
    let tcp = socket.connect(target.addr).await.context("TCP connect")?;
    let _ = tcp.set_nodelay(true);
    let tls = tokio_rustls::TlsConnector::from(target.ws_tls.clone())
        .connect(
            rustls::pki_types::ServerName::try_from("relay").expect("a valid name"),
            tcp,
        )
        .await
        .context("TLS")?;
    let mut binding = [0u8; CHANNEL_BINDING_LEN];
    tls.get_ref()
        .1
        .export_keying_material(&mut binding, CHANNEL_BINDING_LABEL, Some(b""))
        .map_err(|e| anyhow!("TLS exporter unavailable: {e}"))?;
    // The agent's limits, but a 4 KiB read buffer instead of tungstenite's 128 KiB (which it zero-fills on
    // every read): this is the load generator's memory, not the relay's, and 10,000 of them add up.
    let config = WebSocketConfig::default()
        .max_message_size(Some(WS_MAX_MESSAGE))
        .max_frame_size(Some(WS_MAX_MESSAGE))
        .read_buffer_size(4096);
    let (ws, _) = tokio_tungstenite::client_async_with_config(
        format!("wss://{}{WS_PATH}", target.addr),
        tls,
        Some(config),
    )
    .await
    .context("WebSocket upgrade")?;
    let io = WsIo::new(ws, Message::Binary, |m| match m {
        Message::Binary(b) => WsFrame::Data(b),
        Message::Close(_) => WsFrame::Close,
        _ => WsFrame::Skip,
    });
    let (read, write) = tokio::io::split(io);
    Ok((Box::new(read), Box::new(write), binding, None))
}
