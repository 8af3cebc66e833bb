//! The pinned Claude Code CLI: where its binary is, and the environment for a hermetic, offline run of it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use tempfile::TempDir;

/// The newest CLI the project is tested with: what testkit/claude/package-lock.json pins.
pub const PINNED_VERSION: &str = "2.1.332";

/// The oldest CLI the agent supports (`ct_agent::claude::MIN_VERSION`): what testkit/claude/min pins.
pub const MIN_PINNED_VERSION: &str = "2.1.197";

/// One of the two pinned Claude Code CLIs that `testkit/claude/install.sh` installs. The runner's contract
/// tests run against both, so that the range the agent claims to support is tested at both of its ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cli {
    /// The newest pin ([`PINNED_VERSION`]), in `testkit/claude/`.
    Newest,
    /// The oldest supported version ([`MIN_PINNED_VERSION`]), in `testkit/claude/min/`.
    Minimum,
}

impl Cli {
    /// The version `claude --version` prints for this pin.
    pub fn version(self) -> &'static str {
        match self {
            Cli::Newest => PINNED_VERSION,
            Cli::Minimum => MIN_PINNED_VERSION,
        }
    }

    /// Path of this pin's `claude` binary.
    ///
    /// # Panics
    /// If it is not installed, with a message telling the developer to run testkit/claude/install.sh.
    pub fn bin(self) -> PathBuf {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("claude");
        let dir = match self {
            Cli::Newest => root,
            Cli::Minimum => root.join("min"),
        };
        let bin = dir.join("node_modules/.bin/claude");
        assert!(
            bin.exists(),
            "the pinned Claude Code CLI {} is missing at {}: run `bash {}/claude/install.sh` first",
            self.version(),
            bin.display(),
            env!("CARGO_MANIFEST_DIR"),
        );
        bin
    }
}

/// Path of the newest pinned `claude` binary ([`Cli::Newest`]).
pub fn claude_bin() -> PathBuf {
    Cli::Newest.bin()
}

/// A throwaway HOME and config dir plus the variables that point the CLI at a fake API and keep it quiet.
///
/// The process environment is cleared (only `PATH` and `LANG` are kept), so nothing of the developer's own
/// Claude login, settings or `ANTHROPIC_*` variables leaks into a test.
#[derive(Debug)]
pub struct ClaudeEnv {
    dir: TempDir,
    vars: Vec<(String, String)>,
    cli: Cli,
}

impl ClaudeEnv {
    /// Logged in with `ANTHROPIC_API_KEY=test-key` against `base_url`.
    pub fn new(base_url: &str) -> anyhow::Result<Self> {
        Self::build(base_url, Some("test-key"))
    }

    /// No credentials at all: no API key and an empty config dir.
    pub fn logged_out(base_url: &str) -> anyhow::Result<Self> {
        Self::build(base_url, None)
    }

    fn build(base_url: &str, api_key: Option<&str>) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("ct-claude-home-")
            .tempdir()
            .context("creating a temp HOME for claude")?;
        let config = dir.path().join(".claude");
        std::fs::create_dir_all(&config).context("creating CLAUDE_CONFIG_DIR")?;
        let mut vars: Vec<(String, String)> = vec![
            ("HOME".into(), dir.path().display().to_string()),
            ("CLAUDE_CONFIG_DIR".into(), config.display().to_string()),
            ("ANTHROPIC_BASE_URL".into(), base_url.to_owned()),
            ("DISABLE_AUTOUPDATER".into(), "1".into()),
            (
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC".into(),
                "1".into(),
            ),
            ("DISABLE_TELEMETRY".into(), "1".into()),
            // Only `--permission-mode bypassPermissions` checks for root, and refuses without this; the other
            // modes run as root without it (see CLAUDE-NOTES.md). Tests run as root in CI, so set it always.
            ("IS_SANDBOX".into(), "1".into()),
        ];
        if let Some(key) = api_key {
            vars.push(("ANTHROPIC_API_KEY".into(), key.to_owned()));
        }
        Ok(Self {
            dir,
            vars,
            cli: Cli::Newest,
        })
    }

    /// Runs `cli` instead of the newest pin.
    pub fn with_cli(mut self, cli: Cli) -> Self {
        self.cli = cli;
        self
    }

    /// The CLI that [`ClaudeEnv::command`] runs.
    pub fn cli(&self) -> Cli {
        self.cli
    }

    /// The temp HOME.
    pub fn home(&self) -> &Path {
        self.dir.path()
    }

    /// `CLAUDE_CONFIG_DIR` (`$HOME/.claude`): sessions live under `projects/` here.
    pub fn config_dir(&self) -> PathBuf {
        self.dir.path().join(".claude")
    }

    /// The variables set on top of the cleared environment (besides `PATH` and `LANG`).
    pub fn vars(&self) -> &[(String, String)] {
        &self.vars
    }

    /// Adds or replaces one variable for every command built afterwards.
    pub fn set_var(&mut self, key: &str, value: &str) {
        self.vars.retain(|(k, _)| k != key);
        self.vars.push((key.to_owned(), value.to_owned()));
    }

    /// Removes one variable (e.g. to see what the CLI does without a quieting variable).
    pub fn remove_var(&mut self, key: &str) {
        self.vars.retain(|(k, _)| k != key);
    }

    /// A `claude` command in `cwd` with the hermetic environment; stdin is null and the child is killed on drop.
    pub fn command(&self, cwd: &Path) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(self.cli.bin());
        cmd.env_clear();
        for key in ["PATH", "LANG"] {
            if let Some(v) = std::env::var_os(key) {
                cmd.env(key, v);
            }
        }
        cmd.envs(
            self.vars
                .iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v))),
        )
        .current_dir(cwd)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
        cmd
    }
}
