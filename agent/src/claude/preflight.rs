//! Before a task spawns anything: is Claude Code installed, and new enough? (Whether it is logged in is read
//! from the first turn's events instead; see [`super::Session`].)
//!
//! `claude --version` takes about 0.14 s and makes no network call, so it runs once per binary (cached by
//! path, size and modification time). `claude auth status` takes about 0.5 s and probes the API base URL, so
//! it is not run per task: a logged-out CLI says so within its first turn, at no extra cost.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use super::TaskError;

/// The oldest CLI the runner accepts: the version whose stream-json and control protocol were observed
/// (testkit/CLAUDE-NOTES.md): `can_use_tool` with required `updatedInput`, `control_cancel_request`,
/// `system/init` per turn, `--max-budget-usd`.
pub const MIN_VERSION: Version = Version(2, 1, 197);

/// The newest CLI the runner's contract tests ran against (testkit/claude pins it). Newer ones are expected to
/// work (unknown events and fields are skipped), but `ct-agent doctor` says they are untested.
pub const NEWEST_TESTED: Version = Version(2, 1, 332);

/// How an installed CLI's version compares with the range this agent was tested on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    /// Older than [`MIN_VERSION`]: tasks are refused.
    TooOld,
    /// From [`MIN_VERSION`] to [`NEWEST_TESTED`].
    Tested,
    /// Newer than [`NEWEST_TESTED`]: runs, but nobody has tested this pair yet.
    Newer,
}

impl Version {
    /// Where this version falls in the tested range.
    pub fn support(self) -> Support {
        if self < MIN_VERSION {
            Support::TooOld
        } else if self > NEWEST_TESTED {
            Support::Newer
        } else {
            Support::Tested
        }
    }
}

/// How long `claude --version` may take on a loaded machine before it counts as broken.
const VERSION_TIMEOUT: Duration = Duration::from_secs(30);

/// A `major.minor.patch` CLI version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(pub u32, pub u32, pub u32);

impl Version {
    /// Parses `2.1.197 (Claude Code)` or `2.1.197`; pre-release suffixes (`-beta.1`) are ignored.
    pub fn parse(text: &str) -> Option<Self> {
        let word = text.split_whitespace().next()?;
        let mut parts = word.split('.').map(|p| {
            p.split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|d| d.parse::<u32>().ok())
        });
        Some(Self(parts.next()??, parts.next()??, parts.next()??))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// Where `claude` is: `explicit` if given (it must exist), else the first `claude` on `PATH`, else the
/// places the installers put it (`~/.local/bin`, `~/.claude/local`, `/usr/local/bin`, `/opt/homebrew/bin`):
/// a service's `PATH` is often shorter than the login shell's.
pub fn find_claude(
    explicit: Option<&Path>,
    path_env: Option<OsString>,
    home: Option<&Path>,
) -> Result<PathBuf, TaskError> {
    if let Some(bin) = explicit {
        return if bin.is_file() {
            Ok(bin.to_path_buf())
        } else {
            Err(TaskError::NotInstalled {
                looked_in: bin.display().to_string(),
            })
        };
    }
    let mut dirs: Vec<PathBuf> = path_env
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = home {
        dirs.push(home.join(".local/bin"));
        dirs.push(home.join(".claude/local"));
    }
    dirs.push("/usr/local/bin".into());
    dirs.push("/opt/homebrew/bin".into());
    find_in(&dirs)
}

/// The first executable `claude` in `dirs`.
fn find_in(dirs: &[PathBuf]) -> Result<PathBuf, TaskError> {
    for dir in dirs {
        let bin = dir.join("claude");
        if is_executable(&bin) {
            return Ok(bin);
        }
    }
    Err(TaskError::NotInstalled {
        looked_in: "PATH, ~/.local/bin, ~/.claude/local, /usr/local/bin".into(),
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

type CacheKey = (PathBuf, u64, Option<SystemTime>);

fn cache() -> &'static Mutex<HashMap<CacheKey, Version>> {
    static CACHE: OnceLock<Mutex<HashMap<CacheKey, Version>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// Runs `bin --version` (once per binary file) and checks it against `minimum`.
pub async fn check_version(bin: &Path, minimum: Version) -> Result<Version, TaskError> {
    let meta = std::fs::metadata(bin).map_err(|_| TaskError::NotInstalled {
        looked_in: bin.display().to_string(),
    })?;
    let key: CacheKey = (bin.to_path_buf(), meta.len(), meta.modified().ok());
    let cached = cache().lock().ok().and_then(|c| c.get(&key).copied());
    let version = match cached {
        Some(v) => v,
        None => {
            let v = run_version(bin).await?;
            if let Ok(mut c) = cache().lock() {
                c.insert(key, v);
            }
            v
        }
    };
    if version < minimum {
        return Err(TaskError::TooOld {
            found: version.to_string(),
            minimum: minimum.to_string(),
        });
    }
    Ok(version)
}

async fn run_version(bin: &Path) -> Result<Version, TaskError> {
    let broken = |detail: String| TaskError::Broken {
        bin: bin.display().to_string(),
        detail,
    };
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg("--version")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(VERSION_TIMEOUT, cmd.output())
        .await
        .map_err(|_| {
            broken(format!(
                "`claude --version` did not answer within {VERSION_TIMEOUT:?}"
            ))
        })?
        .map_err(|e| broken(format!("cannot run it: {e}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    Version::parse(&stdout).ok_or_else(|| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        broken(format!(
            "`claude --version` printed {:?} ({}){}",
            stdout.trim(),
            out.status,
            if stderr.trim().is_empty() {
                String::new()
            } else {
                format!(", stderr: {}", super::events::cut(stderr.trim(), 500))
            }
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_and_order() {
        assert_eq!(
            Version::parse("2.1.197 (Claude Code)\n"),
            Some(Version(2, 1, 197))
        );
        assert_eq!(Version::parse("2.2.0-beta.1"), Some(Version(2, 2, 0)));
        assert_eq!(Version::parse("claude"), None);
        assert!(Version(2, 1, 196) < MIN_VERSION);
        assert!(Version(2, 10, 0) > MIN_VERSION);
        assert!(MIN_VERSION <= NEWEST_TESTED);
        assert_eq!(Version(2, 1, 196).support(), Support::TooOld);
        assert_eq!(MIN_VERSION.support(), Support::Tested);
        assert_eq!(NEWEST_TESTED.support(), Support::Tested);
        assert_eq!(Version(2, 2, 0).support(), Support::Newer);
    }

    #[test]
    fn finds_claude_on_path_or_says_how_to_install() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        // (Not find_claude: this machine may have a real claude in /usr/local/bin.)
        let err = find_in(&[tmp.path().to_path_buf()]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("Claude Code is not installed on this machine: install it with `npm install -g @anthropic-ai/claude-code` (needs Node.js 18+)"),
            "{msg}"
        );
        let bin = tmp.path().join("claude");
        std::fs::write(&bin, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            find_claude(None, Some(tmp.path().into()), None).unwrap(),
            bin
        );
    }
}
