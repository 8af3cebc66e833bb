//! The handshake over in-memory pipes, including the attacks it exists to stop.

use ct_protocol::frame::{self, FrameReader, FrameWriter};
use ct_protocol::handshake::{
    self, ClientAuth, ClientHello, ClientParams, HandshakeError, PairRequest, Rejection,
    ServerHello, Verdict, Welcome,
};
use ct_protocol::version::{PROTOCOL_VERSION, SOFTWARE_VERSION};
use ct_protocol::Fingerprint;
use ed25519_dalek::SigningKey;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

type Reader = FrameReader<tokio::io::ReadHalf<DuplexStream>>;
type Writer = FrameWriter<tokio::io::WriteHalf<DuplexStream>>;

fn pipe() -> ((Reader, Writer), (Reader, Writer)) {
    let (a, b) = tokio::io::duplex(8);
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    (
        (FrameReader::new(ar), FrameWriter::new(aw)),
        (FrameReader::new(br), FrameWriter::new(bw)),
    )
}

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn welcome() -> Welcome {
    Welcome {
        owner: "42".into(),
        owner_name: None,
        agent_name: "laptop".into(),
        paired: true,
        heartbeat_ms: 1000,
        relays: Vec::new(),
        live_usage: true,
        tool_output: false,
    }
}

/// Runs the relay side to completion, admitting whoever verifies.
async fn serve(
    mut r: Reader,
    mut w: Writer,
    relay: SigningKey,
    binding: Vec<u8>,
) -> Result<handshake::VerifiedAgent, HandshakeError> {
    let verified = handshake::server(&mut r, &mut w, &relay, &binding).await?;
    w.send(&Verdict::Welcome(welcome())).await?;
    Ok(verified)
}

#[tokio::test]
async fn both_sides_authenticate_and_the_code_arrives() {
    let ((cr, cw), (sr, sw)) = pipe();
    let (agent, relay) = (key(1), key(2));
    let server = tokio::spawn(serve(sr, sw, relay.clone(), b"binding".to_vec()));
    let (mut cr, mut cw) = (cr, cw);
    let got = handshake::client(
        &mut cr,
        &mut cw,
        ClientParams {
            key: &agent,
            relay: Fingerprint::of(&relay.verifying_key()),
            channel_binding: b"binding",
            pair: Some(PairRequest {
                code: "abc".into(),
                name: "laptop".into(),
            }),
        },
    )
    .await
    .unwrap();
    assert_eq!(got, welcome());
    let verified = server.await.unwrap().unwrap();
    assert_eq!(
        verified.fingerprint,
        Fingerprint::of(&agent.verifying_key())
    );
    assert_eq!(verified.protocol, PROTOCOL_VERSION);
    assert_eq!(verified.pair.unwrap().code, "abc");
}

