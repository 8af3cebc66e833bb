//! `ct-agent doctor`: checks everything the agent depends on and says, for each problem, what to do.
//!
//! Checks, in order: the pairing and key file; Claude Code (found, version, logged in, by running the real
//! CLI); the relay over QUIC and over WebSocket (a completed handshake proves both reachability and that
//! the relay still accepts this key), its `/healthz` over HTTPS and the clock skew from that answer's
//! `Date` header; the allowed project folders; the service; and, inside WSL, what is worth knowing there.
//!
//! One care: a handshake with this agent's key replaces a session the running agent holds, and the relay
//! tells the replaced one that another agent took over, which stops it for good. So while the agent is
//! running, doctor does not handshake: it reports the running agent's own link and only probes the
//! transports below the handshake (a QUIC connection, a TLS connection with `/healthz`).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ct_protocol::link::QUIC_ALPN;
use ct_protocol::Transport;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::{ConfigDir, ConfigError, Pairing, KEY_FILE};
use crate::connect::{attempt_quic, attempt_websocket, ConnectError, Credentials};
use crate::proxy::ProxyConfig;
use crate::service::{self, wsl};
use crate::status;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Info,
    Warn,
    Fail,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ok => "ok",
            Self::Info => "info",
            Self::Warn => "warn",
            Self::Fail => "FAIL",
        })
    }
}

/// One thing doctor found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Which check (`claude`, `relay/quic`, `clock`, ...).
    pub check: String,
    pub level: Level,
    pub message: String,
    /// What to do about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// All findings.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    fn add(&mut self, check: &str, level: Level, message: impl Into<String>, fix: Option<String>) {
        self.findings.push(Finding {
            check: check.into(),
            level,
            message: message.into(),
            fix,
        });
    }

    /// The worst level found.
    pub fn worst(&self) -> Level {
        self.findings
            .iter()
            .map(|f| f.level)
            .max()
            .unwrap_or(Level::Ok)
    }

    /// The findings for one check.
    pub fn get(&self, check: &str) -> Option<&Finding> {
        self.findings.iter().find(|f| f.check == check)
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for f in &self.findings {
            out.push_str(&format!(
                "{:<5} {:<15} {}\n",
                f.level.to_string(),
                f.check,
                f.message
            ));
            if let Some(fix) = &f.fix {
                out.push_str(&format!("{:<21} -> {fix}\n", ""));
            }
        }
        let (fails, warns) = self
            .findings
            .iter()
            .fold((0, 0), |(f, w), x| match x.level {
                Level::Fail => (f + 1, w),
                Level::Warn => (f, w + 1),
                _ => (f, w),
            });
        out.push_str(&match (fails, warns) {
            (0, 0) => "\nAll good.\n".to_string(),
            (0, w) => format!("\n{w} warning(s); the agent can work.\n"),
            (f, w) => format!("\n{f} problem(s) and {w} warning(s): fix the FAIL lines first.\n"),
        });
        out
    }
}

/// What doctor checks against.
#[derive(Debug, Clone)]
pub struct DoctorOptions {
    pub config_dir: PathBuf,
    /// The Claude Code binary [default: `$CLAUDE_BIN`, else `claude` on PATH].
    pub claude_bin: Option<PathBuf>,
    /// When set, Claude Code runs with a cleared environment plus `PATH`, `LANG` and these variables
    /// (tests); otherwise with doctor's own environment.
    pub claude_env: Option<Vec<(String, String)>>,
    /// `ALLOWED_PROJECT_DIRS`.
    pub allowed_dirs: Option<String>,
    pub proxy: ProxyConfig,
    /// The service to ask about; `None` skips that check.
    pub service: Option<service::Context>,
    /// The kernel release, for the WSL notes.
    pub kernel_release: String,
    /// Bound on each Claude Code command and each network probe.
    pub timeout: Duration,
}

