//! Reaching the relay: QUIC first, WebSocket over TLS (optionally through an HTTP proxy) as the fallback, raced
//! the way Tailscale races DERP: QUIC starts alone, WebSocket joins after [`RACE_DELAY`] or as soon as QUIC
//! fails, and the first transport whose handshake completes wins.
//!
//! What comes out is a [`Link`]: an authenticated, framed connection plus the relay's `Welcome`.

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ct_protocol::handshake::{self, ClientParams, HandshakeError, PairRequest, Welcome};
use ct_protocol::link::{QUIC_ALPN, WS_MAX_MESSAGE, WS_PATH};
use ct_protocol::ws::{WsFrame, WsIo};
use ct_protocol::{AgentMessage, Fingerprint, FrameReader, FrameWriter, RelayMessage, Transport};
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tracing::Instrument;

use crate::config::AgentKey;
use crate::proxy::{self, ProxyConfig, ProxyError};
use crate::tls;

/// How long QUIC has alone before WebSocket is started as well.
pub const RACE_DELAY: Duration = Duration::from_millis(500);
/// Bound on name resolution, TCP connect, TLS and the WebSocket upgrade, each.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on one whole attempt over one transport, handshake included.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(25);
/// How long closing a link waits for the relay to acknowledge, so shutdown never hangs on a dead peer.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// The receiving half of a link, whichever transport carries it.
pub type BoxReader = Box<dyn AsyncRead + Send + Unpin>;
/// The sending half of a link, whichever transport carries it.
pub type BoxWriter = Box<dyn AsyncWrite + Send + Unpin>;

/// Which transports to try.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportPolicy {
    /// QUIC first, WebSocket raced after [`ConnectOptions::race_delay`]; while on WebSocket, QUIC is retried.
    #[default]
    Race,
    /// QUIC only (no fallback).
    QuicOnly,
    /// WebSocket only (never QUIC), e.g. where UDP is known to be blocked.
    WebSocketOnly,
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub race_delay: Duration,
    pub policy: TransportPolicy,
    /// Proxy for WebSocket connections (QUIC never uses one).
    pub proxy: ProxyConfig,
}

impl Default for ConnectOptions {
    /// Racing, with the proxy settings from the environment.
    fn default() -> Self {
        Self {
            race_delay: RACE_DELAY,
            policy: TransportPolicy::Race,
            proxy: ProxyConfig::from_env(),
        }
    }
}

/// Who the agent is and whom it expects, for one handshake.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub key: AgentKey,
    /// The relay key fingerprint pinned at pairing (or taken from the token while pairing).
    pub relay: Fingerprint,
    /// Only while pairing.
    pub pair: Option<PairRequest>,
}

/// Why a connection attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The relay address is not `host:port`.
    #[error("{addr:?} is not a host:port address")]
    BadAddress { addr: String },
    /// DNS failed or returned nothing.
    #[error("cannot resolve {addr}: {source}")]
    Resolve { addr: String, source: io::Error },
    /// QUIC could not connect (UDP blocked, relay down, TLS refused).
    #[error("QUIC to {addr}: {reason}")]
    Quic { addr: String, reason: String },
    /// TCP could not connect.
    #[error("TCP to {addr}: {source}")]
    Tcp { addr: String, source: io::Error },
    /// TLS over TCP failed.
    #[error("TLS to {addr}: {source}")]
    Tls { addr: String, source: io::Error },
    /// The WebSocket upgrade failed.
    #[error("WebSocket upgrade at {addr}: {reason}")]
    WebSocket { addr: String, reason: String },
    /// The proxy refused or failed.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// The transport worked but the handshake failed.
    #[error("{transport} to {addr}: {source}")]
    Handshake {
        addr: String,
        transport: Transport,
        source: HandshakeError,
    },
    /// One whole attempt took too long.
    #[error("{transport} to {addr}: no session within {after:?}")]
    Timeout {
        addr: String,
        transport: Transport,
        after: Duration,
    },
    /// Both transports failed.
    #[error("{quic}; {websocket}")]
    Both {
        quic: Box<ConnectError>,
        websocket: Box<ConnectError>,
    },
}

impl ConnectError {
    /// The handshake failure inside, if that is what ended the attempt (a permanent one first).
    pub fn handshake(&self) -> Option<&HandshakeError> {
        match self {
            Self::Handshake { source, .. } => Some(source),
            Self::Both { quic, websocket } => {
                let (q, w) = (quic.handshake(), websocket.handshake());
                match (q, w) {
                    (Some(q), _) if q.is_permanent() => Some(q),
                    (_, Some(w)) if w.is_permanent() => Some(w),
                    _ => q.or(w),
                }
            }
            _ => None,
        }
    }

