//! `FakeAnthropic`: a scripted stand-in for the Anthropic Messages API that the real Claude Code CLI talks to
//! through `ANTHROPIC_BASE_URL`.
//!
//! The server answers `POST /v1/messages` (streaming SSE or plain JSON, whichever the request asks for),
//! `POST /v1/messages/count_tokens`, and `HEAD /` / `GET /` with 200. Anything else is recorded, logged at warn
//! and answered 404 with Anthropic's error body, so a new CLI version that calls something new shows up in
//! [`FakeAnthropic::requests`] instead of failing silently.
//!
//! Main-conversation requests consume the script, one [`Reply`] per request; see [`RequestKind`] for how
//! auxiliary requests (titles, summaries, quota probes) are told apart so that they never consume it.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, Context as _};
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Requests carry the whole conversation (and resumed sessions replay all of it); the CLI's own requests
/// are a few hundred KiB, so 32 MiB leaves room without letting a runaway client eat the machine.
const MAX_REQUEST_BODY: usize = 32 * 1024 * 1024;

/// What the fake answers once the script is used up: a short text that ends the turn.
const FALLBACK_TEXT: &str = "done";

/// Words of the instruction Claude Code sends as the last user message when it summarises the conversation
/// (`/compact`, or by itself when the context fills up). Seen on 2.1.332: "Your task is to create a detailed
/// summary of the conversation so far, ...". That request carries the tools like any other, so without this it
/// would consume a scripted reply meant for the conversation.
const COMPACTION_MARKER: &str = "create a detailed summary of the conversation so far";

/// The summary the fake gives a compaction request, in the shape the instruction asks for. An answer without a
/// `<summary>` block makes 2.1.332 ask again.
const COMPACTION_SUMMARY: &str = "<analysis>\nThe user and the assistant talked briefly.\n</analysis>\n\
    <summary>\n1. Primary Request and Intent: a scripted test conversation (summary by the fake API).\n</summary>";

/// One scripted answer to a main-conversation request.
pub struct Reply(ReplyKind);

enum ReplyKind {
    Message {
        text: Option<String>,
        tool_uses: Vec<(String, Value)>,
    },
    Error {
        status: StatusCode,
        error_type: &'static str,
        message: String,
    },
    Dynamic(Box<dyn FnOnce(&Value) -> Reply + Send>),
}

impl Reply {
    /// An assistant text block; the turn ends (`stop_reason: end_turn`).
    pub fn text(text: impl Into<String>) -> Self {
        Self(ReplyKind::Message {
            text: Some(text.into()),
            tool_uses: Vec::new(),
        })
    }

    /// One `tool_use` block (id generated); the turn continues (`stop_reason: tool_use`).
    pub fn tool_use(name: impl Into<String>, input: Value) -> Self {
        Self::tool_uses([(name, input)])
    }

    /// Several `tool_use` blocks in one assistant message, in order (ids generated).
    pub fn tool_uses<N: Into<String>>(uses: impl IntoIterator<Item = (N, Value)>) -> Self {
        Self(ReplyKind::Message {
            text: None,
            tool_uses: uses.into_iter().map(|(n, i)| (n.into(), i)).collect(),
        })
    }

    /// A text block, then one `tool_use` block, in one assistant message: the model says what it is about to
    /// do and does it (the turn continues). A test can see the text in a thread while the tool still runs.
    pub fn text_then_tool_use(
        text: impl Into<String>,
        name: impl Into<String>,
        input: Value,
    ) -> Self {
        Self(ReplyKind::Message {
            text: Some(text.into()),
            tool_uses: vec![(name.into(), input)],
        })
    }

    /// An HTTP error with Anthropic's error body. The error type follows the status the way the real API does:
    /// 400 `invalid_request_error`, 401 `authentication_error`, 403 `permission_error`, 404 `not_found_error`,
    /// 429 `rate_limit_error`, 529 `overloaded_error`, anything else `api_error`.
    ///
    /// The CLI retries 429/529/5xx by itself; each retry is a new request that consumes the next reply.
    pub fn error(status: u16) -> Self {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let (error_type, message) = match status.as_u16() {
            400 => ("invalid_request_error", "Invalid request"),
            401 => ("authentication_error", "invalid x-api-key"),
            403 => (
                "permission_error",
                "Your API key does not have permission to use the specified resource.",
            ),
            404 => ("not_found_error", "Not found"),
            429 => (
                "rate_limit_error",
                "Number of requests has exceeded your rate limit.",
            ),
            529 => ("overloaded_error", "Overloaded"),
            _ => ("api_error", "Internal server error"),
        };
        Self(ReplyKind::Error {
            status,
            error_type,
            message: message.to_owned(),
        })
    }

