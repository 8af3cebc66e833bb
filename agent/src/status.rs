//! `status.json` (what the running agent is doing) and `ct-agent status` (what a person reads).
//!
//! The running agent rewrites `status.json` atomically on every link state change. `ct-agent status`
//! combines it with `pairing.json` and checks that the recorded process is still alive, since a killed
//! agent cannot update its own file.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use ct_protocol::Transport;
use serde::{Deserialize, Serialize};

use crate::config::{ConfigDir, ConfigError, Pairing, STATUS_FILE};
use crate::run::LinkStatus;

/// The link state as recorded in `status.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Connecting,
    Connected,
    BackingOff,
    Stopped,
}

/// The contents of `status.json`. Times are Unix seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusFile {
    pub pid: u32,
    pub state: State,
    #[serde(default)]
    pub transport: Option<Transport>,
    #[serde(default)]
    pub relay_addr: Option<String>,
    /// When the current session started (state `connected`).
    #[serde(default)]
    pub since: Option<u64>,
    /// When the next attempt is due (state `backing_off`).
    #[serde(default)]
    pub retry_at: Option<u64>,
    /// The most recent failure, kept after reconnecting so a flapping link is visible.
    #[serde(default)]
    pub last_error: Option<String>,
    pub updated_at: u64,
}

impl StatusFile {
    /// The record for `status`, written by process `pid`.
    pub fn new(pid: u32, status: &LinkStatus, last_error: Option<String>) -> Self {
        let mut file = Self {
            pid,
            state: State::Connecting,
            transport: None,
            relay_addr: None,
            since: None,
            retry_at: None,
            last_error,
            updated_at: unix(SystemTime::now()),
        };
        match status {
            LinkStatus::Connecting => {}
            LinkStatus::Connected {
                transport,
                relay_addr,
                since,
            } => {
                file.state = State::Connected;
                file.transport = Some(*transport);
                file.relay_addr = Some(relay_addr.clone());
                file.since = Some(unix(*since));
            }
            LinkStatus::BackingOff { until, .. } => {
                file.state = State::BackingOff;
                file.retry_at = Some(unix(*until));
            }
            LinkStatus::Stopped { .. } => file.state = State::Stopped,
        }
        file
    }