impl DoctorOptions {
    /// Options from the environment: `CLAUDE_BIN`, `ALLOWED_PROJECT_DIRS`, proxy variables, the kernel.
    pub fn from_env(config_dir: PathBuf) -> Self {
        Self {
            config_dir,
            claude_bin: std::env::var_os("CLAUDE_BIN")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            claude_env: None,
            allowed_dirs: std::env::var(service::ENV_ALLOWED_DIRS).ok(),
            proxy: ProxyConfig::from_env(),
            service: None,
            kernel_release: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            timeout: Duration::from_secs(20),
        }
    }
}

/// Runs every check.
pub async fn run(opts: &DoctorOptions) -> Report {
    let mut report = Report::default();
    let identity = check_config(opts, &mut report);
    let claude = check_claude(opts);
    let relay = async {
        let mut r = Report::default();
        if let Some(identity) = &identity {
            check_relay(opts, identity, &mut r).await;
        }
        r
    };
    let (claude, relay) = tokio::join!(claude, relay);
    report.findings.extend(claude.findings);
    report.findings.extend(relay.findings);
    check_folders(opts, &mut report);
    if let Some(ctx) = &opts.service {
        check_service(ctx, &mut report);
    }
    check_wsl(opts, &mut report);
    report
}

// ---- config and key ----

