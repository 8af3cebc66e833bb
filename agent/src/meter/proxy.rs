//! The local proxy of the Messages API that shared tasks' Claude Code talks to.
//!
//! It listens on the owner's loopback, outside every sandbox. Each sandboxed grantee session gets a
//! [`Lease`]: a base URL with an unguessable path (`http://127.0.0.1:PORT/s/<token>`) naming the grantee, and
//! a dummy key. A sandbox without a network reaches the proxy through a unix socket of its own instead (served
//! for the lease's life, bound into the sandbox, see [`crate::sandbox::forward`]). A request on that path is
//! checked against the grantee's budget, forwarded to the real API with
//! the real key (added here; whatever key the sandbox sent is dropped), and its streamed usage is added to
//! the grantee's total as it passes. Dropping the lease closes the path.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use rand::RngCore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Meter, UsageScan};

/// The key a sandbox holds: useless anywhere but through the proxy, which replaces it.
pub const DUMMY_KEY: &str = "sk-ant-sandbox-placeholder-the-agent-adds-the-real-key";
/// Largest request body forwarded (a long conversation is a few MB of JSON).
const MAX_BODY: usize = 32 * 1024 * 1024;
/// Headers not forwarded upstream: connection-level ones, and every credential the sandbox could send.
const DROPPED: &[&str] = &[
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "x-api-key",
    "authorization",
];

/// Where the proxy forwards to, and with which key. `Debug` never prints the key.
#[derive(Clone)]
pub struct Upstream {
    /// `https://api.anthropic.com`, or the owner's `ANTHROPIC_BASE_URL`.
    pub base_url: String,
    pub api_key: String,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Upstream({}, key MASKED)", self.base_url)
    }
}

struct Shared {
    upstream: Upstream,
    meter: Meter,
    client: reqwest::Client,
    /// Live leases: token → grantee id.
    routes: Mutex<HashMap<String, String>>,
}

