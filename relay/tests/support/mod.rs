//! Test support: a relay started in-process on 127.0.0.1:0, and a raw client that can speak the protocol
//! correctly or send anything at all, over QUIC or WebSocket.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ct_protocol::frame::{FrameReader, FrameWriter};
use ct_protocol::handshake::{
    self, ClientParams, HandshakeError, PairRequest, Welcome, CHANNEL_BINDING_LABEL,
};
use ct_protocol::link::{QUIC_ALPN, WS_PATH};
use ct_protocol::pairing::PairingToken;
use ct_protocol::ws::{WsFrame, WsIo};
use ct_protocol::{Fingerprint, Transport};
use ct_relay::core::Core;
use ct_relay::{Relay, RelayConfig};
use ed25519_dalek::SigningKey;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

pub type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
pub type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// A relay running in this process.
pub struct TestRelay {
    pub addr: SocketAddr,
    pub fingerprint: Fingerprint,
    pub core: Core,
    /// The endpoints' connection limits.
    pub admission: ct_relay::endpoint::limits::Admission,
    pub data_dir: PathBuf,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestRelay {
    pub async fn start(data_dir: &Path) -> Self {
        Self::start_with(RelayConfig::new(
            data_dir.to_path_buf(),
            "127.0.0.1:0".parse().unwrap(),
        ))
        .await
    }

    pub async fn start_with(config: RelayConfig) -> Self {
        let data_dir = config.data_dir.clone();
        let relay = Relay::bind(config).await.expect("relay binds");
        let addr = relay.https_addr().or(relay.quic_addr()).unwrap();
        let (fingerprint, core, admission) = (relay.fingerprint(), relay.core(), relay.admission());
        let shutdown = CancellationToken::new();
        let task = Some(tokio::spawn(relay.run(shutdown.clone())));
        Self {
            addr,
            fingerprint,
            core,
            admission,
            data_dir,
            shutdown,
            task,
        }
    }

    /// Graceful stop, as on SIGTERM.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }

    pub async fn token(&self, user: &str) -> PairingToken {
        self.core.mint_pairing_token(user).await.unwrap().0
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Accepts any certificate but still checks the TLS 1.3 handshake signature; the handshake's channel
/// binding is what authenticates the relay (as in the agent).
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 not allowed".into()))
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn tls(alpn: &[u8]) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    cfg
}

/// A raw connection: the byte stream plus its channel binding. Keeps the QUIC endpoint alive.
pub struct Raw {
    pub read: BoxRead,
    pub write: BoxWrite,
    pub binding: [u8; 32],
    pub quic: Option<(quinn::Endpoint, quinn::Connection)>,
}

pub async fn raw(transport: Transport, addr: SocketAddr) -> Raw {
    match transport {
        Transport::Quic => raw_quic(addr).await,
        Transport::WebSocket => raw_ws(addr).await,
    }
}

/// A QUIC client configuration that reaches the relay (the handshake, not the certificate, authenticates it).
pub fn quic_client_config() -> quinn::ClientConfig {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls(QUIC_ALPN)).unwrap();
    quinn::ClientConfig::new(Arc::new(crypto))
}

pub async fn raw_quic(addr: SocketAddr) -> Raw {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quic_client_config());
    let conn = endpoint.connect(addr, "relay").unwrap().await.unwrap();
    let (send, recv) = conn.open_bi().await.unwrap();
    let mut binding = [0; 32];
    conn.export_keying_material(&mut binding, CHANNEL_BINDING_LABEL, b"")
        .unwrap();
    Raw {
        read: Box::new(recv),
        write: Box::new(send),
        binding,
        quic: Some((endpoint, conn)),
    }
}

pub async fn raw_ws(addr: SocketAddr) -> Raw {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls(b"http/1.1")));
    let tls = connector
        .connect(ServerName::try_from("relay").unwrap(), tcp)
        .await
        .unwrap();
    let mut binding = [0; 32];
    tls.get_ref()
        .1
        .export_keying_material(&mut binding, CHANNEL_BINDING_LABEL, Some(b""))
        .unwrap();
    let (ws, _) = tokio_tungstenite::client_async(format!("wss://{addr}{WS_PATH}"), tls)
        .await
        .unwrap();
    let io = WsIo::new(ws, Message::Binary, |m| match m {
        Message::Binary(b) => WsFrame::Data(b),
        Message::Close(_) => WsFrame::Close,
        _ => WsFrame::Skip,
    });
    let (read, write) = tokio::io::split(io);
    Raw {
        read: Box::new(read),
        write: Box::new(write),
        binding,
        quic: None,
    }
}