    /// True when retrying cannot help: the relay refused who we are, or the versions are incompatible.
    pub fn is_permanent(&self) -> bool {
        self.handshake().is_some_and(HandshakeError::is_permanent)
    }
}

/// An authenticated session with the relay, ready for [`crate::session`].
pub struct Link {
    pub transport: Transport,
    /// The relay address as written in the pairing (`host:port`).
    pub relay_addr: String,
    pub welcome: Welcome,
    pub reader: FrameReader<BoxReader>,
    pub writer: FrameWriter<BoxWriter>,
    /// Kept so the endpoint lives as long as the connection, and so closing can wait for the peer.
    quic: Option<(quinn::Endpoint, quinn::Connection)>,
    /// A losing race attempt was still in flight when this one won; the relay may yet see it complete and
    /// replace this session with it (see `run`).
    pub(crate) raced: bool,
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("transport", &self.transport)
            .field("relay_addr", &self.relay_addr)
            .field("welcome", &self.welcome)
            .finish_non_exhaustive()
    }
}

impl Link {
    /// Ends the session on purpose: `Goodbye`, end of stream, then wait (bounded) for the relay to close.
    pub async fn close(mut self, reason: &str) {
        let goodbye = AgentMessage::Goodbye {
            reason: reason.to_string(),
        };
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            if self.writer.send(&goodbye).await.is_ok() {
                let _ = self.writer.shutdown().await;
                // Drain until the relay closes its side, so the Goodbye is delivered before the transport is
                // torn down (a QUIC close discards data still in flight).
                while let Ok(Some(_)) = self.reader.recv::<RelayMessage>().await {}
            }
        })
        .await;
        self.abort();
        if let Some((endpoint, _)) = self.quic.take() {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, endpoint.wait_idle()).await;
        }
    }

    /// How many UDP datagrams the QUIC connection under this link has received so far (None on WebSocket):
    /// what the session watches to notice a node that died without a word (see
    /// [`ct_protocol::link::TransportSilence`]).
    pub fn datagrams_received(&self) -> Option<u64> {
        self.quic
            .as_ref()
            .map(|(_, conn)| conn.stats().udp_rx.datagrams)
    }

    /// Drops the transport at once, without a goodbye.
    fn abort(&self) {
        if let Some((_, conn)) = &self.quic {
            conn.close(0u32.into(), b"bye");
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.abort();
    }
}

/// Tries each relay address in order and returns the first session. A permanent failure (the relay refused
/// this agent) stops at once: another address of the same relay would say the same.
pub async fn connect_any(
    relays: &[String],
    creds: &Credentials,
    opts: &ConnectOptions,
) -> Result<Link, ConnectError> {
    let mut last = None;
    for addr in relays {
        match connect(addr, creds, opts).await {
            Ok(link) => return Ok(link),
            Err(e) if e.is_permanent() => return Err(e),
            Err(e) => {
                tracing::info!(relay = %addr, error = %e, "relay address failed");
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| ConnectError::BadAddress {
        addr: String::new(),
    }))
}

/// Connects to one relay address according to `opts.policy`.
pub async fn connect(
    addr: &str,
    creds: &Credentials,
    opts: &ConnectOptions,
) -> Result<Link, ConnectError> {
    match opts.policy {
        TransportPolicy::QuicOnly => attempt_quic(addr, creds).await,
        TransportPolicy::WebSocketOnly => attempt_websocket(addr, creds, &opts.proxy).await,
        TransportPolicy::Race => race(addr, creds, opts).await,
    }
}

/// QUIC alone, in its own span, bounded.
pub async fn attempt_quic(addr: &str, creds: &Credentials) -> Result<Link, ConnectError> {
    let span = tracing::info_span!("connect", transport = "quic", relay = %addr);
    bounded(addr, Transport::Quic, connect_quic(addr, creds))
        .instrument(span)
        .await
}

/// WebSocket alone, in its own span, bounded.
pub async fn attempt_websocket(
    addr: &str,
    creds: &Credentials,
    proxy: &ProxyConfig,
) -> Result<Link, ConnectError> {
    let span = tracing::info_span!("connect", transport = "websocket", relay = %addr);
    bounded(
        addr,
        Transport::WebSocket,
        connect_websocket(addr, creds, proxy),
    )
    .instrument(span)
    .await
}

async fn bounded(
    addr: &str,
    transport: Transport,
    attempt: impl std::future::Future<Output = Result<Link, ConnectError>>,
) -> Result<Link, ConnectError> {
    let result = tokio::time::timeout(ATTEMPT_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(ConnectError::Timeout {
                addr: addr.to_string(),
                transport,
                after: ATTEMPT_TIMEOUT,
            })
        });
    match &result {
        Ok(link) => tracing::debug!(owner = %link.welcome.owner, "session established"),
        Err(e) => tracing::debug!(error = %e, "attempt failed"),
    }
    result
}