    /// A reply decided when the request arrives, from its JSON body (e.g. to echo a `tool_result` back).
    pub fn with(f: impl FnOnce(&Value) -> Reply + Send + 'static) -> Self {
        Self(ReplyKind::Dynamic(Box::new(f)))
    }
}

impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            ReplyKind::Message { text, tool_uses } => f
                .debug_struct("Reply::Message")
                .field("text", text)
                .field("tool_uses", tool_uses)
                .finish(),
            ReplyKind::Error { status, .. } => f.debug_tuple("Reply::Error").field(status).finish(),
            ReplyKind::Dynamic(_) => f.write_str("Reply::Dynamic(..)"),
        }
    }
}

/// How the fake classified a request.
///
/// The rule: a `POST /v1/messages` whose body has a non-empty `tools` array is the main conversation and
/// consumes the script; one without tools (how Claude Code sends side requests such as session titles, quota
/// probes or summaries) is [`RequestKind::Auxiliary`] and gets a canned text. CLI 2.1.197 in `-p` mode was seen
/// to send no auxiliary requests at all (every request carried tools; see testkit/CLAUDE-NOTES.md), so the rule
/// is a safety net against a newer CLI eating a test's script. A request for a summary of the conversation (what
/// `/compact` sends, tools and all) is [`RequestKind::Compaction`] and does not consume the script either.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// A main-conversation `POST /v1/messages`; it consumed one scripted reply.
    Main,
    /// A `POST /v1/messages` without tools; answered with a canned text.
    Auxiliary,
    /// Claude Code asking for a summary of the conversation so far (compaction, see `COMPACTION_MARKER`);
    /// answered with a canned summary, never from the script.
    Compaction,
    /// `count_tokens`, `HEAD /` and the like.
    Other,
    /// A path the fake does not know; answered 404.
    Unknown,
}

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// HTTP method.
    pub method: String,
    /// Path and query, e.g. `/v1/messages?beta=true`.
    pub path: String,
    /// The JSON body, or `Value::Null` when there was none (or it was not JSON).
    pub body: Value,
    /// How the fake classified (and so answered) it.
    pub kind: RequestKind,
    /// The `x-api-key` header a `/v1/messages` request carried (the agent's proxy adds the real one).
    pub api_key: Option<String>,
}

impl RecordedRequest {
    /// All `tool_result` blocks in the request's messages, in order.
    pub fn tool_results(&self) -> Vec<&Value> {
        self.content_blocks()
            .filter(|b| b["type"] == "tool_result")
            .collect()
    }

    /// Every content block of every message (string contents are skipped).
    pub fn content_blocks(&self) -> impl Iterator<Item = &Value> {
        self.body["messages"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["content"].as_array())
            .flatten()
    }
}

struct Shared {
    script: Mutex<VecDeque<Reply>>,
    requests: Mutex<Vec<RecordedRequest>>,
    /// Bumped after every recorded request, so waiters re-check without polling.
    recorded: watch::Sender<usize>,
    next_id: AtomicU64,
}

impl Shared {
    fn record(&self, req: RecordedRequest) {
        let count = {
            let mut reqs = lock(&self.requests);
            reqs.push(req);
            reqs.len()
        };
        self.recorded.send_replace(count);
    }

    fn id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}_fake{n:020}")
    }
}

/// A poisoned lock only means another test thread panicked; the data is still what it recorded.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The running fake server. Dropping it stops the server task.
pub struct FakeAnthropic {
    base_url: String,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl fmt::Debug for FakeAnthropic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeAnthropic")
            .field("base_url", &self.base_url)
            .field("remaining_replies", &lock(&self.shared.script).len())
            .finish_non_exhaustive()
    }
}

