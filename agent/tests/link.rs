//! The agent against a small in-test relay (QUIC + WebSocket/TLS on one loopback port, the real handshake):
//! pairing, the transport race, the WebSocket fallback and the move back to QUIC, relay close reasons, and
//! graceful shutdown. The real relay's end-to-end tests live in relay/tests; this fake only implements
//! what the agent needs to see.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ct_agent::connect::{ConnectOptions, TransportPolicy};
use ct_agent::proxy::ProxyConfig;
use ct_agent::{LinkStatus, PairError, RunError, RunOptions};
use ct_protocol::handshake::{
    self, Rejection, Verdict, Welcome, CHANNEL_BINDING_LABEL, CHANNEL_BINDING_LEN,
};
use ct_protocol::link::{QUIC_ALPN, WS_MAX_MESSAGE};
use ct_protocol::message::CloseReason;
use ct_protocol::pairing::{PairCode, PairingToken};
use ct_protocol::ws::{WsFrame, WsIo};
use ct_protocol::{AgentMessage, Fingerprint, FrameReader, FrameWriter, RelayMessage, Transport};
use ed25519_dalek::SigningKey;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, PartialEq)]
enum Event {
    Welcomed {
        transport: Transport,
        paired: bool,
    },
    Goodbye {
        transport: Transport,
        reason: String,
    },
}

struct Relay {
    key: SigningKey,
    code: PairCode,
    agents: Mutex<HashSet<[u8; 32]>>,
    reject_pairing: Mutex<Option<Rejection>>,
    /// Sent to every session right after its Welcome, if set.
    close_after_welcome: Mutex<Option<CloseReason>>,
    events: mpsc::UnboundedSender<Event>,
    close_all: broadcast::Sender<CloseReason>,
    tls: Arc<rustls::ServerConfig>,
}

struct Handle {
    relay: Arc<Relay>,
    addr: SocketAddr,
    events: mpsc::UnboundedReceiver<Event>,
    quic: Option<quinn::Endpoint>,
}

impl Handle {
    fn token(&self) -> PairingToken {
        PairingToken {
            relays: vec![self.addr.to_string()],
            code: self.relay.code.clone(),
            relay: Fingerprint::of(&self.relay.key.verifying_key()),
        }
    }

    async fn next_event(&mut self) -> Event {
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .expect("relay event in time")
            .expect("relay alive")
    }

    /// Starts QUIC on the same port (for the "UDP comes back" test).
    fn start_quic(&mut self) {
        let crypto =
            quinn::crypto::rustls::QuicServerConfig::try_from(quic_tls(&self.relay.tls)).unwrap();
        let config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let endpoint = quinn::Endpoint::server(config, self.addr).unwrap();
        let relay = self.relay.clone();
        let accept = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = accept.accept().await {
                let relay = relay.clone();
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    let mut binding = [0u8; CHANNEL_BINDING_LEN];
                    conn.export_keying_material(&mut binding, CHANNEL_BINDING_LABEL, b"")
                        .unwrap();
                    let Ok((send, recv)) = conn.accept_bi().await else {
                        return;
                    };
                    relay
                        .session(
                            Transport::Quic,
                            FrameReader::new(recv),
                            FrameWriter::new(send),
                            &binding,
                        )
                        .await;
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn.closed()).await;
                });
            }
        });
        self.quic = Some(endpoint);
    }
}

fn quic_tls(base: &Arc<rustls::ServerConfig>) -> Arc<rustls::ServerConfig> {
    let mut config = (**base).clone();
    config.alpn_protocols = vec![QUIC_ALPN.to_vec()];
    Arc::new(config)
}

/// A relay on one loopback port: WebSocket on TCP always, QUIC on UDP when `quic` is true.
async fn relay(quic: bool) -> Handle {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
    let (events_tx, events) = mpsc::unbounded_channel();
    let relay = Arc::new(Relay {
        key: SigningKey::generate(&mut rand::rngs::OsRng),
        code: PairCode::generate(),
        agents: Mutex::default(),
        reject_pairing: Mutex::default(),
        close_after_welcome: Mutex::default(),
        events: events_tx,
        close_all: broadcast::channel(4).0,
        tls: Arc::new(tls),
    });

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ws_relay = relay.clone();
    tokio::spawn(async move {
        let mut ws_tls = (*ws_relay.tls).clone();
        ws_tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(ws_tls));
        while let Ok((tcp, _)) = listener.accept().await {
            let relay = ws_relay.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let binding = tls
                    .get_ref()
                    .1
                    .export_keying_material(
                        [0u8; CHANNEL_BINDING_LEN],
                        CHANNEL_BINDING_LABEL,
                        Some(b""),
                    )
                    .unwrap();
                let config = WebSocketConfig::default().max_message_size(Some(WS_MAX_MESSAGE));
                let Ok(ws) = tokio_tungstenite::accept_async_with_config(tls, Some(config)).await
                else {
                    return;
                };
                let (r, w) = tokio::io::split(WsIo::new(ws, Message::Binary, |m| match m {
                    Message::Binary(b) => WsFrame::Data(b),
                    Message::Close(_) => WsFrame::Close,
                    _ => WsFrame::Skip,
                }));
                relay
                    .session(
                        Transport::WebSocket,
                        FrameReader::new(r),
                        FrameWriter::new(w),
                        &binding,
                    )
                    .await;
            });
        }
    });
    let mut handle = Handle {
        relay,
        addr,
        events,
        quic: None,
    };
    if quic {
        handle.start_quic();
    }
    handle
}