/// A protocol-correct client session.
pub struct Session {
    pub reader: FrameReader<BoxRead>,
    pub writer: FrameWriter<BoxWrite>,
    pub welcome: Welcome,
    pub raw_quic: Option<(quinn::Endpoint, quinn::Connection)>,
    /// Messages read while waiting for an acknowledgement, for the next [`recv`].
    pub held: std::collections::VecDeque<ct_protocol::RelayMessage>,
    /// The highest acknowledgement seen per task.
    pub acked: std::collections::HashMap<String, u64>,
}

impl Session {
    fn saw_ack(&mut self, task: String, seq: u64) {
        let top = self.acked.entry(task).or_default();
        assert!(seq >= *top, "acknowledgements only move forward");
        *top = seq;
    }
}

/// `code` with its last character changed to the `n`th other character of the codes' alphabet: a wrong code
/// that parses, for distinct `n` a distinct one, and never the right one. (A fixed replacement, such as "zz"
/// for the last two characters, is the right code whenever the code happens to end in it: 1 run in 961.)
pub fn wrong_code(code: &str, n: usize) -> String {
    let mut wrong = code.to_string();
    let last = wrong.pop().expect("a code is not empty");
    let others: Vec<char> = ct_protocol::pairing::ALPHABET
        .iter()
        .map(|b| *b as char)
        .filter(|c| *c != last)
        .collect();
    wrong.push(others[n % others.len()]);
    wrong
}

/// Pairs a fresh key with `code` over QUIC: `Ok` when paired, else the relay's rejection and its message.
pub async fn try_pair(
    relay: &TestRelay,
    code: String,
) -> Result<(), (handshake::Rejection, String)> {
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let pair = PairRequest {
        code,
        name: "x".into(),
    };
    match self::handshake(
        Transport::Quic,
        relay.addr,
        &key,
        relay.fingerprint,
        Some(pair),
    )
    .await
    {
        Ok(_) => Ok(()),
        Err(HandshakeError::Rejected { reason, message }) => Err((reason, message)),
        Err(e) => panic!("unexpected handshake error: {e}"),
    }
}

pub async fn handshake(
    transport: Transport,
    addr: SocketAddr,
    key: &SigningKey,
    relay: Fingerprint,
    pair: Option<PairRequest>,
) -> Result<Session, HandshakeError> {
    let raw = raw(transport, addr).await;
    let (mut reader, mut writer) = (FrameReader::new(raw.read), FrameWriter::new(raw.write));
    let welcome = handshake::client(
        &mut reader,
        &mut writer,
        ClientParams {
            key,
            relay,
            channel_binding: &raw.binding,
            pair,
        },
    )
    .await?;
    Ok(Session {
        reader,
        writer,
        welcome,
        raw_quic: raw.quic,
        held: Default::default(),
        acked: Default::default(),
    })
}

/// Pairs a fresh key with the relay and returns the key.
pub async fn pair(relay: &TestRelay, transport: Transport, user: &str) -> SigningKey {
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let token = relay.token(user).await;
    let pair = PairRequest {
        code: token.code.to_string(),
        name: "test-agent".into(),
    };
    let s = handshake(transport, relay.addr, &key, relay.fingerprint, Some(pair))
        .await
        .expect("pairing succeeds");
    assert!(s.welcome.paired);
    key
}

pub use ct_testkit::{eventually, eventually_async};

/// Reads relay messages, skipping heartbeats and acknowledgements (recorded for [`expect_ack`]): the relay
/// acknowledges once a flush covers an event, so acknowledgements arrive in batches and interleave freely
/// with what the relay sends meanwhile.
pub async fn recv(s: &mut Session) -> ct_protocol::RelayMessage {
    if let Some(held) = s.held.pop_front() {
        return held;
    }
    loop {
        match read(s).await {
            ct_protocol::RelayMessage::Ack { task, seq } => s.saw_ack(task, seq),
            other => return other,
        }
    }
}