fn check_config(opts: &DoctorOptions, report: &mut Report) -> Option<(crate::AgentKey, Pairing)> {
    let dir = &opts.config_dir;
    let pair_fix =
        || Some("run `ct-agent pair <token>` with a token from /register in Discord".to_string());
    if !dir.exists() {
        report.add(
            "pairing",
            Level::Fail,
            format!("not paired: {} does not exist", dir.display()),
            pair_fix(),
        );
        return None;
    }
    let config = match ConfigDir::open(dir) {
        Ok(c) => c,
        Err(e) => {
            report.add("pairing", Level::Fail, e.to_string(), None);
            return None;
        }
    };
    let key_path = config.file(KEY_FILE);
    match std::fs::metadata(&key_path) {
        Ok(meta) => {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                report.add(
                    "key",
                    Level::Fail,
                    format!("{} has mode {mode:o}: other users can read the agent key", key_path.display()),
                    Some(format!(
                        "run `chmod 600 {}`; if others may have copied it, pair again with `ct-agent pair --force <token>`",
                        key_path.display()
                    )),
                );
            } else {
                report.add(
                    "key",
                    Level::Ok,
                    format!("{} is private (mode {mode:o})", key_path.display()),
                    None,
                );
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => report.add(
            "key",
            Level::Fail,
            format!("cannot read {}: {e}", key_path.display()),
            None,
        ),
    }
    match config.load_identity() {
        Ok(Some((key, pairing))) => {
            report.add(
                "pairing",
                Level::Ok,
                format!(
                    "paired as \"{}\" with relay {}, owned by {}",
                    pairing.agent_name,
                    pairing.relays.join(", "),
                    pairing.owner_label()
                ),
                None,
            );
            Some((key, pairing))
        }
        Ok(None) => {
            report.add(
                "pairing",
                Level::Fail,
                format!("not paired (no pairing in {})", dir.display()),
                pair_fix(),
            );
            None
        }
        Err(ConfigError::KeyTooOpen { .. }) => None, // reported above, with its fix
        Err(e) => {
            report.add("pairing", Level::Fail, e.to_string(), None);
            None
        }
    }
}

// ---- Claude Code ----

/// `$CLAUDE_BIN`, else `claude` in the PATH Claude Code will run with.
fn find_claude(opts: &DoctorOptions) -> Option<PathBuf> {
    if let Some(bin) = &opts.claude_bin {
        return Some(bin.clone());
    }
    let path = opts
        .claude_env
        .as_ref()
        .and_then(|vars| {
            vars.iter()
                .find(|(k, _)| k == "PATH")
                .map(|(_, v)| v.clone())
        })
        .or_else(|| std::env::var("PATH").ok())?;
    std::env::split_paths(&path)
        .map(|d| d.join("claude"))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn run_claude(opts: &DoctorOptions, bin: &Path, args: &[&str]) -> io::Result<Output> {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(vars) = &opts.claude_env {
        cmd.env_clear();
        for key in ["PATH", "LANG"] {
            if let Some(v) = std::env::var_os(key) {
                cmd.env(key, v);
            }
        }
        cmd.envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    }
    let out = tokio::time::timeout(opts.timeout, cmd.output())
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {:?}", opts.timeout),
            )
        })??;
    Ok(Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

async fn check_claude(opts: &DoctorOptions) -> Report {
    let mut report = Report::default();
    let Some(bin) = find_claude(opts) else {
        report.add(
            "claude",
            Level::Fail,
            "Claude Code (`claude`) is not on PATH",
            Some(
                "install it (`npm install -g @anthropic-ai/claude-code`, or see https://docs.anthropic.com/en/docs/claude-code), \
                 or set CLAUDE_BIN to its path"
                    .into(),
            ),
        );
        return report;
    };
    match run_claude(opts, &bin, &["--version"]).await {
        Ok(out) if out.code == Some(0) => {
            if !judge_version(&mut report, &bin, out.stdout.trim()) {
                return report;
            }
        }
        Ok(out) => {
            report.add(
                "claude",
                Level::Fail,
                format!(
                    "`{} --version` failed (exit {:?}): {}",
                    bin.display(),
                    out.code,
                    first_line(&out.stderr, &out.stdout)
                ),
                Some(
                    "reinstall Claude Code, then run `claude --version` yourself to see the error"
                        .into(),
                ),
            );
            return report;
        }
        Err(e) => {
            report.add(
                "claude",
                Level::Fail,
                format!("cannot run {}: {e}", bin.display()),
                Some("check the path (CLAUDE_BIN) and that the file is executable".into()),
            );
            return report;
        }
    }
    match run_claude(opts, &bin, &["auth", "status"]).await {
        Ok(out) => match serde_json::from_str::<serde_json::Value>(&out.stdout) {
            Ok(v) if v["loggedIn"] == true => {
                let method = v["authMethod"].as_str().unwrap_or("?");
                report.add("claude/login", Level::Ok, format!("logged in ({method})"), None);
            }
            Ok(_) => report.add(
                "claude/login",
                Level::Fail,
                "Claude Code is not logged in, so every task would fail",
                Some(
                    "run `claude auth login` (or start `claude` and type /login) as the user the agent runs as; \
                     with an API key, set ANTHROPIC_API_KEY for the agent instead"
                        .into(),
                ),
            ),
            Err(_) => report.add(
                "claude/login",
                Level::Warn,
                format!(
                    "`claude auth status` gave no answer doctor understands (exit {:?}): {}",
                    out.code,
                    first_line(&out.stderr, &out.stdout)
                ),
                Some("run `claude auth status` yourself; older Claude Code versions lack it: upgrade".into()),
            ),
        },
        Err(e) => report.add("claude/login", Level::Fail, format!("cannot run `claude auth status`: {e}"), None),
    }
    report
}

/// Reports the installed CLI's version against the range this agent was tested on; false when tasks cannot
/// run with it (too old), so the login check after it would only add noise.
fn judge_version(report: &mut Report, bin: &Path, printed: &str) -> bool {
    use crate::claude::{Support, Version, MIN_VERSION, NEWEST_TESTED};
    let Some(version) = Version::parse(printed) else {
        report.add(
            "claude",
            Level::Warn,
            format!("Claude Code at {} printed a version doctor cannot read: {printed:?}", bin.display()),
            Some("run `claude --version` yourself; reinstall Claude Code if it is not a version number".into()),
        );
        return true;
    };
    let (level, message, fix) = match version.support() {
        Support::TooOld => (
            Level::Fail,
            format!(
                "Claude Code {version} ({}) is older than {MIN_VERSION}, the oldest this agent supports: tasks are refused",
                bin.display()
            ),
            Some("upgrade it: `npm install -g @anthropic-ai/claude-code@latest` (or `claude update`)".into()),
        ),
        Support::Tested => (
            Level::Ok,
            format!("Claude Code {version} ({}), tested with this agent", bin.display()),
            None,
        ),
        Support::Newer => (
            Level::Warn,
            format!(
                "Claude Code {version} ({}) is newer than {NEWEST_TESTED}, the newest tested with this agent: \
                 it should work, but if tasks misbehave, this is why",
                bin.display()
            ),
            Some(format!(
                "upgrade ct-agent when a newer one is out, or pin a tested CLI: \
                 `npm install -g @anthropic-ai/claude-code@{NEWEST_TESTED}`"
            )),
        ),
    };
    report.add("claude", level, message, fix);
    level != Level::Fail
}

fn first_line<'a>(a: &'a str, b: &'a str) -> &'a str {
    a.lines()
        .chain(b.lines())
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("no output")
}

// ---- relay ----

async fn check_relay(
    opts: &DoctorOptions,
    (key, pairing): &(crate::AgentKey, Pairing),
    report: &mut Report,
) {
    let Some(addr) = pairing.relays.first() else {
        report.add(
            "relay",
            Level::Fail,
            "the pairing lists no relay address",
            Some("pair again".into()),
        );
        return;
    };
    let running = status::gather(&opts.config_dir)
        .ok()
        .filter(|r| r.running)
        .and_then(|r| r.status);
    let https = probe_https(addr, &opts.proxy, opts.timeout);
    if let Some(st) = running {
        let (quic, https) = tokio::join!(probe_quic(addr, opts.timeout), https);
        let link = match (st.state, st.transport) {
            (status::State::Connected, Some(t)) => format!(
                "connected over {t} to {}",
                st.relay_addr.as_deref().unwrap_or(addr)
            ),
            (state, _) => format!("{state:?}").to_lowercase(),
        };
        report.add(
            "relay/session",
            if st.state == status::State::Connected { Level::Ok } else { Level::Warn },
            format!(
                "the agent (pid {}) is running and {link}; doctor does not open a second session, which would replace it",
                st.pid
            ),
            (st.state != status::State::Connected).then(|| {
                format!(
                    "see `ct-agent status`{}",
                    st.last_error.as_deref().map(|e| format!(" (last error: {e})")).unwrap_or_default()
                )
            }),
        );
        match quic {
            Ok(()) => report.add(
                "relay/quic",
                Level::Ok,
                format!("QUIC connection to {addr} (UDP) completes"),
                None,
            ),
            Err(e) => report.add(
                "relay/quic",
                Level::Warn,
                format!("QUIC to {addr}: {e}"),
                Some(udp_fix(addr)),
            ),
        }
        report_https(addr, https, true, report);
        return;
    }
    let creds = Credentials {
        key: key.clone(),
        relay: pairing.relay_fingerprint,
        pair: None,
    };
    // One after the other: two sessions with one key at once would replace each other at the relay.
    let handshakes = async {
        let quic = attempt_quic(addr, &creds).await;
        let quic = close(quic).await;
        let ws = attempt_websocket(addr, &creds, &opts.proxy).await;
        let ws = close(ws).await;
        (quic, ws)
    };
    let ((quic, ws), https) = tokio::join!(handshakes, https);
    let ws_ok = ws.is_ok();
    for (check, transport, result) in [
        ("relay/quic", Transport::Quic, quic),
        ("relay/websocket", Transport::WebSocket, ws),
    ] {
        match result {
            Ok(owner) => report.add(
                check,
                Level::Ok,
                format!("{transport} to {addr}: handshake completed; the relay accepts this key (owner {owner})"),
                None,
            ),
            Err(e) => {
                let (level, fix) = connect_advice(&e, transport, addr, ws_ok);
                report.add(check, level, e.to_string(), Some(fix));
            }
        }
    }
    report_https(addr, https, ws_ok, report);
}

/// Ends a doctor session at once, keeping only what it proved.
async fn close(result: Result<crate::Link, ConnectError>) -> Result<String, ConnectError> {
    let link = result?;
    let owner = link.welcome.owner.clone();
    link.close("ct-agent doctor").await;
    Ok(owner.to_string())
}

fn udp_fix(addr: &str) -> String {
    format!(
        "allow outgoing UDP to {addr} (firewall, VPN); meanwhile the agent uses WebSocket over TCP, which works but \
         notices a dead link more slowly"
    )
}

fn connect_advice(
    e: &ConnectError,
    transport: Transport,
    addr: &str,
    ws_ok: bool,
) -> (Level, String) {
    if let Some(h) = e.handshake() {
        if h.is_permanent() {
            return (
                Level::Fail,
                "the relay refuses this agent: get a new token with /register in Discord and run \
                 `ct-agent pair --force <token>`"
                    .into(),
            );
        }
    }
    match transport {
        Transport::Quic if ws_ok => (Level::Warn, udp_fix(addr)),
        _ => (
            Level::Fail,
            format!(
                "check that the relay runs and that {addr} is the right address (`ct-agent status` shows it); \
                 from this machine, `curl -k https://{addr}/healthz` should print ok; behind a proxy, set HTTPS_PROXY"
            ),
        ),
    }
}

fn report_https(
    addr: &str,
    https: Result<Health, String>,
    quiet_if_failed: bool,
    report: &mut Report,
) {
    match https {
        Ok(h) => {
            let level = if h.status == 200 {
                Level::Ok
            } else {
                Level::Warn
            };
            report.add(
                "relay/healthz",
                level,
                format!("https://{addr}/healthz answered {}", h.status),
                None,
            );
            match h.skew {
                Some(skew) => {
                    let abs = skew.unsigned_abs();
                    let ahead = if skew >= 0 { "ahead of" } else { "behind" };
                    let (level, fix) = match abs {
                        0..=10 => (Level::Ok, None),
                        11..=120 => (Level::Warn, Some(clock_fix())),
                        _ => (Level::Fail, Some(clock_fix())),
                    };
                    report.add(
                        "clock",
                        level,
                        format!("this clock is {abs} s {ahead} the relay's (from its Date header, ±1 s)"),
                        fix,
                    );
                }
                None => report.add(
                    "clock",
                    Level::Warn,
                    "the relay's answer had no usable Date header; clock not checked",
                    None,
                ),
            }
        }
        Err(e) => {
            let level = if quiet_if_failed {
                Level::Warn
            } else {
                Level::Fail
            };
            report.add(
                "relay/healthz",
                level,
                format!("https://{addr}/healthz: {e}"),
                Some("the relay's TCP port must be reachable for WebSocket; check firewalls and HTTPS_PROXY".into()),
            );
            report.add(
                "clock",
                Level::Info,
                "not checked (the relay's HTTPS answer is the time source)",
                None,
            );
        }
    }
}

fn clock_fix() -> String {
    if wsl::is_wsl_kernel(
        &std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default(),
    ) {
        "WSL's clock drifts after the PC sleeps: run `sudo hwclock -s` in WSL, or `wsl.exe --shutdown` from Windows".into()
    } else {
        "turn on time synchronisation (`sudo timedatectl set-ntp true` on Linux; on macOS: System Settings → General → \
         Date & Time → Set time automatically)"
            .into()
    }
}

/// What `/healthz` said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub status: u16,
    /// Local clock minus the relay's, in seconds (positive: we are ahead).
    pub skew: Option<i64>,
}