impl Relay {
    async fn session<R, W>(
        &self,
        transport: Transport,
        mut reader: FrameReader<R>,
        mut writer: FrameWriter<W>,
        binding: &[u8],
    ) where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let Ok(agent) = handshake::server(&mut reader, &mut writer, &self.key, binding).await
        else {
            return;
        };
        let key = agent.key.to_bytes();
        let verdict = match &agent.pair {
            Some(req) => match *self.reject_pairing.lock().unwrap() {
                Some(reason) => Err(reason),
                None if req.code == self.code.to_string() => {
                    self.agents.lock().unwrap().insert(key);
                    Ok(true)
                }
                None => Err(Rejection::CodeWrong),
            },
            None if self.agents.lock().unwrap().contains(&key) => Ok(false),
            None => Err(Rejection::UnknownKey),
        };
        let paired = match verdict {
            Ok(paired) => paired,
            Err(reason) => {
                let _ = writer
                    .send(&Verdict::Rejected {
                        reason,
                        message: format!("{reason:?}"),
                    })
                    .await;
                return;
            }
        };
        let welcome = Welcome {
            owner: "1234".into(),
            owner_name: Some("alice".into()),
            agent_name: agent.pair.map(|p| p.name).unwrap_or_else(|| "box".into()),
            paired,
            heartbeat_ms: transport.timing().heartbeat.as_millis() as u64,
            relays: Vec::new(),
            live_usage: true,
            tool_output: false,
        };
        if writer.send(&Verdict::Welcome(welcome)).await.is_err() {
            return;
        }
        let _ = self.events.send(Event::Welcomed { transport, paired });
        let close_now = *self.close_after_welcome.lock().unwrap();
        if let Some(reason) = close_now {
            let _ = writer
                .send(&RelayMessage::Closing {
                    reason,
                    message: "test".into(),
                })
                .await;
            return;
        }
        let mut close_all = self.close_all.subscribe();
        let mut beat = tokio::time::interval(transport.timing().heartbeat);
        loop {
            tokio::select! {
                _ = beat.tick() => {
                    if writer.send(&RelayMessage::Heartbeat).await.is_err() {
                        return;
                    }
                }
                Ok(reason) = close_all.recv() => {
                    let _ = writer.send(&RelayMessage::Closing { reason, message: "test".into() }).await;
                    return;
                }
                msg = reader.recv::<AgentMessage>() => match msg {
                    // This stand-in relay runs no tasks.
                    Ok(Some(
                        AgentMessage::Heartbeat
                        | AgentMessage::Running { .. }
                        | AgentMessage::Event { .. }
                        | AgentMessage::Projects(_)
                        | AgentMessage::ProjectReply { .. }
                        | AgentMessage::WorktreeReply { .. },
                    )) => {}
                    Ok(Some(AgentMessage::Goodbye { reason })) => {
                        let _ = self.events.send(Event::Goodbye { transport, reason });
                        let _ = writer.shutdown().await;
                        return;
                    }
                    Ok(None) | Err(_) => return,
                },
            }
        }
    }
}

fn options(policy: TransportPolicy) -> ConnectOptions {
    ConnectOptions {
        policy,
        proxy: ProxyConfig::direct(),
        ..ConnectOptions::default()
    }
}

async fn wait_for(
    rx: &mut watch::Receiver<LinkStatus>,
    what: &str,
    pred: impl Fn(&LinkStatus) -> bool,
) -> LinkStatus {
    let waited = tokio::time::timeout(WAIT, async {
        rx.wait_for(|s| pred(s)).await.map(|s| s.clone())
    })
    .await;
    match waited {
        Ok(found) => found.expect("run alive"),
        Err(_) => panic!(
            "timed out waiting for {what}; last status {:?}",
            *rx.borrow()
        ),
    }
}

