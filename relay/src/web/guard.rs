//! What stands between the dashboard's API and a browser: the session cookie, the CSRF token and same-origin
//! check on every request that changes something, the per-user and per-address rate limits, and the headers
//! every response carries.

use std::net::IpAddr;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};

use super::Web;
use crate::sessions::{self as auth, Session};
use crate::store::now;

/// The session cookie. `__Host-` makes the browser insist on Secure, Path=/ and no Domain, so no other host
/// (a sibling subdomain included) can set or shadow it.
pub const COOKIE: &str = "__Host-ct_session";

/// Longest cookie secret looked up (ours are 43 characters).
const MAX_SECRET_CHARS: usize = 128;

/// The header that carries the session's CSRF token on every state-changing request.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The Content-Security-Policy of every dashboard response: this origin's scripts and styles only, no inline
/// code, no frames, no plugins, fetches back to this origin only.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// An API error: its status and words for the person.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// Seconds to wait, for 429.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn signed_out() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "You are signed out: type /dashboard in Discord for a sign-in link.",
        )
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %e, "dashboard request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Something went wrong on the relay: try again in a moment.",
        )
    }

    fn too_many(wait: std::time::Duration) -> Self {
        let secs = wait.as_secs().max(1);
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!("Too many requests: wait {secs} s and try again."),
            retry_after: Some(secs),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            axum::Json(serde_json::json!({ "error": self.message })),
        )
            .into_response();
        if let Some(secs) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

impl From<crate::core::Stopped> for ApiError {
    fn from(e: crate::core::Stopped) -> Self {
        Self::internal(e)
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        Self::internal(e)
    }
}

/// A request from a signed-in person. Taking it as an argument is what makes a handler require a session;
/// for any method but GET and HEAD it also requires the session's CSRF token and a same-origin request.
#[derive(Debug)]
pub struct Signed(pub Session);

impl FromRequestParts<Web> for Signed {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, web: &Web) -> Result<Self, ApiError> {
        let secret = cookie(&parts.headers, COOKIE).ok_or_else(ApiError::signed_out)?;
        // The cookie is the browser's to send and anyone's to forge: bounded before it reaches the store.
        if secret.len() > MAX_SECRET_CHARS {
            return Err(ApiError::signed_out());
        }
        let session = web
            .inner
            .core
            .read(move |store| auth::session(store, &secret, now()))
            .await??
            .ok_or_else(ApiError::signed_out)?;
        if !matches!(parts.method, Method::GET | Method::HEAD) {
            same_origin(
                &parts.headers,
                web.inner.core.config().dashboard_url.as_deref(),
            )?;
            let token = parts.headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
            if !auth::csrf_ok(&session, token) {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "This request did not come from the dashboard page (its CSRF token is missing or \
                     wrong): reload the page and try again.",
                ));
            }
        }
        web.inner
            .api_limit
            .take(&session.user)
            .map_err(ApiError::too_many)?;
        Ok(Self(session))
    }
}

/// Refuses a request another site's page made: browsers send `Origin` on every cross-origin request and on
/// every POST, and `Sec-Fetch-Site` on every request; either naming another site is enough to refuse. The
/// CSRF token is the check that does not depend on the browser; this one stops a forged request even where
/// a token might leak.
///
/// The page's origin is `https://` and the `Host` it asked for, or `dashboard_url` (`--dashboard-url`): a
/// reverse proxy in front of the relay may pass on a `Host` of its own.
pub fn same_origin(headers: &HeaderMap, dashboard_url: Option<&str>) -> Result<(), ApiError> {
    let refuse = || {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "This request came from another site, so it was refused: use the dashboard page itself.",
        )
    };
    if let Some(site) = headers.get("sec-fetch-site") {
        if !matches!(site.to_str(), Ok("same-origin" | "none")) {
            return Err(refuse());
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().map_err(|_| refuse())?;
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        let own = host.is_some_and(|h| origin == format!("https://{h}"));
        if !own && dashboard_url != Some(origin) {
            return Err(refuse());
        }
    }
    Ok(())
}

/// Takes a sign-in attempt from `ip`'s budget.
pub fn signin_allowed(web: &Web, ip: Option<IpAddr>) -> Result<(), ApiError> {
    let ip = ip.map_or(IpAddr::from([0, 0, 0, 0]), crate::ratelimit::group);
    web.inner.signin_limit.take(&ip).map_err(ApiError::too_many)
}

/// The value of cookie `name`, if the request has it.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then(|| v.to_string())
        })
}