/// Largest response head doctor reads from `/healthz`.
const MAX_HEAD: usize = 16 * 1024;

/// `GET /healthz` over TLS on the relay's TCP port (through the proxy when one applies).
pub async fn probe_https(
    addr: &str,
    proxy: &ProxyConfig,
    timeout: Duration,
) -> Result<Health, String> {
    tokio::time::timeout(timeout, probe_https_inner(addr, proxy))
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}

async fn probe_https_inner(addr: &str, proxy: &ProxyConfig) -> Result<Health, String> {
    let (host, port) =
        crate::tls::split_host_port(addr).ok_or_else(|| format!("{addr:?} is not host:port"))?;
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    let via = if loopback {
        None
    } else {
        proxy.proxy_for(host).map_err(|e| e.to_string())?
    };
    let tcp = match via {
        Some(p) => crate::proxy::connect_via(&p, host, port)
            .await
            .map_err(|e| e.to_string())?,
        None => tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("TCP: {e}"))?,
    };
    let config = crate::tls::client_config(b"http/1.1").map_err(|e| e.to_string())?;
    let name =
        rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let request = format!(
        "GET /healthz HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: ct-agent-doctor/{}\r\nConnection: close\r\n\r\n",
        env!("CARGO_PKG_VERSION")
    );
    let sent = unix_secs_f64(SystemTime::now());
    tls.write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tls.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_HEAD {
            return Err("response headers too long".into());
        }
    }
    let received = unix_secs_f64(SystemTime::now());
    let text = String::from_utf8_lossy(&head);
    let status = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| "not an HTTP answer".to_string())?;
    let date = text
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.trim().eq_ignore_ascii_case("date"))
        })
        .and_then(|(_, v)| parse_http_date(v.trim()));
    // The Date header has one-second resolution and is stamped somewhere between sending and receiving.
    let skew = date.map(|d| ((sent + received) / 2.0 - d as f64).round() as i64);
    Ok(Health { status, skew })
}