fn connected_over(t: Transport) -> impl Fn(&LinkStatus) -> bool {
    move |s| matches!(s, LinkStatus::Connected { transport, .. } if *transport == t)
}

struct Running {
    shutdown: CancellationToken,
    status: watch::Receiver<LinkStatus>,
    task: tokio::task::JoinHandle<Result<(), RunError>>,
}

fn start(opts: RunOptions) -> Running {
    let shutdown = CancellationToken::new();
    let (tx, status) = watch::channel(LinkStatus::Connecting);
    let task = tokio::spawn(ct_agent::run(opts, shutdown.clone(), tx));
    Running {
        shutdown,
        status,
        task,
    }
}

impl Running {
    async fn finish(self) -> Result<(), RunError> {
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("run ends")
            .expect("no panic")
    }
}

#[tokio::test]
async fn pair_then_run_over_quic_then_shut_down_with_goodbye() {
    let mut relay = relay(true).await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cfg");

    let outcome = ct_agent::pair_with(
        &dir,
        &relay.token(),
        Some("laptop".into()),
        false,
        &options(TransportPolicy::Race),
    )
    .await
    .unwrap();
    assert_eq!(outcome.transport, Transport::Quic);
    assert_eq!(outcome.pairing.agent_name, "laptop");
    assert_eq!(outcome.pairing.owner_name.as_deref(), Some("alice"));
    assert_eq!(
        relay.next_event().await,
        Event::Welcomed {
            transport: Transport::Quic,
            paired: true
        }
    );
    assert!(matches!(
        relay.next_event().await,
        Event::Goodbye {
            transport: Transport::Quic,
            ..
        }
    ));
    let mode = |p: &str| std::fs::metadata(dir.join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("agent.key"), 0o600);
    assert_eq!(mode(""), 0o700);
    assert!(!dir.join("agent.key.pending").exists());

    // Pairing again without --force is refused and names the relay.
    let err = ct_agent::pair(&dir, &relay.token(), None, false)
        .await
        .unwrap_err();
    assert!(matches!(err, PairError::AlreadyPaired { .. }), "{err}");
    assert!(err.to_string().contains(&relay.addr.to_string()), "{err}");

    let mut opts = RunOptions::new(&dir);
    opts.connect = options(TransportPolicy::Race);
    let mut agent = start(opts);
    wait_for(
        &mut agent.status,
        "QUIC session",
        connected_over(Transport::Quic),
    )
    .await;
    assert_eq!(
        relay.next_event().await,
        Event::Welcomed {
            transport: Transport::Quic,
            paired: false
        }
    );
    let report = ct_agent::status::gather(&dir).unwrap();
    assert!(report.running, "{report:?}");
    assert_eq!(report.status.unwrap().transport, Some(Transport::Quic));

    agent.shutdown.cancel();
    let mut status = agent.status.clone();
    agent.finish().await.unwrap();
    assert!(matches!(
        relay.next_event().await,
        Event::Goodbye {
            transport: Transport::Quic,
            ..
        }
    ));
    assert_eq!(
        *status.borrow_and_update(),
        LinkStatus::Stopped { error: None }
    );
    assert!(!ct_agent::status::gather(&dir).unwrap().running);
}