impl FakeAnthropic {
    /// Binds 127.0.0.1:0 and serves `script` to the main-conversation requests, in order.
    pub async fn start(script: impl IntoIterator<Item = Reply>) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the fake Anthropic API")?;
        let addr = listener.local_addr()?;
        let (recorded, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            script: Mutex::new(script.into_iter().collect()),
            requests: Mutex::new(Vec::new()),
            recorded,
            next_id: AtomicU64::new(1),
        });
        let app = Router::new()
            .route("/", get(ok).head(ok))
            .route("/v1/messages", post(messages))
            .route("/v1/messages/count_tokens", post(count_tokens))
            .fallback(unknown)
            .layer(DefaultBodyLimit::max(MAX_REQUEST_BODY))
            .with_state(shared.clone());
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone().cancelled_owned();
        let task = tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, app)
                .with_graceful_shutdown(signal)
                .await
            {
                tracing::warn!(%err, "fake Anthropic server failed");
            }
        });
        Ok(Self {
            base_url: format!("http://{addr}"),
            shared,
            shutdown,
            task: Some(task),
        })
    }

    /// `http://127.0.0.1:PORT`, the value for `ANTHROPIC_BASE_URL`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Appends replies to the script (e.g. before sending the next user message of a long-lived session).
    pub fn push(&self, reply: Reply) {
        lock(&self.shared.script).push_back(reply);
    }

    /// How many scripted replies have not been consumed yet.
    pub fn remaining_replies(&self) -> usize {
        lock(&self.shared.script).len()
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests).clone()
    }

    /// The main-conversation requests received so far, in arrival order.
    pub fn main_requests(&self) -> Vec<RecordedRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.kind == RequestKind::Main)
            .collect()
    }

    /// The compaction requests (see [`RequestKind::Compaction`]) received so far.
    pub fn compactions(&self) -> Vec<RecordedRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.kind == RequestKind::Compaction)
            .collect()
    }

    /// Waits until `done` holds for the requests received so far and returns them; fails after `timeout`.
    pub async fn wait_for_requests(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[RecordedRequest]) -> bool,
    ) -> anyhow::Result<Vec<RecordedRequest>> {
        let mut rx = self.shared.recorded.subscribe();
        let waited = tokio::time::timeout(timeout, async {
            loop {
                {
                    let reqs = lock(&self.shared.requests);
                    if done(&reqs) {
                        return reqs.clone();
                    }
                }
                // The sender lives in `self`, so `changed` only fails if we are being torn down.
                if rx.changed().await.is_err() {
                    return lock(&self.shared.requests).clone();
                }
            }
        })
        .await;
        match waited {
            Ok(reqs) => Ok(reqs),
            Err(_) => bail!(
                "timed out after {timeout:?} waiting for requests; got {:#?}",
                summarize(&self.requests())
            ),
        }
    }

    /// Stops the server and waits (briefly) for its task to finish.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        if let Some(mut task) = self.task.take() {
            // Graceful shutdown waits for open keep-alive connections; don't let a lingering client hold us.
            if tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    }
}

impl Drop for FakeAnthropic {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Method, path and kind of each request: what a timeout message needs, without megabytes of prompts.
fn summarize(reqs: &[RecordedRequest]) -> Vec<String> {
    reqs.iter()
        .map(|r| format!("{} {} {:?}", r.method, r.path, r.kind))
        .collect()
}

fn path_of(uri: &Uri) -> String {
    uri.path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| uri.path().to_owned())
}

fn parse_body(body: &Bytes) -> Value {
    serde_json::from_slice(body).unwrap_or(Value::Null)
}

/// `HEAD /` and `GET /`: the connectivity probe.
async fn ok(State(shared): State<Arc<Shared>>, method: Method, uri: Uri) -> StatusCode {
    shared.record(RecordedRequest {
        method: method.to_string(),
        path: path_of(&uri),
        body: Value::Null,
        kind: RequestKind::Other,
        api_key: None,
    });
    StatusCode::OK
}

async fn unknown(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    let path = path_of(&uri);
    tracing::warn!(%method, %path, "fake Anthropic: unknown request");
    shared.record(RecordedRequest {
        method: method.to_string(),
        path,
        body: parse_body(&body),
        kind: RequestKind::Unknown,
        api_key: None,
    });
    error_response(StatusCode::NOT_FOUND, "not_found_error", "Not found")
}

async fn count_tokens(State(shared): State<Arc<Shared>>, uri: Uri, body: Bytes) -> Response {
    let body = parse_body(&body);
    // A rough but monotone estimate: enough for the CLI's context accounting.
    let input_tokens = body.to_string().len() / 4;
    shared.record(RecordedRequest {
        method: "POST".to_owned(),
        path: path_of(&uri),
        body,
        kind: RequestKind::Other,
        api_key: None,
    });
    axum::Json(json!({ "input_tokens": input_tokens })).into_response()
}