#[tokio::test]
async fn a_relay_with_another_key_is_refused_before_the_code_is_sent() {
    let ((mut cr, mut cw), (mut sr, mut sw)) = pipe();
    let impostor = key(9);
    let server = tokio::spawn(async move {
        let r = handshake::server(&mut sr, &mut sw, &impostor, b"b").await;
        (r, sr)
    });
    let err = handshake::client(
        &mut cr,
        &mut cw,
        ClientParams {
            key: &key(1),
            relay: Fingerprint::of(&key(2).verifying_key()),
            channel_binding: b"b",
            pair: Some(PairRequest {
                code: "secret-code".into(),
                name: "x".into(),
            }),
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(err, HandshakeError::WrongRelayKey { .. }), "{err}");
    assert!(err.to_string().contains("pair again"), "{err}");
    drop((cr, cw));
    // The impostor never receives ClientAuth: the stream closes right after its challenge.
    let (result, _) = server.await.unwrap();
    assert!(matches!(result, Err(HandshakeError::Closed)), "{result:?}");
}

#[tokio::test]
async fn a_man_in_the_middle_with_its_own_tls_session_is_detected() {
    // The relay signs over its channel binding; the agent sees a different one through the attacker's TLS.
    let ((mut cr, mut cw), (sr, sw)) = pipe();
    let relay = key(2);
    let _server = tokio::spawn(serve(sr, sw, relay.clone(), b"relay-side tls".to_vec()));
    let err = handshake::client(
        &mut cr,
        &mut cw,
        ClientParams {
            key: &key(1),
            relay: Fingerprint::of(&relay.verifying_key()),
            channel_binding: b"attacker-side tls",
            pair: None,
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, HandshakeError::BadSignature("relay")),
        "{err}"
    );
}

/// Records every frame the agent sends through a tap, so a test can replay them.
async fn capture_agent_frames(agent: &SigningKey, relay: &SigningKey) -> Vec<Value> {
    let (client_end, tap_a) = tokio::io::duplex(1 << 16);
    let (tap_b, server_end) = tokio::io::duplex(1 << 16);
    let (sr, sw) = tokio::io::split(server_end);
    let server = tokio::spawn(serve(
        FrameReader::new(sr),
        FrameWriter::new(sw),
        relay.clone(),
        b"session-1".to_vec(),
    ));
    let (cr, cw) = tokio::io::split(client_end);
    let (mut cr, mut cw) = (FrameReader::new(cr), FrameWriter::new(cw));
    let (mut from_agent, mut to_agent) = tokio::io::split(tap_a);
    let (mut from_relay, mut to_relay) = tokio::io::split(tap_b);
    let recorded = tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = from_agent.read(&mut buf).await {
            seen.extend_from_slice(&buf[..n]);
            to_relay.write_all(&buf[..n]).await.unwrap();
        }
        seen
    });
    let _back = tokio::spawn(async move { tokio::io::copy(&mut from_relay, &mut to_agent).await });
    handshake::client(
        &mut cr,
        &mut cw,
        ClientParams {
            key: agent,
            relay: Fingerprint::of(&relay.verifying_key()),
            channel_binding: b"session-1",
            pair: None,
        },
    )
    .await
    .unwrap();
    server.await.unwrap().unwrap();
    drop((cr, cw));
    let bytes = recorded.await.unwrap();
    let mut frames = Vec::new();
    let mut at = 0;
    while let Some((v, used)) = frame::decode::<Value>(&bytes[at..]).unwrap() {
        frames.push(v);
        at += used;
    }
    frames
}

#[tokio::test]
async fn a_replayed_handshake_does_not_verify_on_a_new_connection() {
    let (agent, relay) = (key(1), key(2));
    let frames = capture_agent_frames(&agent, &relay).await;
    assert_eq!(frames.len(), 2, "hello and auth: {frames:?}");

    // Replay the exact bytes on a fresh connection (even one with the same channel binding).
    let ((mut ar, mut aw), (sr, sw)) = pipe();
    let server = tokio::spawn(serve(sr, sw, relay, b"session-1".to_vec()));
    aw.send(&frames[0]).await.unwrap();
    let _challenge: Value = ar.recv().await.unwrap().unwrap();
    aw.send(&frames[1]).await.unwrap();
    let result = server.await.unwrap();
    assert!(
        matches!(result, Err(HandshakeError::BadSignature("agent"))),
        "{result:?}"
    );
}

#[tokio::test]
async fn an_agent_presenting_another_agents_public_key_cannot_sign_for_it() {
    let (victim, attacker, relay) = (key(1), key(7), key(2));
    let ((mut ar, mut aw), (sr, sw)) = pipe();
    let server = tokio::spawn(serve(sr, sw, relay, b"b".to_vec()));
    aw.send(&ClientHello {
        protocol: PROTOCOL_VERSION,
        min_protocol: 1,
        software: "evil".into(),
        agent_key: victim.verifying_key().to_bytes(),
        nonce: [0; 32],
    })
    .await
    .unwrap();
    let _challenge: ServerHello = ar.recv().await.unwrap().unwrap();
    // Whatever the attacker signs with its own key, it is not the victim's signature.
    use ed25519_dalek::Signer;
    aw.send(&ClientAuth {
        signature: attacker.sign(b"anything").to_bytes(),
        pair: None,
    })
    .await
    .unwrap();
    let result = server.await.unwrap();
    assert!(
        matches!(result, Err(HandshakeError::BadSignature("agent"))),
        "{result:?}"
    );
}

