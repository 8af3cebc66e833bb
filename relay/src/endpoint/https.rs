//! The TCP side: TLS, then HTTP/1.1 serving the agent WebSocket, health, readiness and metrics.
//!
//! We run the accept loop ourselves rather than `axum::serve` for two reasons: the handshake needs each
//! connection's TLS channel binding, which only exists below HTTP; and an upgraded WebSocket session should
//! be owned by its connection's task (so shutdown can wait for it), not spawned off by a handler. The
//! WebSocket handler therefore only answers 101 and parks hyper's upgrade future in a per-connection slot;
//! the connection task picks it up once HTTP is done and runs the session itself.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::sync::Mutex;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use ct_protocol::handshake::{CHANNEL_BINDING_LABEL, CHANNEL_BINDING_LEN};
use ct_protocol::link::{WS_MAX_MESSAGE, WS_PATH};
use ct_protocol::ws::{WsFrame, WsIo};
use ct_protocol::Transport;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tracing::debug;

use super::limits::AcceptBackoff;
use super::session::{self, Link};
use crate::core::Core;

/// The largest request body the relay reads. Only Discord's interaction POSTs carry one, and those are a few
/// KiB; anything much larger is refused with 413 before it is buffered.
pub const MAX_BODY: usize = 256 * 1024;

/// tungstenite's read buffer per WebSocket. Its default, 128 KiB, is zero-filled to full capacity on every
/// read, so each idle agent cost the relay 128 KiB of resident memory: 154 KiB per WebSocket agent in all,
/// against a 50 KiB goal. A frame larger than this still arrives whole (the buffer grows to fit it), so bulk
/// output is not slowed; idle links stay small.
const WS_READ_BUFFER: usize = 4 * 1024;

/// State the HTTP handlers share.
#[derive(Debug, Clone)]
pub struct Http {
    pub core: Core,
    pub admission: super::limits::Admission,
    pub ready: Arc<AtomicBool>,
    pub shutdown: CancellationToken,
    /// The Discord bot, for HTTP-interactions mode; `None` when the bot is off.
    pub discord: Option<crate::discord::Bot>,
    /// The web dashboard, under [`crate::web::PATH`].
    pub web: crate::web::Web,
}

/// Where the WebSocket handler leaves the upgrade for its connection's task.
#[derive(Debug, Clone, Default)]
struct UpgradeSlot(Arc<Mutex<Option<hyper::upgrade::OnUpgrade>>>);

/// The HTTP routes.
pub fn router(http: Http) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(WS_PATH, get(agent_ws))
        .route(DISCORD_PATH, post(discord_interaction))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(http.clone())
        .merge(crate::web::router(http.web))
}

async fn readyz(State(http): State<Http>) -> Response {
    if !http.ready.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    } else if !http.core.cluster_ready() {
        // A node that cannot reach PostgreSQL or NATS keeps retrying; until then a load balancer sends
        // agents and Discord elsewhere.
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the cluster's PostgreSQL or NATS is unreachable (retrying)\n",
        )
            .into_response()
    } else {
        (StatusCode::OK, "ready\n").into_response()
    }
}

async fn metrics(State(http): State<Http>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        http.core.metrics().render(),
    )
        .into_response()
}

/// Where Discord POSTs interactions in HTTP-interactions mode (the "Interactions Endpoint URL" to set in
/// the developer portal is `https://<relay>/discord/interactions`).
pub const DISCORD_PATH: &str = "/discord/interactions";

/// One signed interaction from Discord: the bot verifies the signature over the raw body (401 if it does
/// not hold, as Discord requires), answers PING, and returns the interaction's initial response.
async fn discord_interaction(
    State(http): State<Http>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Some(bot) = &http.discord else {
        return (
            StatusCode::NOT_FOUND,
            "the Discord bot is off on this relay\n",
        )
            .into_response();
    };
    let (status, json) = bot.handle_http(&headers, &body).await;
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(json)).into_response()
}

async fn agent_ws(mut req: Request) -> Response {
    let headers = req.headers();
    let wants = |name: header::HeaderName, value: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(value))
            })
    };
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return (
            StatusCode::BAD_REQUEST,
            "this path is for ct-agent WebSocket connections\n",
        )
            .into_response();
    };
    if !wants(header::UPGRADE, "websocket")
        || !wants(header::CONNECTION, "upgrade")
        || !wants(header::SEC_WEBSOCKET_VERSION, "13")
    {
        return (
            StatusCode::BAD_REQUEST,
            "expected a WebSocket upgrade (version 13)\n",
        )
            .into_response();
    }
    let Some(slot) = req.extensions().get::<UpgradeSlot>().cloned() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    *slot.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(hyper::upgrade::on(&mut req));
    let mut out = HeaderMap::new();
    out.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    out.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        out.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    (StatusCode::SWITCHING_PROTOCOLS, out).into_response()
}