async fn messages(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body = parse_body(&body);
    let has_tools = body["tools"].as_array().is_some_and(|t| !t.is_empty());
    let kind = if is_compaction(&body) {
        RequestKind::Compaction
    } else if has_tools {
        RequestKind::Main
    } else {
        RequestKind::Auxiliary
    };
    tracing::debug!(?kind, accept = ?headers.get(header::ACCEPT), "fake Anthropic: /v1/messages");

    let reply = match kind {
        RequestKind::Main => {
            let next = lock(&shared.script).pop_front();
            next.unwrap_or_else(|| Reply::text(FALLBACK_TEXT))
        }
        RequestKind::Compaction => Reply::text(COMPACTION_SUMMARY),
        _ => Reply::text("Fake title"),
    };
    // Resolve closures before recording, so a test that waits for the request sees its reply decided.
    let reply = resolve(reply, &body);
    let stream = body["stream"].as_bool().unwrap_or(false);
    let model = body["model"]
        .as_str()
        .unwrap_or("claude-sonnet-4-5")
        .to_owned();
    shared.record(RecordedRequest {
        method: "POST".to_owned(),
        path: path_of(&uri),
        body,
        kind,
        api_key: headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    });

    match reply.0 {
        ReplyKind::Error {
            status,
            error_type,
            message,
        } => error_response(status, error_type, &message),
        ReplyKind::Message { text, tool_uses } => {
            let message = Message {
                id: shared.id("msg"),
                model,
                text,
                tool_uses: tool_uses
                    .into_iter()
                    .map(|(name, input)| (shared.id("toolu"), name, input))
                    .collect(),
            };
            if stream {
                Response::builder()
                    .status(StatusCode::OK)
                    .header(header::CONTENT_TYPE, "text/event-stream")
                    .header(header::CACHE_CONTROL, "no-cache")
                    .header("request-id", shared.id("req"))
                    .body(Body::from(message.to_sse()))
                    .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
            } else {
                axum::Json(message.to_json()).into_response()
            }
        }
        ReplyKind::Dynamic(_) => unreachable!("resolve() never returns a Dynamic reply"),
    }
}

/// Whether the request's last message is a user message asking for a summary of the conversation.
fn is_compaction(body: &Value) -> bool {
    let Some(last) = body["messages"].as_array().and_then(|m| m.last()) else {
        return false;
    };
    let text = match &last["content"] {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| b["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    };
    last["role"] == "user" && text.contains(COMPACTION_MARKER)
}

fn resolve(mut reply: Reply, body: &Value) -> Reply {
    while let ReplyKind::Dynamic(f) = reply.0 {
        reply = f(body);
    }
    reply
}

fn error_response(status: StatusCode, error_type: &str, message: &str) -> Response {
    let body = json!({ "type": "error", "error": { "type": error_type, "message": message } });
    (status, axum::Json(body)).into_response()
}

/// A resolved assistant message, rendered either as SSE events or as one JSON object.
struct Message {
    id: String,
    model: String,
    text: Option<String>,
    /// (id, name, input)
    tool_uses: Vec<(String, String, Value)>,
}

impl Message {
    fn stop_reason(&self) -> &'static str {
        if self.tool_uses.is_empty() {
            "end_turn"
        } else {
            "tool_use"
        }
    }

    fn output_tokens(&self) -> usize {
        let chars = self.text.as_ref().map_or(0, String::len)
            + self
                .tool_uses
                .iter()
                .map(|(_, _, i)| i.to_string().len())
                .sum::<usize>();
        chars.div_ceil(4).max(1)
    }

    fn content(&self) -> Vec<Value> {
        let text = self
            .text
            .iter()
            .map(|t| json!({ "type": "text", "text": t }));
        let tools = self
            .tool_uses
            .iter()
            .map(|(id, name, input)| json!({ "type": "tool_use", "id": id, "name": name, "input": input }));
        text.chain(tools).collect()
    }

    fn usage(&self) -> Value {
        json!({
            "input_tokens": 10,
            "output_tokens": self.output_tokens(),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        })
    }

    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": self.content(),
            "stop_reason": self.stop_reason(),
            "stop_sequence": null,
            "usage": self.usage(),
        })
    }

    /// The event sequence of Anthropic's streaming Messages API.
    fn to_sse(&self) -> String {
        let mut out = String::new();
        let mut event = |name: &str, data: Value| {
            out.push_str("event: ");
            out.push_str(name);
            out.push_str("\ndata: ");
            out.push_str(&data.to_string());
            out.push_str("\n\n");
        };
        let mut start = self.to_json();
        start["content"] = json!([]);
        start["stop_reason"] = Value::Null;
        start["usage"]["output_tokens"] = json!(1);
        event(
            "message_start",
            json!({ "type": "message_start", "message": start }),
        );
        event("ping", json!({ "type": "ping" }));

        let mut index = 0;
        if let Some(text) = &self.text {
            event(
                "content_block_start",
                json!({ "type": "content_block_start", "index": index,
                        "content_block": { "type": "text", "text": "" } }),
            );
            for chunk in split_in_two(text) {
                event(
                    "content_block_delta",
                    json!({ "type": "content_block_delta", "index": index,
                            "delta": { "type": "text_delta", "text": chunk } }),
                );
            }
            event(
                "content_block_stop",
                json!({ "type": "content_block_stop", "index": index }),
            );
            index += 1;
        }
        for (id, name, input) in &self.tool_uses {
            event(
                "content_block_start",
                json!({ "type": "content_block_start", "index": index,
                        "content_block": { "type": "tool_use", "id": id, "name": name, "input": {} } }),
            );
            // Split the JSON like the real API does, so the CLI's partial-JSON assembly is exercised.
            for chunk in split_in_two(&input.to_string()) {
                event(
                    "content_block_delta",
                    json!({ "type": "content_block_delta", "index": index,
                            "delta": { "type": "input_json_delta", "partial_json": chunk } }),
                );
            }
            event(
                "content_block_stop",
                json!({ "type": "content_block_stop", "index": index }),
            );
            index += 1;
        }
        event(
            "message_delta",
            json!({ "type": "message_delta",
                    "delta": { "stop_reason": self.stop_reason(), "stop_sequence": null },
                    "usage": { "output_tokens": self.output_tokens() } }),
        );
        event("message_stop", json!({ "type": "message_stop" }));
        out
    }
}