#[tokio::test]
async fn an_old_agent_gets_a_human_error_naming_both_versions() {
    let ((mut ar, mut aw), (sr, sw)) = pipe();
    let server = tokio::spawn(serve(sr, sw, key(2), b"b".to_vec()));
    aw.send(&ClientHello {
        protocol: 0,
        min_protocol: 0,
        software: "0.0.1".into(),
        agent_key: key(1).verifying_key().to_bytes(),
        nonce: [0; 32],
    })
    .await
    .unwrap();
    let reply: ServerHello = ar.recv().await.unwrap().unwrap();
    let ServerHello::Incompatible { message, .. } = reply else {
        panic!("expected Incompatible, got {reply:?}")
    };
    assert!(
        message.contains("0.0.1")
            && message.contains(SOFTWARE_VERSION)
            && message.contains("upgrade the agent"),
        "{message}"
    );
    assert!(matches!(
        server.await.unwrap(),
        Err(HandshakeError::Incompatible(_))
    ));
}

#[tokio::test]
async fn the_agent_shows_the_relays_incompatibility_message() {
    let ((mut cr, mut cw), (mut sr, mut sw)) = pipe();
    tokio::spawn(async move {
        let _: Value = sr.recv().await.unwrap().unwrap();
        sw.send(&ServerHello::Incompatible {
            relay_protocol: 9,
            relay_min_protocol: 9,
            relay_software: "9.0.0".into(),
            message: "agent too old for relay 9.0.0: upgrade".into(),
        })
        .await
        .unwrap();
    });
    let err = handshake::client(
        &mut cr,
        &mut cw,
        ClientParams {
            key: &key(1),
            relay: Fingerprint::of(&key(2).verifying_key()),
            channel_binding: b"b",
            pair: None,
        },
    )
    .await
    .unwrap_err();
    assert!(err.is_permanent());
    assert_eq!(err.to_string(), "agent too old for relay 9.0.0: upgrade");
}

#[tokio::test]
async fn a_rejection_reaches_the_agent_with_its_reason() {
    let ((mut cr, mut cw), (mut sr, mut sw)) = pipe();
    let relay = key(2);
    let relay2 = relay.clone();
    tokio::spawn(async move {
        handshake::server(&mut sr, &mut sw, &relay2, b"b")
            .await
            .unwrap();
        sw.send(&Verdict::Rejected {
            reason: Rejection::Revoked,
            message: "revoked by owner".into(),
        })
        .await
        .unwrap();
    });
    let err = handshake::client(
        &mut cr,
        &mut cw,
        ClientParams {
            key: &key(1),
            relay: Fingerprint::of(&relay.verifying_key()),
            channel_binding: b"b",
            pair: None,
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            HandshakeError::Rejected {
                reason: Rejection::Revoked,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.is_permanent());
}

#[tokio::test(start_paused = true)]
async fn a_handshake_that_never_completes_times_out() {
    let ((_cr, _cw), (mut sr, mut sw)) = pipe();
    let err = handshake::server(&mut sr, &mut sw, &key(2), b"b")
        .await
        .unwrap_err();
    assert!(matches!(err, HandshakeError::Timeout(_)), "{err}");
}

#[tokio::test]
async fn garbage_instead_of_a_hello_is_a_clean_error() {
    let (mut raw, server_end) = tokio::io::duplex(64);
    let (sr, sw) = tokio::io::split(server_end);
    let server = tokio::spawn(async move {
        handshake::server(
            &mut FrameReader::new(sr),
            &mut FrameWriter::new(sw),
            &key(2),
            b"b",
        )
        .await
    });
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let result = server.await.unwrap();
    assert!(
        matches!(result, Err(HandshakeError::Frame(_))),
        "{result:?}"
    );
}