    pub fn store(&self, dir: &ConfigDir) -> Result<(), ConfigError> {
        dir.store_json(STATUS_FILE, self, 0o600)
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Everything `ct-agent status` reports, also its `--json` output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatusReport {
    pub config_dir: String,
    pub paired: bool,
    pub pairing: Option<Pairing>,
    /// True when `status.json` names a live process that has not stopped.
    pub running: bool,
    pub status: Option<StatusFile>,
}

/// Reads the config directory without creating or changing anything.
pub fn gather(config_dir: &Path) -> Result<StatusReport, ConfigError> {
    // Open without side effects when the directory does not exist: `status` must not create it.
    let (pairing, status) = if config_dir.exists() {
        let dir = ConfigDir::open(config_dir)?;
        (
            dir.load_pairing()?,
            dir.load_json::<StatusFile>(STATUS_FILE)?,
        )
    } else {
        (None, None)
    };
    let running = status
        .as_ref()
        .is_some_and(|s| s.state != State::Stopped && crate::sys::process_alive(s.pid));
    Ok(StatusReport {
        config_dir: config_dir.display().to_string(),
        paired: pairing.is_some(),
        pairing,
        running,
        status,
    })
}

/// The human form, relative times computed against `now` (Unix seconds).
pub fn render(report: &StatusReport, now: u64) -> String {
    let mut out = String::new();
    let mut line = |label: &str, value: String| out.push_str(&format!("  {label:<12} {value}\n"));
    match &report.pairing {
        None => {
            return format!(
                "Not paired (config directory {}).\nPair it with `ct-agent pair <token>`, using a token from \
                 /register in Discord.\n",
                report.config_dir
            );
        }
        Some(p) => {
            line("relay", p.relays.join(", "));
            line("relay key", p.relay_fingerprint.to_string());
            line("owner", p.owner_label());
            line("agent name", p.agent_name.clone());
            line("agent key", p.agent_fingerprint.to_string());
            line("paired", when(p.paired_at, now));
        }
    }
    let status = report.status.as_ref().filter(|_| report.running);
    let mut link = String::new();
    match status {
        None => link.push_str("not running; start it with `ct-agent run`\n"),
        Some(s) => {
            let addr = s.relay_addr.as_deref().unwrap_or("the relay");
            let what = match s.state {
                State::Connected => format!(
                    "connected over {} to {addr} since {}",
                    s.transport.map(Transport::as_str).unwrap_or("?"),
                    s.since.map(|t| when(t, now)).unwrap_or_else(|| "?".into())
                ),
                State::Connecting => "connecting".into(),
                State::BackingOff => match s.retry_at {
                    Some(t) if t > now => format!("disconnected; retrying in {}s", t - now),
                    _ => "disconnected; retrying now".into(),
                },
                State::Stopped => "stopped".into(),
            };
            link.push_str(&format!("running (pid {}), {what}\n", s.pid));
            if let Some(e) = &s.last_error {
                link.push_str(&format!("  last error   {e}\n"));
            }
        }
    }
    format!("Paired:\n{out}Agent: {link}")
}

/// An absolute time with how long ago it was: `2024-05-01T10:00:00Z (3m ago)`.
fn when(t: u64, now: u64) -> String {
    let ago = now.saturating_sub(t);
    let ago = match ago {
        0..=59 => format!("{ago}s"),
        60..=3599 => format!("{}m", ago / 60),
        3600..=86399 => format!("{}h{}m", ago / 3600, ago % 3600 / 60),
        _ => format!("{}d", ago / 86400),
    };
    format!("{} ({ago} ago)", rfc3339(t))
}

/// Formats Unix seconds as RFC 3339 UTC (no date crate needed for this).
pub fn rfc3339(t: u64) -> String {
    let secs = t % 86400;
    let (year, month, day) = crate::meter::civil((t / 86400) as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ct_protocol::Fingerprint;

    fn pairing() -> Pairing {
        Pairing {
            relays: vec!["relay.example:7443".into(), "10.0.0.1:7443".into()],
            relay_fingerprint: Fingerprint::of_bytes(&[1; 32]),
            owner: "1234".into(),
            owner_name: Some("alice".into()),
            agent_name: "laptop".into(),
            agent_fingerprint: Fingerprint::of_bytes(&[2; 32]),
            paired_at: 1_700_000_000,
        }
    }

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn not_paired() {
        let tmp = tempfile::tempdir().unwrap();
        let report = gather(&tmp.path().join("missing")).unwrap();
        assert!(!report.paired && !report.running);
        assert!(
            !tmp.path().join("missing").exists(),
            "status must not create the directory"
        );
        let text = render(&report, 0);
        assert!(text.starts_with("Not paired"), "{text}");
        assert!(text.contains("ct-agent pair <token>"), "{text}");
    }

    #[test]
    fn paired_but_not_running() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ConfigDir::open(tmp.path()).unwrap();
        dir.store_pairing(&pairing()).unwrap();
        // A status file left by a process that no longer exists.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let connected = LinkStatus::Connected {
            transport: Transport::Quic,
            relay_addr: "relay.example:7443".into(),
            since: SystemTime::now(),
        };
        StatusFile::new(dead, &connected, None).store(&dir).unwrap();

        let report = gather(tmp.path()).unwrap();
        assert!(report.paired && !report.running);
        let text = render(&report, 1_700_000_060);
        for want in [
            "relay.example:7443, 10.0.0.1:7443",
            &Fingerprint::of_bytes(&[1; 32]).to_string(),
            "alice (Discord id 1234)",
            "laptop",
            &Fingerprint::of_bytes(&[2; 32]).to_string(),
            "2023-11-14T22:13:20Z (1m ago)",
            "not running; start it with `ct-agent run`",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }

    #[test]
    fn paired_and_connected() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ConfigDir::open(tmp.path()).unwrap();
        dir.store_pairing(&pairing()).unwrap();
        let since = UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let connected = LinkStatus::Connected {
            transport: Transport::WebSocket,
            relay_addr: "relay.example:7443".into(),
            since,
        };
        let file = StatusFile::new(
            std::process::id(),
            &connected,
            Some("QUIC timed out".into()),
        );
        file.store(&dir).unwrap();

        let report = gather(tmp.path()).unwrap();
        assert!(report.running);
        assert_eq!(report.status.as_ref(), Some(&file));
        let text = render(&report, 1_700_000_000 + 7200);
        assert!(
            text.contains(&format!(
                "running (pid {}), connected over websocket to relay.example:7443 since 2023-11-14T22:13:20Z (2h0m ago)",
                std::process::id()
            )),
            "{text}"
        );
        assert!(text.contains("last error   QUIC timed out"), "{text}");

        let json: serde_json::Value = serde_json::to_value(&report).unwrap();
        assert_eq!(json["running"], true);
        assert_eq!(json["status"]["state"], "connected");
        assert_eq!(json["status"]["transport"], "web_socket");
        assert_eq!(json["pairing"]["owner"], "1234");
    }

    #[test]
    fn a_stopped_agent_is_not_running_even_if_the_pid_is_alive() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ConfigDir::open(tmp.path()).unwrap();
        dir.store_pairing(&pairing()).unwrap();
        StatusFile::new(
            std::process::id(),
            &LinkStatus::Stopped { error: None },
            None,
        )
        .store(&dir)
        .unwrap();
        assert!(!gather(tmp.path()).unwrap().running);
    }
}