impl Shared {
    fn routes(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The running proxy. Cheap to clone; it stops with the shutdown token it was started with.
#[derive(Clone)]
pub struct ApiProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    app: axum::Router,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl std::fmt::Debug for ApiProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiProxy")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// One session's path through the proxy. Dropping it closes the path (and its socket).
#[derive(Debug)]
pub struct Lease {
    token: String,
    base_url: String,
    shared: Arc<Shared>,
    /// The unix socket served for a sandbox without a network, and what stops serving it.
    socket: Option<(PathBuf, tokio_util::sync::DropGuard)>,
}

impl Lease {
    /// `ANTHROPIC_BASE_URL` for the sandbox.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The socket to bind into a sandbox without a network.
    pub fn socket(&self) -> Option<&Path> {
        self.socket.as_ref().map(|(p, _)| p.as_path())
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.shared.routes().remove(&self.token);
        if let Some((path, _)) = &self.socket {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl ApiProxy {
    /// Binds `127.0.0.1:0` and serves until `shutdown`, in a task owned by `tracker`.
    pub async fn start(
        upstream: Upstream,
        meter: Meter,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut client = reqwest::Client::builder();
        if upstream_is_loopback(&upstream.base_url) {
            // A proxy from the environment must not see requests meant for this machine.
            client = client.no_proxy();
        }
        let client = client.build().map_err(std::io::Error::other)?;
        let shared = Arc::new(Shared {
            upstream,
            meter,
            client,
            routes: Mutex::new(HashMap::new()),
        });
        let app = axum::Router::new()
            .fallback(forward)
            .with_state(shared.clone());
        let served = axum::serve(listener, app.clone())
            .with_graceful_shutdown(shutdown.clone().cancelled_owned());
        tracker.spawn(async move {
            let served = served.await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "the shared-task API proxy stopped");
            }
        });
        tracing::info!(%addr, "shared-task API proxy listening");
        Ok(Self {
            addr,
            shared,
            app,
            shutdown,
            tracker: tracker.clone(),
        })
    }

    /// A path through the proxy for grantee `user`: on the loopback, or, with `socket_dir`, on a unix socket of
    /// its own in that (private) folder, for a sandbox without a network whose forwarder listens on
    /// `127.0.0.1:inside_port`.
    pub fn lease(&self, user: &str, socket_dir: Option<(&Path, u16)>) -> std::io::Result<Lease> {
        let mut bytes = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let (base_url, socket) = match socket_dir {
            None => (format!("http://{}/s/{token}", self.addr), None),
            Some((dir, inside_port)) => {
                // Short names: a unix socket path must fit in 108 bytes.
                let path = dir.join(format!("{}.sock", &token[..16]));
                let _ = std::fs::remove_file(&path);
                let listener = tokio::net::UnixListener::bind(&path)?;
                let stop = self.shutdown.child_token();
                let served = axum::serve(listener, self.app.clone())
                    .with_graceful_shutdown(stop.clone().cancelled_owned());
                self.tracker.spawn(async move {
                    if let Err(e) = served.await {
                        tracing::warn!(error = %e, "a shared task's API socket stopped");
                    }
                });
                (
                    format!("http://127.0.0.1:{inside_port}/s/{token}"),
                    Some((path, stop.drop_guard())),
                )
            }
        };
        self.shared.routes().insert(token.clone(), user.to_owned());
        Ok(Lease {
            base_url,
            token,
            shared: self.shared.clone(),
            socket,
        })
    }
}

fn upstream_is_loopback(base: &str) -> bool {
    let rest = base
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    rest.starts_with("127.") || rest.starts_with("localhost") || rest.starts_with("[::1]")
}

/// An error in the shape of the Messages API's, so Claude Code shows its message.
fn api_error(status: StatusCode, kind: &str, message: &str) -> Response {
    let body =
        serde_json::json!({ "type": "error", "error": { "type": kind, "message": message } });
    (status, axum::Json(body)).into_response()
}

async fn forward(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let Some((token, rest)) = path_and_query
        .strip_prefix("/s/")
        .map(|r| r.split_at(r.find(['/', '?']).unwrap_or(r.len())))
    else {
        return api_error(StatusCode::NOT_FOUND, "not_found_error", "unknown path");
    };
    let Some(user) = shared.routes().get(token).cloned() else {
        return api_error(
            StatusCode::NOT_FOUND,
            "not_found_error",
            "this shared task's session has ended",
        );
    };
    // The budgets are re-read from disk on every request (so a change applies at once): off the runtime.
    let (meter, who) = (shared.meter.clone(), user.clone());
    match tokio::task::spawn_blocking(move || meter.check(&who)).await {
        Ok(Ok(())) => {}
        Ok(Err(spent)) => {
            return api_error(
                StatusCode::FORBIDDEN,
                "permission_error",
                &spent.to_string(),
            )
        }
        Err(e) => {
            tracing::warn!(error = %e, "shared-task API proxy: the budget check failed");
            return api_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                "the agent could not check this person's budget",
            );
        }
    }
    let url = format!(
        "{}{}",
        shared.upstream.base_url.trim_end_matches('/'),
        if rest.is_empty() { "/" } else { rest }
    );
    let method = req.method().clone();
    let mut headers = HeaderMap::new();
    for (name, value) in req.headers() {
        if !DROPPED.contains(&name.as_str()) {
            headers.append(name.clone(), value.clone());
        }
    }
    match HeaderValue::from_str(&shared.upstream.api_key) {
        Ok(key) => {
            headers.insert(HeaderName::from_static("x-api-key"), key);
        }
        Err(_) => {
            return api_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                "the agent's API key for shared tasks is not a valid header value",
            )
        }
    }
    let body = match axum::body::to_bytes(req.into_body(), MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            return api_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                "request body too large",
            )
        }
    };
    let sent = shared
        .client
        .request(method, &url)
        .headers(headers)
        .body(body)
        .send()
        .await;
    let upstream = match sent {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "shared-task API proxy: upstream unreachable");
            return api_error(
                StatusCode::BAD_GATEWAY,
                "api_error",
                "the agent could not reach the Anthropic API",
            );
        }
    };
    let mut response = Response::builder().status(upstream.status());
    for (name, value) in upstream.headers() {
        if !matches!(
            name.as_str(),
            "connection" | "keep-alive" | "transfer-encoding" | "content-length"
        ) {
            response = response.header(name, value);
        }
    }
    let metered = Metered {
        scan: UsageScan::default(),
        meter: shared.meter.clone(),
        user,
        recorded: false,
    };
    // The state is `None` once the upstream body ended or failed, so the stream ends after one error.
    let stream = futures_util::stream::unfold(
        (Some(upstream), metered),
        |(upstream, mut metered)| async move {
            let mut upstream = upstream?;
            match upstream.chunk().await {
                Ok(Some(bytes)) => {
                    metered.scan.feed(&bytes);
                    Some((Ok::<_, std::io::Error>(bytes), (Some(upstream), metered)))
                }
                Ok(None) => {
                    metered.record();
                    None
                }
                Err(e) => {
                    metered.record();
                    Some((Err(std::io::Error::other(e)), (None, metered)))
                }
            }
        },
    );
    response
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response())
}

/// A response's usage on its way through; recorded once, at its end or when the client went away.
struct Metered {
    scan: UsageScan,
    meter: Meter,
    user: String,
    recorded: bool,
}

impl Metered {
    fn record(&mut self) {
        if !std::mem::replace(&mut self.recorded, true) {
            self.meter.add(&self.user, &self.scan.usage());
        }
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        self.record();
    }
}