/// Runs an agent session over an upgraded connection.
async fn websocket_session(
    upgraded: hyper::upgrade::Upgraded,
    http: &Http,
    peer: SocketAddr,
    channel_binding: [u8; CHANNEL_BINDING_LEN],
) {
    let config = WebSocketConfig::default()
        .max_message_size(Some(WS_MAX_MESSAGE))
        .max_frame_size(Some(WS_MAX_MESSAGE))
        .read_buffer_size(WS_READ_BUFFER);
    let ws =
        WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
    let io = WsIo::new(ws, Message::Binary, |m| match m {
        Message::Binary(b) => WsFrame::Data(b),
        Message::Text(t) => WsFrame::Data(bytes::Bytes::copy_from_slice(t.as_bytes())),
        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => WsFrame::Skip,
        Message::Close(_) => WsFrame::Close,
    });
    let (reader, writer) = tokio::io::split(io);
    let link = Link {
        transport: Transport::WebSocket,
        peer,
        channel_binding,
    };
    session::run(
        http.core.clone(),
        reader,
        writer,
        link,
        http.shutdown.clone(),
    )
    .await;
}

/// Accepts TLS connections on a bound listener until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    http: Http,
    tasks: TaskTracker,
) {
    let acceptor = TlsAcceptor::from(tls);
    let app = router(http.clone());
    let mut backoff = AcceptBackoff::default();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => { backoff.succeeded(); a }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning, and keep serving.
                    let wait = backoff.failed(&e, "tcp");
                    tokio::select! {
                        () = tokio::time::sleep(wait) => continue,
                        () = http.shutdown.cancelled() => break,
                    }
                }
            },
            () = http.shutdown.cancelled() => break,
        };
        let Ok(permit) = http.admission.connections.clone().try_acquire_owned() else {
            debug!(%peer, "connection limit reached; refusing");
            http.core.metrics().refused("limit");
            drop(tcp);
            continue;
        };
        let Some(slot) = http.admission.per_address.try_acquire(peer.ip()) else {
            debug!(%peer, "this address holds its share of connections; refusing");
            http.core.metrics().refused("per_address");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, app, http) = (acceptor.clone(), app.clone(), http.clone());
        tasks.spawn(async move {
            let _held = (permit, slot);
            if let Err(e) = connection(tcp, peer, acceptor, app, http).await {
                debug!(%peer, error = %e, "HTTPS connection ended with an error");
            }
        });
    }
}

/// The answer to a request that was not read and answered within the time limit. The connection closes after
/// it (hyper does not keep a connection whose request body was left unread).
fn too_slow(limit: Duration) -> Response {
    (
        StatusCode::REQUEST_TIMEOUT,
        [(header::CONNECTION, "close")],
        format!(
            "the request was not received within {}s\n",
            limit.as_secs_f64()
        ),
    )
        .into_response()
}

/// The request's declared body length, when it declares one.
fn body_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn too_large_answer() -> Response {
    (
        StatusCode::PAYLOAD_TOO_LARGE,
        [(header::CONNECTION, "close")],
        format!("request bodies are limited to {MAX_BODY} bytes\n"),
    )
        .into_response()
}

async fn connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    app: Router,
    http: Http,
) -> anyhow::Result<()> {
    // One limit for each step a client could stretch: the TLS handshake, each request's headers (hyper's
    // header timer, which also runs while a kept-alive connection sits idle), and each whole request, body
    // included. Without the last, a client that sent headers and then one body byte a minute held its
    // connection, and its place in the connection limit, forever.
    let limit = http.core.config().request_timeout;
    let tls = tokio::time::timeout(limit, acceptor.accept(tcp))
        .await
        .map_err(|_| anyhow::anyhow!("TLS handshake timed out"))??;
    let mut channel_binding = [0u8; CHANNEL_BINDING_LEN];
    tls.get_ref()
        .1
        .export_keying_material(&mut channel_binding, CHANNEL_BINDING_LABEL, Some(b""))
        .map_err(|e| anyhow::anyhow!("TLS exporter unavailable: {e}"))?;
    let slot = UpgradeSlot::default();
    let slot_for_requests = slot.clone();
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(slot_for_requests.clone());
            // Where the request came from, as axum's handlers expect to find it.
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            // A declared length over the cap is refused before a byte of the body is read; a chunked body
            // is cut off at the cap by the routes' body limit.
            let too_large = body_length(req.headers()).is_some_and(|n| n > MAX_BODY as u64);
            let answer = app.clone().oneshot(req);
            async move {
                if too_large {
                    return Ok(too_large_answer());
                }
                match tokio::time::timeout(limit, answer).await {
                    Ok(answered) => answered,
                    Err(_) => Ok(too_slow(limit)),
                }
            }
        });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limit)
        .serve_connection(TokioIo::new(tls), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r?,
        () = http.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(3), conn).await;
            return Ok(());
        }
    }
    let upgrade = slot.0.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(upgrade) = upgrade {
        let upgraded = tokio::time::timeout(limit, upgrade)
            .await
            .map_err(|_| anyhow::anyhow!("WebSocket upgrade timed out"))??;
        websocket_session(upgraded, &http, peer, channel_binding).await;
    }
    Ok(())
}
