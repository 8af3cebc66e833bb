//! Which Claude Code configuration a sandboxed task uses: the owner's own, or one kept by the agent per grantee.
//!
//! A grantee's task never sees the owner's `~/.claude` or `~/.claude.json`: they hold the owner's login, every
//! session transcript, and settings (hooks, MCP servers) that the owner's next unsandboxed Claude Code would
//! run. Each grantee gets a folder of their own under the agent's config directory instead
//! (`grantees/<discord id>/claude`, `0700`), bound as the sandbox's `~/.claude`: their sessions resume from
//! there, and whatever a task writes into it only ever runs inside that grantee's next sandbox.

use std::io;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};

/// The folder under the agent's config directory that holds the grantees' Claude Code configs.
pub const GRANTEES_DIR: &str = "grantees";

/// Where a sandboxed task's Claude Code config comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaudeConfig {
    /// A grantee's own folder (host path), bound as `$HOME/.claude` with `CLAUDE_CONFIG_DIR` pointing at it.
    Own(PathBuf),
    /// The owner's own task in the sandbox: their `CLAUDE_CONFIG_DIR` if set, else `~/.claude` and
    /// `~/.claude.json` under `home`, bound writable where they are.
    Owner {
        config_dir: Option<PathBuf>,
        home: PathBuf,
    },
}

impl ClaudeConfig {
    /// `CLAUDE_CONFIG_DIR` inside a sandbox whose home is `home` (`None`: unset, `$HOME/.claude` applies).
    pub fn dir_inside(&self, home: &Path) -> Option<PathBuf> {
        match self {
            ClaudeConfig::Own(_) => Some(home.join(".claude")),
            ClaudeConfig::Owner { config_dir, .. } => config_dir.clone(),
        }
    }

    /// `(host path, sandbox path)` pairs to bind writable. Missing owner paths are skipped: bwrap would fail,
    /// and Claude Code creates what it needs inside the home.
    pub fn binds(&self, home: &Path) -> Vec<(PathBuf, PathBuf)> {
        match self {
            ClaudeConfig::Own(dir) => vec![(dir.clone(), home.join(".claude"))],
            ClaudeConfig::Owner {
                config_dir: Some(dir),
                ..
            } => vec![(dir.clone(), dir.clone())],
            ClaudeConfig::Owner {
                config_dir: None,
                home,
            } => [home.join(".claude"), home.join(".claude.json")]
                .into_iter()
                .filter(|p| p.exists())
                .map(|p| (p.clone(), p))
                .collect(),
        }
    }
}

/// The Claude Code config folder the agent keeps for grantee `user` (a Discord id), created `0700` if needed.
/// Anything but a Discord id is refused, so a requester id can never name a path.
pub fn grantee_config_dir(agent_config: &Path, user: &str) -> io::Result<PathBuf> {
    if user.is_empty() || user.len() > 20 || !user.bytes().all(|b| b.is_ascii_digit()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("`{user}` is not a Discord user id"),
        ));
    }
    let dir = agent_config.join(GRANTEES_DIR).join(user).join("claude");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn each_grantee_has_a_private_folder_named_by_id_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = grantee_config_dir(tmp.path(), "200").unwrap();
        assert_eq!(dir, tmp.path().join("grantees/200/claude"));
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        for bad in ["", "../100", "200/..", "a", "1".repeat(21).as_str()] {
            assert!(grantee_config_dir(tmp.path(), bad).is_err(), "{bad:?}");
        }
    }
}