/// The race: QUIC now, WebSocket after `race_delay` or as soon as QUIC fails; the first success wins and
/// the other attempt is dropped. An error only ends its own leg, because while pairing the loser of a close
/// race can be refused for a code the winner just used.
async fn race(
    addr: &str,
    creds: &Credentials,
    opts: &ConnectOptions,
) -> Result<Link, ConnectError> {
    let start_ws = || -> BoxFuture<'_, Result<Link, ConnectError>> {
        attempt_websocket(addr, creds, &opts.proxy).boxed()
    };
    let mut quic: Option<BoxFuture<'_, _>> = Some(attempt_quic(addr, creds).boxed());
    let mut ws: Option<BoxFuture<'_, _>> = None;
    let (mut quic_err, mut ws_err) = (None, None);
    let delay = tokio::time::sleep(opts.race_delay);
    tokio::pin!(delay);
    loop {
        tokio::select! {
            result = async { quic.as_mut().expect("guarded").await }, if quic.is_some() => {
                quic = None;
                match result {
                    Ok(mut link) => {
                        link.raced = ws.is_some();
                        return Ok(link);
                    }
                    Err(e) => {
                        let permanent = e.is_permanent();
                        quic_err = Some(e);
                        if ws.is_none() && ws_err.is_none() {
                            if permanent {
                                break;
                            }
                            tracing::debug!(relay = %addr, "QUIC failed fast; trying WebSocket now");
                            ws = Some(start_ws());
                        }
                    }
                }
            }
            result = async { ws.as_mut().expect("guarded").await }, if ws.is_some() => {
                ws = None;
                match result {
                    Ok(mut link) => {
                        link.raced = quic.is_some();
                        return Ok(link);
                    }
                    Err(e) => ws_err = Some(e),
                }
            }
            () = &mut delay, if quic.is_some() && ws.is_none() && ws_err.is_none() => {
                tracing::debug!(relay = %addr, "no QUIC session yet; racing WebSocket");
                ws = Some(start_ws());
            }
        }
        if quic.is_none() && ws.is_none() {
            break;
        }
    }
    Err(match (quic_err, ws_err) {
        (Some(q), Some(w)) => match (q.is_permanent(), w.is_permanent()) {
            (true, _) => q,
            (false, true) => w,
            _ => ConnectError::Both {
                quic: Box::new(q),
                websocket: Box::new(w),
            },
        },
        (Some(e), None) | (None, Some(e)) => e,
        (None, None) => ConnectError::BadAddress {
            addr: addr.to_string(),
        },
    })
}

fn split(addr: &str) -> Result<(&str, u16), ConnectError> {
    tls::split_host_port(addr).ok_or_else(|| ConnectError::BadAddress {
        addr: addr.to_string(),
    })
}

async fn resolve(addr: &str, host: &str, port: u16) -> Result<Vec<SocketAddr>, ConnectError> {
    let err = |source| ConnectError::Resolve {
        addr: addr.to_string(),
        source,
    };
    let addrs: Vec<_> = tokio::time::timeout(STEP_TIMEOUT, tokio::net::lookup_host((host, port)))
        .await
        .map_err(|_| err(io::ErrorKind::TimedOut.into()))?
        .map_err(err)?
        .collect();
    if addrs.is_empty() {
        return Err(err(io::Error::new(io::ErrorKind::NotFound, "no addresses")));
    }
    Ok(addrs)
}

async fn connect_quic(addr: &str, creds: &Credentials) -> Result<Link, ConnectError> {
    let quic_err = |reason: String| ConnectError::Quic {
        addr: addr.to_string(),
        reason,
    };
    let (host, port) = split(addr)?;
    let remote = resolve(addr, host, port).await?[0];
    let bind: SocketAddr = if remote.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };

    let tls = tls::client_config(QUIC_ALPN).map_err(|e| quic_err(e.to_string()))?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| quic_err(e.to_string()))?;
    let timing = Transport::Quic.timing();
    let mut transport = quinn::TransportConfig::default();
    // quinn's keep-alive is off by default; without it an idle link is only noticed by our own heartbeat.
    transport.keep_alive_interval(Some(timing.heartbeat));
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(timing.dead_after).map_err(|e| quic_err(e.to_string()))?,
    ));
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport));

    let endpoint = quinn::Endpoint::client(bind).map_err(|e| quic_err(e.to_string()))?;
    let conn = endpoint
        .connect_with(config, remote, host)
        .map_err(|e| quic_err(e.to_string()))?
        .await
        .map_err(|e| quic_err(e.to_string()))?;
    let binding = tls::quic_channel_binding(&conn).map_err(quic_err)?;
    let (send, recv) = conn.open_bi().await.map_err(|e| quic_err(e.to_string()))?;
    let reader = FrameReader::new(Box::new(recv) as BoxReader);
    let writer = FrameWriter::new(Box::new(send) as BoxWriter);
    finish(
        addr,
        Transport::Quic,
        reader,
        writer,
        &binding,
        creds,
        Some((endpoint, conn)),
    )
    .await
}

