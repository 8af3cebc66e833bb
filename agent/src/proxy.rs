//! HTTP CONNECT proxies for the WebSocket transport: which proxy (if any) the environment asks for, and the
//! CONNECT exchange itself.
//!
//! The environment follows curl's conventions: `https_proxy`/`HTTPS_PROXY`, else `all_proxy`/`ALL_PROXY`,
//! with exceptions in `no_proxy`/`NO_PROXY`. Only `http://` proxies are spoken (TLS to the relay runs inside
//! the tunnel, so the proxy never sees the session). QUIC never uses a proxy: these are TCP proxies.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest proxy reply header we read before giving up: a real one is a few hundred bytes.
pub const MAX_REPLY_HEADER: usize = 8 * 1024;
/// How long the proxy has to answer CONNECT (including reaching the target).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long reaching the proxy itself may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the proxy did not give us a tunnel. Messages name the proxy and the target.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The proxy variable is not a URL we can use.
    #[error("the proxy setting {value:?} is not usable: {reason}")]
    BadUrl { value: String, reason: &'static str },
    /// The proxy could not be reached.
    #[error("cannot reach the proxy at {proxy}: {source}")]
    Unreachable {
        proxy: String,
        source: std::io::Error,
    },
    /// The proxy answered with a non-2xx status.
    #[error("the proxy at {proxy} refused CONNECT to {target}: {status}")]
    Refused {
        proxy: String,
        target: String,
        status: String,
    },
    /// The proxy's answer was not HTTP, or too long.
    #[error("the proxy at {proxy} sent an invalid reply to CONNECT {target}: {reason}")]
    BadReply {
        proxy: String,
        target: String,
        reason: String,
    },
    /// The proxy did not answer in time.
    #[error("the proxy at {proxy} did not answer CONNECT to {target} within {after:?}")]
    Timeout {
        proxy: String,
        target: String,
        after: Duration,
    },
}

/// An `http://[user:password@]host[:port]` proxy. `Debug` and `Display` never show the password.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    pub host: String,
    pub port: u16,
    auth: Option<(String, String)>,
}

impl ProxyUrl {
    pub fn parse(value: &str) -> Result<Self, ProxyError> {
        let bad = |reason| ProxyError::BadUrl {
            value: redact(value),
            reason,
        };
        let v = value.trim();
        let rest = match v.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some(_) => return Err(bad("only http:// proxies are supported")),
            None => v,
        };
        let authority = rest.split('/').next().unwrap_or_default();
        let (auth, hostport) = match authority.rsplit_once('@') {
            Some((userinfo, hostport)) => {
                let (user, pass) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                let user =
                    percent_decode(user).ok_or_else(|| bad("bad %-escape in the user name"))?;
                let pass =
                    percent_decode(pass).ok_or_else(|| bad("bad %-escape in the password"))?;
                (Some((user, pass)), hostport)
            }
            None => (None, authority),
        };
        let (host, port) = if hostport.starts_with('[') || hostport.matches(':').count() == 1 {
            crate::tls::split_host_port(hostport).ok_or_else(|| bad("bad host or port"))?
        } else {
            (hostport, 80)
        };
        if host.is_empty() || host.contains(':') && !hostport.starts_with('[') {
            return Err(bad("bad host or port"));
        }
        Ok(Self {
            host: host.to_string(),
            port,
            auth,
        })
    }

    fn authority(&self) -> String {
        authority(&self.host, self.port)
    }
}

impl fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.authority())
    }
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyUrl")
            .field("host", &self.host)
            .field("port", &self.port)
            .field(
                "auth",
                &self.auth.as_ref().map(|(user, _)| (user, "MASKED")),
            )
            .finish()
    }
}

fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Drops a password from a proxy URL before it goes into an error message.
fn redact(value: &str) -> String {
    match value.rsplit_once('@') {
        Some((before, after)) => {
            let scheme_end = before.find("://").map(|i| i + 3).unwrap_or(0);
            format!("{}MASKED@{after}", &before[..scheme_end])
        }
        None => value.to_string(),
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The `no_proxy` list: hosts reached directly.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoProxy {
    all: bool,
    entries: Vec<String>,
}

impl NoProxy {
    /// Parses a comma-separated list: `*`, host names (a leading `.` or `*.` is ignored: `example.com`
    /// covers its subdomains), and IP addresses. A `:port` suffix is ignored.
    pub fn parse(list: &str) -> Self {
        let mut out = Self::default();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if entry == "*" {
                out.all = true;
                continue;
            }
            let entry = entry.to_ascii_lowercase();
            let entry = match crate::tls::split_host_port(&entry) {
                Some((host, _)) => host.to_string(),
                None => entry
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string(),
            };
            let entry = entry
                .trim_start_matches("*.")
                .trim_start_matches('.')
                .to_string();
            if !entry.is_empty() {
                out.entries.push(entry);
            }
        }
        out
    }

    /// Whether `host` (a name or an IP, IPv6 with or without brackets) bypasses the proxy.
    pub fn matches(&self, host: &str) -> bool {
        if self.all {
            return true;
        }
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let host_ip = host.parse::<IpAddr>().ok();
        self.entries
            .iter()
            .any(|entry| match (host_ip, entry.parse::<IpAddr>()) {
                (Some(h), Ok(e)) => h == e,
                (Some(_), Err(_)) | (None, Ok(_)) => false,
                (None, Err(_)) => {
                    host == *entry
                        || host
                            .strip_suffix(entry.as_str())
                            .is_some_and(|prefix| prefix.ends_with('.'))
                }
            })
    }
}

/// The proxy settings in effect for WebSocket connections.
#[derive(Debug, Clone, Default)]
pub struct ProxyConfig {
    /// The raw proxy setting (parsed when used, so a bad value is an error on the connection it affects).
    proxy: Option<String>,
    no_proxy: NoProxy,
}

impl ProxyConfig {
    /// No proxy at all.
    pub fn direct() -> Self {
        Self::default()
    }

    /// From the process environment.
    pub fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// From any variable lookup (for tests). Empty values count as unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let get = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| lookup(n).filter(|v| !v.trim().is_empty()))
        };
        Self {
            proxy: get(&["https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"]),
            no_proxy: get(&["no_proxy", "NO_PROXY"])
                .map(|v| NoProxy::parse(&v))
                .unwrap_or_default(),
        }
    }

    /// The proxy to use for `host`, if any.
    pub fn proxy_for(&self, host: &str) -> Result<Option<ProxyUrl>, ProxyError> {
        match &self.proxy {
            Some(p) if !self.no_proxy.matches(host) => ProxyUrl::parse(p).map(Some),
            _ => Ok(None),
        }
    }
}

/// Opens a TCP connection to `proxy` and asks it for a tunnel to `host:port`.
pub async fn connect_via(proxy: &ProxyUrl, host: &str, port: u16) -> Result<TcpStream, ProxyError> {
    let unreachable = |source| ProxyError::Unreachable {
        proxy: proxy.to_string(),
        source,
    };
    let mut stream = tokio::time::timeout(
        CONNECT_TIMEOUT,
        TcpStream::connect((proxy.host.as_str(), proxy.port)),
    )
    .await
    .map_err(|_| unreachable(std::io::ErrorKind::TimedOut.into()))?
    .map_err(unreachable)?;
    let _ = stream.set_nodelay(true);
    http_connect(&mut stream, proxy, &authority(host, port)).await?;
    Ok(stream)
}

/// The CONNECT exchange on an open stream to the proxy. Reads exactly the reply header, nothing after it,
/// so the bytes that follow belong to the tunnel.
pub async fn http_connect<S>(
    stream: &mut S,
    proxy: &ProxyUrl,
    target: &str,
) -> Result<(), ProxyError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let timeout = || ProxyError::Timeout {
        proxy: proxy.to_string(),
        target: target.to_string(),
        after: REPLY_TIMEOUT,
    };
    tokio::time::timeout(REPLY_TIMEOUT, exchange(stream, proxy, target))
        .await
        .map_err(|_| timeout())?
}