fn unix_secs_f64(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Parses an HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`, the IMF-fixdate every current server sends) into
/// Unix seconds.
pub fn parse_http_date(s: &str) -> Option<i64> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    let [_, day, month, year, time, "GMT"] = parts.as_slice() else {
        return None;
    };
    let day: i64 = day.parse().ok()?;
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| m == month)? as i64
        + 1;
    let year: i64 = year.parse().ok()?;
    let hms: Vec<i64> = time
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let [h, m, sec] = hms.as_slice() else {
        return None;
    };
    if !(1..=31).contains(&day) || *h > 23 || *m > 59 || *sec > 60 {
        return None;
    }
    // Howard Hinnant's days-from-civil.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86400 + h * 3600 + m * 60 + sec)
}

/// A QUIC connection (TLS handshake included) to the relay, closed at once: proves UDP reaches it without
/// starting a session.
pub async fn probe_quic(addr: &str, timeout: Duration) -> Result<(), String> {
    tokio::time::timeout(timeout, probe_quic_inner(addr))
        .await
        .map_err(|_| format!("no answer within {timeout:?} (UDP blocked?)"))?
}

async fn probe_quic_inner(addr: &str) -> Result<(), String> {
    let (host, port) =
        crate::tls::split_host_port(addr).ok_or_else(|| format!("{addr:?} is not host:port"))?;
    let remote = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("cannot resolve: {e}"))?
        .next()
        .ok_or("no address")?;
    let tls = crate::tls::client_config(QUIC_ALPN).map_err(|e| e.to_string())?;
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(
        5_000,
    ))));
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport));
    let bind: std::net::SocketAddr = if remote.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = quinn::Endpoint::client(bind).map_err(|e| e.to_string())?;
    let conn = endpoint
        .connect_with(config, remote, host)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    conn.close(0u32.into(), b"ct-agent doctor");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    Ok(())
}

// ---- folders, service, WSL ----

fn check_folders(opts: &DoctorOptions, report: &mut Report) {
    let dirs: Vec<&str> = opts
        .allowed_dirs
        .as_deref()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    // Folders named with `ct-agent project add` are allowed too, whatever the variable says.
    let added: Vec<PathBuf> = if opts.config_dir.is_dir() {
        crate::config::ConfigDir::open(&opts.config_dir)
            .ok()
            .and_then(|dir| {
                crate::projects::Policy::load_with(&dir, "", crate::projects::Host::detect()).ok()
            })
            .map(|p| p.allowed_dirs())
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    if dirs.is_empty() && added.is_empty() {
        report.add(
            "folders",
            Level::Warn,
            "no folder is allowed for tasks: ALLOWED_PROJECT_DIRS is not set here and no project was added",
            Some(
                "name a project folder with `ct-agent project add NAME FOLDER`, or set \
                 ALLOWED_PROJECT_DIRS=/path/a,/path/b for `ct-agent run` (or install the service with \
                 `ct-agent service install --allow-dir /path/a`; doctor reads the variable from its own environment)"
                    .into(),
            ),
        );
        return;
    }
    for dir in &added {
        if dir.is_dir() {
            report.add(
                "folders",
                Level::Ok,
                format!(
                    "{} (added with `ct-agent project add`) exists",
                    dir.display()
                ),
                None,
            );
        } else {
            report.add(
                "folders",
                Level::Fail,
                format!("{} (added with `ct-agent project add`) no longer exists", dir.display()),
                Some(format!(
                    "create it again (`mkdir -p {}`) or remove its project (`ct-agent project remove NAME`)",
                    dir.display()
                )),
            );
        }
    }
    let wsl = wsl::is_wsl_kernel(&opts.kernel_release);
    for dir in dirs {
        let path = Path::new(dir);
        if !path.is_absolute() {
            report.add(
                "folders",
                Level::Fail,
                format!("{dir:?} in ALLOWED_PROJECT_DIRS is not an absolute path"),
                Some("write it as an absolute path (starting with /)".into()),
            );
        } else if !path.is_dir() {
            report.add(
                "folders",
                Level::Fail,
                format!("{dir} does not exist (or is not a folder)"),
                Some(format!(
                    "create it (`mkdir -p {dir}`) or remove it from ALLOWED_PROJECT_DIRS"
                )),
            );
        } else if wsl && dir.starts_with("/mnt/") {
            report.add(
                "folders",
                Level::Warn,
                format!("{dir} is on the Windows file system (under /mnt), which WSL reaches slowly: git and builds there run many times slower"),
                Some("move the project into the Linux file system (e.g. ~/src); Windows still sees it as \\\\wsl$\\<distro>\\home\\...".into()),
            );
        } else {
            report.add("folders", Level::Ok, format!("{dir} exists"), None);
        }
    }
}

fn check_service(ctx: &service::Context, report: &mut Report) {
    let s = service::status(ctx);
    let (level, fix) = match (s.installed, s.running) {
        (true, true) => (Level::Ok, None),
        (true, false) => (Level::Fail, s.advice.clone()),
        (false, _) => (
            Level::Warn,
            Some(
                "to keep the agent running across reboots and log-outs: `ct-agent service install`"
                    .into(),
            ),
        ),
    };
    let what = match (s.installed, s.running) {
        (false, _) => "not installed".to_string(),
        (true, true) => format!("installed and running ({})", s.detail),
        (true, false) => format!("installed but not running ({})", s.detail),
    };
    report.add(
        "service",
        level,
        format!("{} {}: {what}", s.manager, s.name),
        fix,
    );
}

fn check_wsl(opts: &DoctorOptions, report: &mut Report) {
    match wsl::wsl_version(&opts.kernel_release) {
        None => {}
        Some(wsl::WslVersion::Wsl1) => report.add(
            "wsl",
            Level::Warn,
            "WSL 1: no real Linux kernel; QUIC and Claude Code's tools are slower or may not work",
            Some(
                "convert the distribution from Windows: `wsl.exe --set-version <distro> 2`".into(),
            ),
        ),
        Some(wsl::WslVersion::Wsl2) => {
            let systemd = Path::new("/run/systemd/system").is_dir();
            report.add(
                "wsl",
                Level::Info,
                if systemd {
                    "WSL 2 with systemd: the agent runs as a systemd user unit"
                } else {
                    "WSL 2 without systemd: the agent runs from a Windows logon task (`ct-agent service install`)"
                },
                None,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates() {
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(
            parse_http_date("Tue, 14 Nov 2023 22:13:20 GMT"),
            Some(1_700_000_000)
        );
        assert_eq!(
            parse_http_date("Tue, 29 Feb 2000 00:00:00 GMT"),
            Some(951_782_400)
        );
        assert_eq!(parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"), None);
        assert_eq!(parse_http_date("Sun, 06 Foo 1994 08:49:37 GMT"), None);
    }

    #[test]
    fn render_says_what_to_do() {
        let mut r = Report::default();
        r.add("claude", Level::Ok, "2.1 (Claude Code)", None);
        r.add(
            "claude/login",
            Level::Fail,
            "not logged in",
            Some("run claude auth login".into()),
        );
        let text = r.render();
        assert!(
            text.contains("FAIL  claude/login    not logged in\n"),
            "{text}"
        );
        assert!(text.contains("-> run claude auth login"), "{text}");
        assert!(text.contains("1 problem(s)"), "{text}");
        assert_eq!(r.worst(), Level::Fail);
    }
}
