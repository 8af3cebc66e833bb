//! The fake API on its own, over raw HTTP/1.1: classification, non-streaming replies, unknown paths, shutdown.

use std::time::Duration;

use ct_testkit::{FakeAnthropic, Reply, RequestKind};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Sends one request with `Connection: close` and returns (status, body).
async fn http(base_url: &str, method: &str, path: &str, body: &Value) -> (u16, String) {
    let addr = base_url.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let body = body.to_string();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("write head");
    stream.write_all(body.as_bytes()).await.expect("write body");
    let mut raw = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut raw))
        .await
        .expect("response in time")
        .expect("read");
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The concatenated `text_delta`s of an SSE body.
fn sse_text(body: &str) -> String {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter(|v| v["delta"]["type"] == "text_delta")
        .filter_map(|v| v["delta"]["text"].as_str().map(str::to_owned))
        .collect()
}

fn main_request(stream: bool) -> Value {
    json!({ "model": "m", "stream": stream, "tools": [{ "name": "Write" }],
            "messages": [{ "role": "user", "content": "hi" }] })
}

#[tokio::test]
async fn script_order_auxiliary_requests_and_fallback() {
    let fake = FakeAnthropic::start([
        Reply::error(429),
        Reply::tool_use("Bash", json!({ "command": "ls" })),
    ])
    .await
    .expect("fake");

    let (status, body) = http(
        fake.base_url(),
        "POST",
        "/v1/messages",
        &main_request(false),
    )
    .await;
    assert_eq!(status, 429);
    let err: Value = serde_json::from_str(&body).expect("error JSON");
    assert_eq!(err["type"], "error");
    assert_eq!(err["error"]["type"], "rate_limit_error");

    // No tools: auxiliary, answered without consuming the script.
    let aux = json!({ "model": "small", "messages": [{ "role": "user", "content": "title?" }] });
    let (status, _) = http(fake.base_url(), "POST", "/v1/messages", &aux).await;
    assert_eq!(status, 200);
    assert_eq!(fake.remaining_replies(), 1);

    let (status, body) = http(
        fake.base_url(),
        "POST",
        "/v1/messages",
        &main_request(false),
    )
    .await;
    assert_eq!(status, 200);
    let msg: Value = serde_json::from_str(&body).expect("message JSON");
    assert_eq!(msg["stop_reason"], "tool_use");
    assert_eq!(msg["content"][0]["name"], "Bash");
    assert_eq!(msg["content"][0]["input"], json!({ "command": "ls" }));

    let (status, body) = http(fake.base_url(), "POST", "/v1/messages", &main_request(true)).await;
    assert_eq!(status, 200);
    assert!(body.contains("event: message_start"), "{body}");
    assert_eq!(
        sse_text(&body),
        "done",
        "script exhausted: falls back to \"done\""
    );
    assert!(body.contains(r#""stop_reason":"end_turn""#));

    let kinds: Vec<_> = fake.requests().iter().map(|r| r.kind).collect();
    use RequestKind::*;
    assert_eq!(kinds, [Main, Auxiliary, Main, Main]);
}

#[tokio::test]
async fn unknown_paths_are_recorded_and_404() {
    let fake = FakeAnthropic::start([]).await.expect("fake");
    let (status, _) = http(fake.base_url(), "HEAD", "/", &Value::Null).await;
    assert_eq!(status, 200);
    let (status, body) = http(
        fake.base_url(),
        "POST",
        "/api/unknown?x=1",
        &json!({ "a": 1 }),
    )
    .await;
    assert_eq!(status, 404);
    assert!(body.contains("not_found_error"));
    let (status, body) = http(
        fake.base_url(),
        "POST",
        "/v1/messages/count_tokens",
        &main_request(false),
    )
    .await;
    assert_eq!(status, 200);
    assert!(serde_json::from_str::<Value>(&body).expect("JSON")["input_tokens"].is_u64());

    let reqs = fake
        .wait_for_requests(Duration::from_secs(5), |r| r.len() == 3)
        .await
        .expect("three requests");
    assert_eq!(reqs[1].kind, RequestKind::Unknown);
    assert_eq!(reqs[1].path, "/api/unknown?x=1");
    assert_eq!(reqs[1].body, json!({ "a": 1 }));
    assert_eq!(reqs[2].kind, RequestKind::Other);
}

#[tokio::test]
async fn shutdown_stops_the_server() {
    let fake = FakeAnthropic::start([]).await.expect("fake");
    let addr = fake.base_url().trim_start_matches("http://").to_owned();
    fake.shutdown().await;
    assert!(
        TcpStream::connect(&addr).await.is_err(),
        "listener closed after shutdown"
    );

    let fake = FakeAnthropic::start([]).await.expect("fake");
    let addr = fake.base_url().trim_start_matches("http://").to_owned();
    drop(fake);
    // Drop aborts the task; the listener goes with it once the runtime drops the task's future.
    tokio::task::yield_now().await;
    assert!(
        TcpStream::connect(&addr).await.is_err(),
        "listener closed after drop"
    );
}
