//! What one party can cost the relay's TCP side: clients that trickle their requests, bodies too large to
//! read, and one address opening connection after connection. Each test performs the attack and checks that
//! a well-behaved client is still served.

use std::time::Duration;

use ct_relay::RelayConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::support::{eventually, http_request, https_connect, TestRelay};

fn config(dir: &std::path::Path) -> RelayConfig {
    RelayConfig::new(dir.into(), "127.0.0.1:0".parse().unwrap())
}

/// Writes `byte` every 100 ms until the relay closes the connection; returns what the relay sent.
async fn trickle<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, byte: &[u8]) -> String {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let (mut got, mut buf) = (Vec::new(), [0u8; 1024]);
    loop {
        tokio::select! {
            _ = tick.tick() => if stream.write_all(byte).await.is_err() { break },
            n = stream.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            },
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Reads until the relay closes the connection; returns what it sent.
async fn until_closed<S: AsyncRead + Unpin>(mut stream: S) -> String {
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got).await;
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn clients_that_trickle_their_requests_are_cut_off_and_others_still_get_through() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.core.request_timeout = Duration::from_secs(1);
    let relay = TestRelay::start_with(config).await;

    // Headers complete, then the body one byte at a time: before the fix, held open for as long as the
    // client kept trickling.
    let mut body = https_connect(relay.addr).await.unwrap();
    body.write_all(
        b"POST /discord/interactions HTTP/1.1\r\nhost: relay\r\ncontent-length: 100000\r\n\r\n",
    )
    .await
    .unwrap();
    // The headers themselves one byte at a time.
    let mut headers = https_connect(relay.addr).await.unwrap();
    headers
        .write_all(b"POST /discord/interactions HTTP/1.1\r\nx-slow: ")
        .await
        .unwrap();
    // A kept-alive connection that goes quiet after one request.
    let mut idle = https_connect(relay.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: relay\r\n\r\n")
        .await
        .unwrap();

    let (body_reply, headers_reply, idle_reply, normal) =
        tokio::time::timeout(Duration::from_secs(8), async {
            tokio::join!(
                trickle(body, b"x"),
                trickle(headers, b"a"),
                until_closed(idle),
                http_request(relay.addr, "GET /healthz", b""),
            )
        })
        .await
        .expect("a slow client was not cut off within 8 s (the limit is 1 s)");
    assert!(body_reply.starts_with("HTTP/1.1 408"), "{body_reply:?}");
    assert!(
        !headers_reply.contains(" 200 "),
        "trickled headers were served: {headers_reply:?}"
    );
    assert!(
        idle_reply.starts_with("HTTP/1.1 200") && idle_reply.ends_with("ok\n"),
        "{idle_reply:?}"
    );
    assert_eq!(normal.0, 200, "a normal client meanwhile: {}", normal.1);
    // And after them.
    assert_eq!(http_request(relay.addr, "GET /healthz", b"").await.0, 200);
}

#[tokio::test]
async fn a_body_larger_than_the_cap_is_refused_without_being_read() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let mut tls = https_connect(relay.addr).await.unwrap();
    let size = ct_relay::endpoint::https::MAX_BODY + 1;
    tls.write_all(
        format!(
            "POST /discord/interactions HTTP/1.1\r\nhost: relay\r\ncontent-length: {size}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // Not a byte of the body is sent: the answer must come from the declared length alone.
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf))
        .await
        .expect("no answer to an oversized body")
        .unwrap();
    let reply = String::from_utf8_lossy(&buf[..n]);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply:?}");
    // A small request is still fine.
    let (status, text) = http_request(relay.addr, "POST /discord/interactions", b"{}").await;
    assert_eq!(status, 404, "the bot is off in this relay: {text}");
}

#[tokio::test]
async fn one_address_cannot_hold_every_connection() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.core.max_connections = 100;
    config.core.max_connections_per_address = 4;
    // Long enough that the four are surely still held when the fifth is checked, even on a busy machine.
    config.core.request_timeout = Duration::from_secs(5);
    let relay = TestRelay::start_with(config).await;
    let me = "127.0.0.1".parse().unwrap();

    // Four connections that never even start TLS: the address's whole share.
    let mut slow = Vec::new();
    for _ in 0..4 {
        slow.push(tokio::net::TcpStream::connect(relay.addr).await.unwrap());
    }
    eventually(Duration::from_secs(5), || {
        relay.admission.per_address.held_by(me) == 4
    })
    .await;

    // The fifth is closed at once, long before the four time out, and well under the global limit.
    let fifth = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(2), until_closed(fifth)).await;
    assert!(closed.is_ok(), "the fifth connection was served");
    // QUIC from the same address counts against the same share.
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(crate::support::quic_client_config());
    let quic = endpoint.connect(relay.addr, "relay").unwrap().await;
    assert!(
        quic.is_err(),
        "a QUIC connection past the share was accepted"
    );
    assert_eq!(
        relay.admission.per_address.held_by(me),
        4,
        "the four slow connections are still held: the fifth was refused, not timed out"
    );
    assert!(relay
        .core
        .metrics()
        .render()
        .contains("ct_relay_connections_refused_total{node=\"relay\",reason=\"per_address\"}"));

    // The time limit cuts the slow ones off; then a normal request gets through.
    for s in slow {
        tokio::time::timeout(Duration::from_secs(20), until_closed(s))
            .await
            .expect("a silent connection outlived the time limit");
    }
    let (status, text) = http_request(relay.addr, "GET /healthz", b"").await;
    assert_eq!(status, 200, "{text}");
}