#[tokio::test]
async fn without_udp_websocket_wins_and_quic_is_taken_back_when_it_returns() {
    let mut relay = relay(false).await;
    let tmp = tempfile::tempdir().unwrap();
    let started = tokio::time::Instant::now();
    let outcome = ct_agent::pair_with(
        tmp.path(),
        &relay.token(),
        None,
        false,
        &options(TransportPolicy::Race),
    )
    .await
    .unwrap();
    assert_eq!(outcome.transport, Transport::WebSocket);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        relay.next_event().await,
        Event::Welcomed {
            transport: Transport::WebSocket,
            paired: true
        }
    );
    relay.next_event().await; // goodbye after pairing

    let mut opts = RunOptions::new(tmp.path());
    opts.connect = options(TransportPolicy::Race);
    opts.quic_retry = Duration::from_millis(300);
    let mut agent = start(opts);
    wait_for(
        &mut agent.status,
        "WebSocket session",
        connected_over(Transport::WebSocket),
    )
    .await;

    relay.start_quic();
    wait_for(
        &mut agent.status,
        "switch to QUIC",
        connected_over(Transport::Quic),
    )
    .await;
    let mut saw_ws_goodbye = false;
    while !saw_ws_goodbye {
        match relay.next_event().await {
            Event::Goodbye {
                transport: Transport::WebSocket,
                reason,
            } => {
                assert!(reason.contains("QUIC"), "{reason}");
                saw_ws_goodbye = true;
            }
            Event::Welcomed { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    agent.shutdown.cancel();
    agent.finish().await.unwrap();
}

#[tokio::test]
async fn relay_restart_reconnects_at_once_and_revocation_stops() {
    let mut relay = relay(true).await;
    let tmp = tempfile::tempdir().unwrap();
    ct_agent::pair_with(
        tmp.path(),
        &relay.token(),
        None,
        false,
        &options(TransportPolicy::QuicOnly),
    )
    .await
    .unwrap();
    let mut opts = RunOptions::new(tmp.path());
    opts.connect = options(TransportPolicy::QuicOnly);
    let mut agent = start(opts);
    wait_for(
        &mut agent.status,
        "QUIC session",
        connected_over(Transport::Quic),
    )
    .await;
    while relay.next_event().await
        != (Event::Welcomed {
            transport: Transport::Quic,
            paired: false,
        })
    {}

    relay.relay.close_all.send(CloseReason::Shutdown).unwrap();
    wait_for(&mut agent.status, "reconnect", |s| {
        !matches!(s, LinkStatus::Connected { .. })
    })
    .await;
    let back = tokio::time::Instant::now();
    wait_for(
        &mut agent.status,
        "QUIC session again",
        connected_over(Transport::Quic),
    )
    .await;
    assert!(
        back.elapsed() < Duration::from_secs(2),
        "{:?}",
        back.elapsed()
    );

    relay.relay.close_all.send(CloseReason::Revoked).unwrap();
    let err = agent.finish().await.unwrap_err();
    assert!(matches!(err, RunError::Revoked { .. }), "{err}");
    assert!(err.to_string().contains("pair --force"), "{err}");
    assert_eq!(err.exit_code(), 78);
}

#[tokio::test]
async fn another_agent_with_the_same_key_stops_this_one() {
    let relay = relay(true).await;
    let tmp = tempfile::tempdir().unwrap();
    ct_agent::pair_with(
        tmp.path(),
        &relay.token(),
        None,
        false,
        &options(TransportPolicy::QuicOnly),
    )
    .await
    .unwrap();
    *relay.relay.close_after_welcome.lock().unwrap() = Some(CloseReason::Replaced);
    let mut opts = RunOptions::new(tmp.path());
    opts.connect = options(TransportPolicy::QuicOnly);
    let err = start(opts).finish().await.unwrap_err();
    assert!(matches!(err, RunError::Replaced { .. }), "{err}");
    assert!(err.to_string().contains("another ct-agent"), "{err}");
}

#[tokio::test]
async fn pairing_rejections_are_specific_and_leave_no_key() {
    let relay = relay(true).await;
    let tmp = tempfile::tempdir().unwrap();
    for (reason, want) in [
        (Rejection::CodeUsed, "already used"),
        (Rejection::CodeExpired, "expired"),
        (Rejection::RateLimited, "wait a few minutes"),
    ] {
        *relay.relay.reject_pairing.lock().unwrap() = Some(reason);
        let err = ct_agent::pair_with(
            tmp.path(),
            &relay.token(),
            None,
            false,
            &options(TransportPolicy::QuicOnly),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains(want), "{reason:?}: {err}");
        assert!(!tmp.path().join("agent.key").exists());
        assert!(!tmp.path().join("agent.key.pending").exists());
        assert!(!tmp.path().join("pairing.json").exists());
    }
    *relay.relay.reject_pairing.lock().unwrap() = None;
    let mut token = relay.token();
    token.code = PairCode::generate();
    let err = ct_agent::pair_with(
        tmp.path(),
        &token,
        None,
        false,
        &options(TransportPolicy::QuicOnly),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, PairError::CodeWrong { .. }), "{err}");
    assert!(err.to_string().contains("/register"), "{err}");

    // A token pinning another relay key never gets as far as sending the code.
    let mut token = relay.token();
    token.relay = Fingerprint::of_bytes(&[0; 32]);
    let err = ct_agent::pair_with(
        tmp.path(),
        &token,
        None,
        false,
        &options(TransportPolicy::Race),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("pinned"), "{err}");
}

#[tokio::test]
async fn an_unknown_key_is_a_permanent_error() {
    let relay = relay(true).await;
    let tmp = tempfile::tempdir().unwrap();
    ct_agent::pair_with(
        tmp.path(),
        &relay.token(),
        None,
        false,
        &options(TransportPolicy::QuicOnly),
    )
    .await
    .unwrap();
    relay.relay.agents.lock().unwrap().clear();
    let mut opts = RunOptions::new(tmp.path());
    opts.connect = options(TransportPolicy::WebSocketOnly);
    let err = start(opts).finish().await.unwrap_err();
    assert!(matches!(err, RunError::Refused(_)), "{err}");
    assert!(
        err.to_string().contains("does not know this agent's key"),
        "{err}"
    );
}