async fn exchange<S>(stream: &mut S, proxy: &ProxyUrl, target: &str) -> Result<(), ProxyError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let bad = |reason: String| ProxyError::BadReply {
        proxy: proxy.to_string(),
        target: target.to_string(),
        reason,
    };
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some((user, pass)) = &proxy.auth {
        let token = STANDARD.encode(format!("{user}:{pass}"));
        request.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
    }
    request.push_str("\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| bad(format!("write failed: {e}")))?;
    stream
        .flush()
        .await
        .map_err(|e| bad(format!("write failed: {e}")))?;

    // Byte by byte: the reply is short, and reading ahead could swallow the first bytes of the tunnel.
    let mut header = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !header.ends_with(b"\r\n\r\n") {
        if header.len() >= MAX_REPLY_HEADER {
            return Err(bad(format!("header longer than {MAX_REPLY_HEADER} bytes")));
        }
        match stream.read(&mut byte).await {
            Ok(0) => return Err(bad("the proxy closed the connection".into())),
            Ok(_) => header.push(byte[0]),
            Err(e) => return Err(bad(format!("read failed: {e}"))),
        }
    }
    let text = String::from_utf8_lossy(&header);
    let status_line = text.lines().next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (version, code) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    if !version.starts_with("HTTP/1.")
        || code.len() != 3
        || !code.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad(format!("not an HTTP status line: {status_line:?}")));
    }
    if !code.starts_with('2') {
        let reason = parts.next().unwrap_or_default().trim();
        return Err(ProxyError::Refused {
            proxy: proxy.to_string(),
            target: target.to_string(),
            status: format!("{code} {reason}").trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use tokio::net::TcpListener;

    #[test]
    fn no_proxy_matching() {
        let np = NoProxy::parse(" .internal.example, localhost,10.0.0.1 ,[::1], *.corp:8080,,");
        for host in [
            "internal.example",
            "a.internal.example",
            "LOCALHOST",
            "10.0.0.1",
            "::1",
            "[::1]",
            "x.corp",
            "corp",
        ] {
            assert!(np.matches(host), "{host} should bypass");
        }
        for host in [
            "example",
            "notinternal.example",
            "localhost.evil.com",
            "10.0.0.10",
            "10.0.0.2",
            "::2",
            "xcorp",
        ] {
            assert!(!np.matches(host), "{host} should use the proxy");
        }
        assert!(NoProxy::parse("*").matches("anything.at.all"));
        assert!(!NoProxy::parse("").matches("a"));
    }

    #[test]
    fn environment_precedence_and_no_proxy() {
        let env: HashMap<&str, &str> = [
            ("HTTPS_PROXY", "http://upper:3128"),
            ("ALL_PROXY", "http://all:1"),
            ("no_proxy", "relay.local"),
        ]
        .into();
        let cfg = ProxyConfig::from_lookup(|n| env.get(n).map(|v| v.to_string()));
        assert_eq!(cfg.proxy_for("relay.local").unwrap(), None);
        let p = cfg.proxy_for("relay.example").unwrap().unwrap();
        assert_eq!((p.host.as_str(), p.port), ("upper", 3128));

        let env: HashMap<&str, &str> = [("all_proxy", "all.example:9")].into();
        let cfg = ProxyConfig::from_lookup(|n| env.get(n).map(|v| v.to_string()));
        assert_eq!(
            cfg.proxy_for("x").unwrap().unwrap().to_string(),
            "all.example:9"
        );
        assert!(ProxyConfig::direct().proxy_for("x").unwrap().is_none());
    }

    #[test]
    fn proxy_urls() {
        let p = ProxyUrl::parse("http://al%40ice:s3cr%3At@proxy.example:8080/").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy.example", 8080));
        assert_eq!(p.auth, Some(("al@ice".into(), "s3cr:t".into())));
        assert!(!format!("{p:?} {p}").contains("s3cr"));
        assert_eq!(ProxyUrl::parse("proxy").unwrap().port, 80);
        assert_eq!(ProxyUrl::parse("http://[::1]:3128").unwrap().host, "::1");
        let err = ProxyUrl::parse("socks5://u:hunter2@p:1").unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert!(ProxyUrl::parse("http://:8080").is_err());
    }

    /// A CONNECT proxy that records the request header, answers with `reply`, and on a
    /// 2xx reply forwards bytes to the requested target.
    async fn proxy(reply: &'static str) -> (ProxyUrl, Arc<Mutex<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(String::new()));
        let record = seen.clone();
        tokio::spawn(async move {
            let (mut client, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                client.read_exact(&mut b).await.unwrap();
                head.push(b[0]);
            }
            let head = String::from_utf8(head).unwrap();
            *record.lock().unwrap() = head.clone();
            client.write_all(reply.as_bytes()).await.unwrap();
            if reply.starts_with("HTTP/1.1 2") {
                let target = head.split(' ').nth(1).unwrap().to_string();
                let mut upstream = TcpStream::connect(target).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            }
        });
        let url = ProxyUrl::parse(&format!("http://user:pa%20ss@{addr}")).unwrap();
        (url, seen)
    }

    #[tokio::test]
    async fn connect_through_a_proxy_and_forward_bytes() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
        let (url, seen) = proxy("HTTP/1.1 200 Connection established\r\nX: y\r\n\r\n").await;
        let mut tunnel = connect_via(&url, "127.0.0.1", echo_addr.port())
            .await
            .unwrap();
        tunnel.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        tunnel.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"ping");

        let head = seen.lock().unwrap().clone();
        let target = format!("127.0.0.1:{}", echo_addr.port());
        assert!(
            head.starts_with(&format!("CONNECT {target} HTTP/1.1\r\n")),
            "{head}"
        );
        assert!(head.contains(&format!("\r\nHost: {target}\r\n")), "{head}");
        let creds = STANDARD.encode("user:pa ss");
        assert!(
            head.contains(&format!("Proxy-Authorization: Basic {creds}\r\n")),
            "{head}"
        );
    }

    #[tokio::test]
    async fn a_407_is_a_clear_refusal() {
        let (url, _) = proxy("HTTP/1.1 407 Proxy Authentication Required\r\n\r\n").await;
        let err = connect_via(&url, "relay.example", 7443).await.unwrap_err();
        assert!(matches!(err, ProxyError::Refused { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            format!(
                "the proxy at {url} refused CONNECT to relay.example:7443: 407 Proxy Authentication Required"
            )
        );
    }

    #[tokio::test]
    async fn garbage_reply_is_refused() {
        let (url, _) = proxy("SSH-2.0-OpenSSH\r\n\r\n").await;
        let err = connect_via(&url, "relay.example", 7443).await.unwrap_err();
        assert!(matches!(err, ProxyError::BadReply { .. }), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_proxy_times_out() {
        // An in-memory proxy that reads the request and never answers; paused time makes the 10 s instant.
        let (mut near, mut far) = tokio::io::duplex(4096);
        let url = ProxyUrl::parse("http://p:1").unwrap();
        let hold = tokio::spawn(async move {
            let mut sink = [0u8; 1024];
            let _ = far.read(&mut sink).await;
            std::future::pending::<()>().await;
            drop(far);
        });
        let err = http_connect(&mut near, &url, "relay.example:7443")
            .await
            .unwrap_err();
        assert!(matches!(err, ProxyError::Timeout { .. }), "{err}");
        hold.abort();
    }

    #[tokio::test]
    async fn an_endless_header_is_bounded() {
        let (mut near, mut far) = tokio::io::duplex(64 * 1024);
        let url = ProxyUrl::parse("http://p:1").unwrap();
        tokio::spawn(async move {
            let mut sink = [0u8; 1024];
            let _ = far.read(&mut sink).await;
            let _ = far.write_all(b"HTTP/1.1 200 OK\r\n").await;
            loop {
                if far
                    .write_all(b"X-Filler: aaaaaaaaaaaaaaaa\r\n")
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        let err = http_connect(&mut near, &url, "t:1").await.unwrap_err();
        assert!(matches!(err, ProxyError::BadReply { .. }), "{err}");
        assert!(err.to_string().contains("8192"), "{err}");
    }
}