/// The next message off the wire other than a heartbeat.
async fn read(s: &mut Session) -> ct_protocol::RelayMessage {
    loop {
        match s
            .reader
            .recv_timeout::<ct_protocol::RelayMessage>(Duration::from_secs(10))
            .await
            .expect("relay message")
        {
            ct_protocol::RelayMessage::Heartbeat => continue,
            other => return other,
        }
    }
}

/// Reads the next message, which must start a task; returns its spec.
pub async fn expect_start(s: &mut Session) -> ct_protocol::task::TaskSpec {
    match recv(s).await {
        ct_protocol::RelayMessage::StartTask(spec) => spec,
        other => panic!("expected StartTask, got {other:?}"),
    }
}

pub async fn send_event(
    s: &mut Session,
    task: &str,
    seq: u64,
    event: ct_protocol::task::TaskEvent,
) {
    s.writer
        .send(&ct_protocol::AgentMessage::Event {
            task: task.into(),
            seq,
            event,
        })
        .await
        .unwrap();
}

/// Waits until the relay has acknowledged `task` up to at least `seq` (acknowledgements are cumulative).
/// Other messages that arrive meanwhile are kept for [`recv`], in order.
pub async fn expect_ack(s: &mut Session, task: &str, seq: u64) {
    while s.acked.get(task).copied().unwrap_or(0) < seq {
        match read(s).await {
            ct_protocol::RelayMessage::Ack { task, seq } => s.saw_ack(task, seq),
            other => s.held.push_back(other),
        }
    }
}

/// Sends event `seq` and waits for its acknowledgement, so the relay has stored it.
pub async fn event_acked(
    s: &mut Session,
    task: &str,
    seq: u64,
    event: ct_protocol::task::TaskEvent,
) {
    send_event(s, task, seq, event).await;
    expect_ack(s, task, seq).await;
}

pub fn finished(state: ct_protocol::task::FinalState) -> ct_protocol::task::TaskEvent {
    ct_protocol::task::TaskEvent::Finished {
        state,
        message: None,
    }
}

/// Whether the relay counts the agent with this key as online.
pub async fn is_online(relay: &TestRelay, key: &SigningKey) -> bool {
    let fp = Fingerprint::of(&key.verifying_key());
    relay
        .core
        .agents()
        .await
        .unwrap()
        .iter()
        .any(|a| a.fingerprint == fp && a.online)
}

/// Pairs a fresh agent for `user` and connects it (QUIC), waiting until the relay has it online and the
/// pairing session is gone.
pub async fn agent(relay: &TestRelay, user: &str) -> (SigningKey, Session) {
    let key = pair(relay, Transport::Quic, user).await;
    let s = connect(relay, &key).await;
    (key, s)
}

/// Connects an already paired agent and waits until the relay has registered this very session (an earlier
/// one with the same key may still be live for a moment: the relay must not send to that one).
pub async fn connect(relay: &TestRelay, key: &SigningKey) -> Session {
    let s = handshake(Transport::Quic, relay.addr, key, relay.fingerprint, None)
        .await
        .unwrap();
    let local = s
        .raw_quic
        .as_ref()
        .unwrap()
        .0
        .local_addr()
        .unwrap()
        .to_string();
    let fp = Fingerprint::of(&key.verifying_key());
    eventually_async(Duration::from_secs(5), async || {
        relay
            .core
            .agents()
            .await
            .unwrap()
            .iter()
            .any(|a| a.fingerprint == fp && a.peer.as_deref() == Some(local.as_str()))
    })
    .await;
    s
}

/// A TLS connection to the relay's HTTPS port, as a browser or Discord would open it.
pub async fn https_connect(
    addr: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(tls(b"http/1.1")))
        .connect(ServerName::try_from("relay").unwrap(), tcp)
        .await
}

/// Sends one whole HTTP/1.1 request (`Connection: close`) and returns the status code and the response text.
pub async fn http_request(addr: SocketAddr, head: &str, body: &[u8]) -> (u16, String) {
    try_http_request(addr, head, body)
        .await
        .expect("an HTTP answer from the relay")
}

/// [`http_request`], saying why when there is no answer (refused, reset, not HTTP).
pub async fn try_http_request(
    addr: SocketAddr,
    head: &str,
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = https_connect(addr).await?;
    let request = format!(
        "{head} HTTP/1.1\r\nhost: relay\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    tls.write_all(request.as_bytes()).await?;
    tls.write_all(body).await?;
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no HTTP status in {text:?}")))?;
    Ok((status, text))
}