async fn connect_websocket(
    addr: &str,
    creds: &Credentials,
    proxy_config: &ProxyConfig,
) -> Result<Link, ConnectError> {
    let (host, port) = split(addr)?;
    let tcp = match proxy_for(proxy_config, host)? {
        Some(p) => {
            tracing::debug!(proxy = %p, "connecting through proxy");
            proxy::connect_via(&p, host, port).await?
        }
        None => tcp_connect(addr, host, port).await?,
    };
    let _ = tcp.set_nodelay(true);

    let tls_err = |source| ConnectError::Tls {
        addr: addr.to_string(),
        source,
    };
    let config = tls::client_config(b"http/1.1").map_err(|e| tls_err(io::Error::other(e)))?;
    let server_name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| tls_err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    let tls_stream = tokio::time::timeout(
        STEP_TIMEOUT,
        tokio_rustls::TlsConnector::from(config).connect(server_name, tcp),
    )
    .await
    .map_err(|_| tls_err(io::ErrorKind::TimedOut.into()))?
    .map_err(tls_err)?;
    let binding = tls::tcp_channel_binding(tls_stream.get_ref().1)
        .map_err(|e| tls_err(io::Error::other(e)))?;

    let url = format!("wss://{}{WS_PATH}", authority(host, port));
    let ws_config = WebSocketConfig::default()
        .max_message_size(Some(WS_MAX_MESSAGE))
        .max_frame_size(Some(WS_MAX_MESSAGE));
    let ws_err = |reason: String| ConnectError::WebSocket {
        addr: addr.to_string(),
        reason,
    };
    let (ws, _response) = tokio::time::timeout(
        STEP_TIMEOUT,
        tokio_tungstenite::client_async_with_config(url, tls_stream, Some(ws_config)),
    )
    .await
    .map_err(|_| ws_err(format!("no answer within {STEP_TIMEOUT:?}")))?
    .map_err(|e| ws_err(e.to_string()))?;
    let (read, write) = tokio::io::split(WsIo::new(ws, Message::Binary, ws_frame));
    finish(
        addr,
        Transport::WebSocket,
        FrameReader::new(Box::new(read) as BoxReader),
        FrameWriter::new(Box::new(write) as BoxWriter),
        &binding,
        creds,
        None,
    )
    .await
}

/// What a WebSocket message means for the byte stream.
fn ws_frame(msg: Message) -> WsFrame {
    match msg {
        Message::Binary(b) => WsFrame::Data(b),
        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => WsFrame::Skip,
        Message::Close(_) => WsFrame::Close,
        // The relay never sends text; a text message (bounded by the message size limit) is ignored rather
        // than fed into the framing, where it would desynchronise the stream.
        Message::Text(_) => {
            tracing::warn!("ignoring a text WebSocket message from the relay");
            WsFrame::Skip
        }
    }
}

/// Loopback never goes through a proxy: a proxy cannot reach our own loopback, and curl-era `*_proxy`
/// settings rarely list it.
fn proxy_for(config: &ProxyConfig, host: &str) -> Result<Option<proxy::ProxyUrl>, ProxyError> {
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback {
        return Ok(None);
    }
    config.proxy_for(host)
}

async fn tcp_connect(addr: &str, host: &str, port: u16) -> Result<TcpStream, ConnectError> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no addresses");
    for remote in resolve(addr, host, port).await? {
        match tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(remote)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => last = e,
            Err(_) => last = io::ErrorKind::TimedOut.into(),
        }
    }
    Err(ConnectError::Tcp {
        addr: addr.to_string(),
        source: last,
    })
}

fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

async fn finish(
    addr: &str,
    transport: Transport,
    mut reader: FrameReader<BoxReader>,
    mut writer: FrameWriter<BoxWriter>,
    binding: &[u8],
    creds: &Credentials,
    quic: Option<(quinn::Endpoint, quinn::Connection)>,
) -> Result<Link, ConnectError> {
    let params = ClientParams {
        key: creds.key.signing_key(),
        relay: creds.relay,
        channel_binding: binding,
        pair: creds.pair.clone(),
    };
    match handshake::client(&mut reader, &mut writer, params).await {
        Ok(welcome) => Ok(Link {
            transport,
            relay_addr: addr.to_string(),
            welcome,
            reader,
            writer,
            quic,
            raced: false,
        }),
        Err(source) => {
            if let Some((_, conn)) = &quic {
                conn.close(0u32.into(), b"handshake failed");
            }
            Err(ConnectError::Handshake {
                addr: addr.to_string(),
                transport,
                source,
            })
        }
    }
}
