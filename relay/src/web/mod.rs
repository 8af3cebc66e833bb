//! The web dashboard, served by the relay on its HTTPS port under `/dashboard`.
//!
//! A person signs in with a one-time link the bot's `/dashboard` gives them ([`crate::sessions`]); the page then calls a
//! small JSON API ([`api`]) and follows a task's events live over server-sent events ([`live`]). Every
//! question of who may see or do what is answered by the same [`Backend`] the Discord bot calls (the relay's
//! [`CoreBackend`]), as the signed-in user: the dashboard has no permission rules of its own, so it cannot
//! drift from the bot's. [`guard`] holds what protects the API itself: the session cookie, the CSRF token,
//! the same-origin check and the rate limits.
//!
//! The page is a few static files embedded in the binary (`assets/`): no build step, no third-party origin,
//! and a Content-Security-Policy that allows scripts and styles from this origin only.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use ct_bot::backend::Backend;
use tokio_util::sync::CancellationToken;

use crate::core::Core;
use crate::discord::CoreBackend;
use crate::ratelimit::RateLimiter;

mod api;
mod guard;
mod live;

/// Where the dashboard lives on the relay's HTTPS port.
pub const PATH: &str = "/dashboard";

/// Largest JSON body the API reads: a prompt of [`api::MAX_PROMPT_CHARS`] characters fits with room to
/// spare; a larger body is refused with 413 before it is parsed.
const MAX_API_BODY: usize = 64 * 1024;

/// Sign-in attempts one address may make: a burst, then one every few seconds. Tokens are 256 random bits, so
/// this is not what keeps them from being guessed; it keeps a flood of attempts off the store.
const SIGNIN_BURST: u32 = 10;
const SIGNIN_EVERY: Duration = Duration::from_secs(6);

/// API requests one user may make, across their sessions on this node: generous for a person clicking about
/// (the page makes a handful per view), small enough that a script cannot keep the store busy.
const API_BURST: u32 = 120;
const API_EVERY: Duration = Duration::from_millis(250);

/// Keys each limiter remembers at most (see [`RateLimiter`]).
const LIMITER_KEYS: usize = 100_000;

/// The dashboard's state, shared by its handlers.
#[derive(Debug, Clone)]
pub struct Web {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    core: Core,
    /// The one authorization layer, shared with the bot.
    backend: CoreBackend,
    shutdown: CancellationToken,
    /// Live event streams open per session (by public session id), bounded by [`live::MAX_STREAMS`].
    streams: Mutex<HashMap<String, usize>>,
    signin_limit: RateLimiter<IpAddr>,
    api_limit: RateLimiter<String>,
}

impl Web {
    /// The dashboard over `core`; its live streams end when `shutdown` fires.
    pub fn new(core: Core, shutdown: CancellationToken) -> Self {
        Self {
            inner: Arc::new(Inner {
                backend: CoreBackend::new(core.clone()),
                core,
                shutdown,
                streams: Mutex::new(HashMap::new()),
                signin_limit: RateLimiter::new(SIGNIN_BURST, SIGNIN_EVERY, LIMITER_KEYS),
                api_limit: RateLimiter::new(API_BURST, API_EVERY, LIMITER_KEYS),
            }),
        }
    }

    fn backend(&self) -> &dyn Backend {
        &self.inner.backend
    }
}

/// The dashboard's routes, all under [`PATH`].
pub fn router(web: Web) -> Router {
    let api = Router::new()
        .route("/signin", post(api::signin))
        .route("/me", get(api::me))
        .route("/signout", post(api::signout))
        .route("/sessions", get(api::sessions).delete(api::end_all))
        .route("/sessions/{id}", delete(api::end_session))
        .route("/agents", get(api::agents))
        .route("/projects", get(api::projects))
        .route("/tasks", get(api::tasks).post(api::start_task))
        .route("/tasks/{id}", get(api::task))
        .route("/tasks/{id}/live", get(live::events))
        .route("/tasks/{id}/reply", post(api::reply))
        .route("/tasks/{id}/cancel", post(api::cancel))
        .route("/tasks/{id}/approvals/{approval}", post(api::decide))
        .route("/shares", get(api::shares).post(api::add_share))
        .route("/shares/{grantee}", delete(api::remove_share))
        .route("/audit", get(api::audit))
        .route("/usage", get(api::usage))
        .fallback(api::not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_API_BODY))
        .layer(axum::middleware::map_response(guard::no_store));
    let page = || asset(INDEX_HTML, "text/html; charset=utf-8");
    Router::new()
        .route(PATH, get(page))
        .route("/dashboard/", get(page))
        .route(
            "/dashboard/signin",
            get(|| asset(SIGNIN_HTML, "text/html; charset=utf-8")),
        )
        .route(
            "/dashboard/app.js",
            get(|| asset(APP_JS, "text/javascript; charset=utf-8")),
        )
        .route(
            "/dashboard/signin.js",
            get(|| asset(SIGNIN_JS, "text/javascript; charset=utf-8")),
        )
        .route(
            "/dashboard/app.css",
            get(|| asset(APP_CSS, "text/css; charset=utf-8")),
        )
        .nest("/dashboard/api", api)
        .layer(axum::middleware::map_response(guard::security_headers))
        .with_state(web)
}

const INDEX_HTML: &str = include_str!("assets/index.html");
const SIGNIN_HTML: &str = include_str!("assets/signin.html");
const APP_JS: &str = include_str!("assets/app.js");
const SIGNIN_JS: &str = include_str!("assets/signin.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// One embedded file. Revalidated on each load (they are small, and a relay upgrade must not leave an old
/// script talking to a new API).
async fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}