/// Splits at a char boundary near the middle; empty halves are dropped.
fn split_in_two(s: &str) -> Vec<&str> {
    let mut mid = s.len() / 2;
    while !s.is_char_boundary(mid) {
        mid += 1;
    }
    let (a, b) = s.split_at(mid);
    [a, b].into_iter().filter(|p| !p.is_empty()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_for_a_summary_is_told_apart_from_the_conversation() {
        // The last message of 2.1.332's `/compact` request, cut.
        let asks = json!({ "tools": [{ "name": "Bash" }], "messages": [
            { "role": "user", "content": "hello there" },
            { "role": "assistant", "content": [{ "type": "text", "text": "first answer" }] },
            { "role": "user", "content": "CRITICAL: Respond with TEXT ONLY. Do NOT call any tools.\n\nYour task is \
                to create a detailed summary of the conversation so far, paying close attention to ..." },
        ]});
        assert!(is_compaction(&asks));
        let mut blocks = asks.clone();
        blocks["messages"][2]["content"] =
            json!([{ "type": "text", "text": asks["messages"][2]["content"] }]);
        assert!(is_compaction(&blocks));
        // The words earlier in the conversation, or from the assistant, are not a compaction.
        let mut earlier = asks.clone();
        earlier["messages"][2]["content"] = json!("thanks");
        earlier["messages"][0]["content"] = asks["messages"][2]["content"].clone();
        assert!(!is_compaction(&earlier));
        let mut said = asks.clone();
        said["messages"][2]["role"] = json!("assistant");
        assert!(!is_compaction(&said));
        assert!(!is_compaction(&json!({ "messages": [] })));
        assert!(
            COMPACTION_SUMMARY.contains("<summary>") && COMPACTION_SUMMARY.contains("</summary>")
        );
    }

    #[test]
    fn sse_for_tool_use_reassembles_to_the_input() {
        let msg = Message {
            id: "msg_1".into(),
            model: "m".into(),
            text: Some("héllo".into()),
            tool_uses: vec![(
                "toolu_1".into(),
                "Write".into(),
                json!({"file_path": "/x", "content": "é"}),
            )],
        };
        let sse = msg.to_sse();
        let mut partial = String::new();
        let mut text = String::new();
        for line in sse.lines().filter_map(|l| l.strip_prefix("data: ")) {
            let v: Value = serde_json::from_str(line).expect("every data line is JSON");
            match v["delta"]["type"].as_str() {
                Some("input_json_delta") => {
                    partial.push_str(v["delta"]["partial_json"].as_str().unwrap_or(""))
                }
                Some("text_delta") => text.push_str(v["delta"]["text"].as_str().unwrap_or("")),
                _ => {}
            }
        }
        assert_eq!(text, "héllo");
        assert_eq!(
            serde_json::from_str::<Value>(&partial).expect("reassembled input is JSON"),
            json!({"file_path": "/x", "content": "é"})
        );
        assert!(sse.contains(r#""stop_reason":"tool_use""#));
        assert!(sse.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));
    }
}