/// The `Set-Cookie` value that keeps `secret` for `max_age` seconds (0: deletes it).
pub fn set_cookie(secret: &str, max_age: u64) -> HeaderValue {
    let value =
        format!("{COOKIE}={secret}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={max_age}");
    HeaderValue::from_str(&value).unwrap_or_else(|_| clear_cookie())
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn clear_cookie() -> HeaderValue {
    HeaderValue::from_static(
        "__Host-ct_session=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0",
    )
}

/// Headers on every dashboard response, page and API alike.
pub async fn security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("same-origin"),
    );
    resp
}

/// API answers are about one person: never kept by a cache.
pub async fn no_store(mut resp: Response) -> Response {
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// A short name for the browser a session was opened in, for the sessions list ("Firefox on Linux").
pub fn browser_name(headers: &HeaderMap) -> String {
    let ua = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // Order matters: Edge and Opera say "Chrome" too, Chrome says "Safari".
    let browser = [
        ("Edg/", "Edge"),
        ("OPR/", "Opera"),
        ("Firefox/", "Firefox"),
        ("Chrome/", "Chrome"),
        ("Safari/", "Safari"),
        ("curl/", "curl"),
    ]
    .iter()
    .find(|(mark, _)| ua.contains(mark))
    .map_or("A browser", |(_, name)| name);
    let os = [
        ("Android", "Android"),
        ("iPhone", "iOS"),
        ("iPad", "iPadOS"),
        ("Windows", "Windows"),
        ("Mac OS X", "macOS"),
        ("CrOS", "ChromeOS"),
        ("Linux", "Linux"),
    ]
    .iter()
    .find(|(mark, _)| ua.contains(mark))
    .map(|(_, name)| *name);
    match os {
        Some(os) => format!("{browser} on {os}"),
        None => browser.to_string(),
    }
}

/// Maps the bot's refusals and failures to API errors: a refusal is the person's to act on (its words as
/// they are), anything else is ours.
pub fn backend_err(e: ct_bot::backend::BackendError) -> ApiError {
    match e {
        ct_bot::backend::BackendError::Refused(m) => ApiError::new(StatusCode::BAD_REQUEST, m),
        ct_bot::backend::BackendError::Internal(e) => ApiError::internal(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn another_sites_request_is_refused_and_the_pages_own_pass() {
        let own = headers(&[
            ("host", "relay.example:7443"),
            ("origin", "https://relay.example:7443"),
            ("sec-fetch-site", "same-origin"),
        ]);
        assert!(same_origin(&own, None).is_ok());
        // Behind a proxy that passes its own Host: the configured dashboard URL is the page's origin.
        let proxied = headers(&[
            ("host", "10.0.0.5:7443"),
            ("origin", "https://relay.example"),
        ]);
        assert!(same_origin(&proxied, None).is_err());
        assert!(same_origin(&proxied, Some("https://relay.example")).is_ok());
        for forged in [
            headers(&[
                ("host", "relay.example:7443"),
                ("origin", "https://evil.example"),
            ]),
            headers(&[
                ("host", "relay.example:7443"),
                ("origin", "http://relay.example:7443"),
            ]),
            headers(&[("host", "relay.example:7443"), ("origin", "null")]),
            headers(&[
                ("host", "relay.example:7443"),
                ("sec-fetch-site", "cross-site"),
            ]),
            headers(&[
                ("host", "relay.example:7443"),
                ("sec-fetch-site", "same-site"),
            ]),
            headers(&[("origin", "https://relay.example:7443")]),
        ] {
            assert_eq!(
                same_origin(&forged, Some("https://relay.example"))
                    .unwrap_err()
                    .status,
                StatusCode::FORBIDDEN,
                "{forged:?}"
            );
        }
    }

    #[test]
    fn the_session_cookie_is_found_among_others_and_not_by_prefix() {
        let h = headers(&[("cookie", "a=1; __Host-ct_session=abc; b=2")]);
        assert_eq!(cookie(&h, COOKIE).as_deref(), Some("abc"));
        let h = headers(&[("cookie", "x__Host-ct_session=evil; __Host-ct_sessionx=evil")]);
        assert_eq!(cookie(&h, COOKIE), None);
        let set = set_cookie("s3cret", 60);
        let set = set.to_str().unwrap();
        for part in [
            "Secure",
            "HttpOnly",
            "SameSite=Strict",
            "Path=/",
            "Max-Age=60",
        ] {
            assert!(set.contains(part), "{set}");
        }
    }

    #[test]
    fn clients_are_named_briefly() {
        let chrome = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0 Safari/537.36";
        assert_eq!(
            browser_name(&headers(&[("user-agent", chrome)])),
            "Chrome on Linux"
        );
        let edge =
            "Mozilla/5.0 (Windows NT 10.0) AppleWebKit/537.36 Chrome/120 Safari/537.36 Edg/120";
        assert_eq!(
            browser_name(&headers(&[("user-agent", edge)])),
            "Edge on Windows"
        );
        assert_eq!(browser_name(&HeaderMap::new()), "A browser");
    }
}
