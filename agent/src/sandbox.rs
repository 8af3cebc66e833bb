//! Running Claude Code inside a bubblewrap sandbox (Linux): what a task can see and change.
//!
//! Inside the sandbox the whole filesystem is read-only, except the project folder and Claude Code's own
//! config (`~/.claude`, `~/.claude.json`, or `CLAUDE_CONFIG_DIR`); `/tmp` is private and empty; credential
//! folders (`~/.ssh`, `~/.gnupg`, `~/.aws`, ...) and the agent's own config directory (its private key) are
//! replaced by empty ones; and the task has its own PID namespace, so killing the sandbox ends every process
//! the task started. The network stays: Claude Code needs the API.
//!
//! Grantees' tasks are sandboxed by default and the owner's optionally ([`SandboxSettings`]). Where
//! bubblewrap is missing or cannot create namespaces, a task that should be sandboxed is refused with a
//! message saying how to install it, unless the owner opted out for grantees.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

/// Credential and secret stores under `$HOME` that a sandboxed task must not read.
pub const HIDDEN_IN_HOME: &[&str] = &[
    ".ssh",
    ".gnupg",
    ".aws",
    ".azure",
    ".kube",
    ".docker",
    ".netrc",
    ".git-credentials",
    ".npmrc",
    ".pypirc",
    ".password-store",
    ".vault-token",
    ".terraform.d",
    ".config/gcloud",
    ".config/gh",
    ".config/hub",
    ".config/op",
    ".config/doctl",
    ".cargo/credentials",
    ".cargo/credentials.toml",
    ".local/share/keyrings",
    ".mozilla",
    ".config/google-chrome",
    ".config/chromium",
];

/// Who runs in the sandbox, as the owner set it (`ct-agent sandbox`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxSettings {
    /// Sandbox the owner's own tasks too (off by default: they are the owner's own Claude Code).
    #[serde(default)]
    pub owner: bool,
    /// Run grantees' tasks without a sandbox where bubblewrap is missing (off: they are refused).
    #[serde(default)]
    pub unsandboxed_grantees: bool,
}

/// A usable bubblewrap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bwrap {
    pub path: PathBuf,
}

/// Why a task that should be sandboxed cannot be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SandboxError {
    #[error(
        "this agent runs shared tasks only inside a bubblewrap sandbox, and bubblewrap is not installed on \
         that machine: install it there (`sudo apt install bubblewrap`, `sudo dnf install bubblewrap`), or, \
         to run shared tasks without a sandbox, its owner can run `ct-agent sandbox grantees unsandboxed`"
    )]
    MissingForGrantee,
    #[error(
        "the owner turned on the sandbox for their own tasks, but bubblewrap is not installed on that machine: \
         install it (`sudo apt install bubblewrap`) or run `ct-agent sandbox owner off`"
    )]
    MissingForOwner,
    #[error("bubblewrap at {path} cannot create a sandbox here ({detail}): on Ubuntu 24.04+ allow unprivileged user namespaces for it (an AppArmor profile for bwrap), or run `ct-agent doctor`")]
    Unusable { path: String, detail: String },
}

/// Finds bubblewrap on `PATH` and checks once per process that it can actually build a sandbox (containers
/// and hardened kernels often forbid user namespaces).
pub fn detect() -> Result<Bwrap, Option<SandboxError>> {
    static FOUND: OnceLock<Result<Bwrap, Option<SandboxError>>> = OnceLock::new();
    FOUND.get_or_init(probe).clone()
}

fn probe() -> Result<Bwrap, Option<SandboxError>> {
    if !cfg!(target_os = "linux") {
        return Err(None);
    }
    let path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("bwrap"))
        .find(|p| p.is_file())
        .ok_or(None)?;
    let out = std::process::Command::new(&path)
        .args([
            "--ro-bind",
            "/",
            "/",
            "--unshare-pid",
            "--die-with-parent",
            "true",
        ])
        .stdin(std::process::Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => Ok(Bwrap { path }),
        Ok(o) => Err(Some(SandboxError::Unusable {
            path: path.display().to_string(),
            detail: String::from_utf8_lossy(&o.stderr).trim().to_owned(),
        })),
        Err(e) => Err(Some(SandboxError::Unusable {
            path: path.display().to_string(),
            detail: e.to_string(),
        })),
    }
}

/// What one sandboxed session may see and change.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Writable; also the working directory.
    pub project: PathBuf,
    /// `$HOME` as Claude Code will see it (the credential folders under it are hidden).
    pub home: Option<PathBuf>,
    /// `CLAUDE_CONFIG_DIR`, when set for Claude Code.
    pub claude_config_dir: Option<PathBuf>,
    /// Hidden always: the agent's config directory holds its private key.
    pub agent_config: PathBuf,
    /// Executables the sandbox must still run (Claude Code itself). The sandbox sees the host's tree
    /// read-only, except a private `/tmp`: one installed under `/tmp` (a checkout there, `npx` caches) gets
    /// its folders bound back in, read-only, or bubblewrap could not even start it.
    pub programs: Vec<PathBuf>,
}

impl Plan {
    /// The `bwrap ... --` prefix for this plan. Only paths that exist are mounted over: bwrap cannot create
    /// mount points on a read-only tree, and a missing folder has nothing to hide.
    pub fn command(&self, bwrap: &Bwrap) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![bwrap.path.clone().into()];
        let mut push =
            |items: &[&std::ffi::OsStr]| args.extend(items.iter().map(|s| s.to_os_string()));
        push(&[
            "--ro-bind".as_ref(),
            "/".as_ref(),
            "/".as_ref(),
            "--dev".as_ref(),
            "/dev".as_ref(),
            "--proc".as_ref(),
            "/proc".as_ref(),
            "--tmpfs".as_ref(),
            "/tmp".as_ref(),
            "--unshare-pid".as_ref(),
            "--die-with-parent".as_ref(),
        ]);
        let mut hidden: Vec<PathBuf> = self
            .home
            .iter()
            .flat_map(|home| HIDDEN_IN_HOME.iter().map(move |rel| home.join(rel)))
            .collect();
        hidden.push(self.agent_config.clone());
        for path in hidden {
            if path.is_dir() {
                push(&["--tmpfs".as_ref(), path.as_os_str()]);
            } else if path.exists() {
                push(&["--ro-bind".as_ref(), "/dev/null".as_ref(), path.as_os_str()]);
            }
        }
        for dir in self.program_dirs() {
            push(&["--ro-bind".as_ref(), dir.as_os_str(), dir.as_os_str()]);
        }
        let mut writable = vec![self.project.clone()];
        match &self.claude_config_dir {
            Some(dir) => writable.push(dir.clone()),
            None => {
                if let Some(home) = &self.home {
                    writable.push(home.join(".claude"));
                    writable.push(home.join(".claude.json"));
                }
            }
        }
        for path in writable.iter().filter(|p| p.exists()) {
            push(&["--bind".as_ref(), path.as_os_str(), path.as_os_str()]);
        }
        push(&["--chdir".as_ref(), self.project.as_os_str(), "--".as_ref()]);
        args
    }
}

impl Plan {
    /// The folders of [`Plan::programs`] (as named, and after resolving links) that the private `/tmp` would
    /// hide.
    fn program_dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        for program in &self.programs {
            let resolved = std::fs::canonicalize(program).ok();
            for path in std::iter::once(program.clone()).chain(resolved) {
                let Some(dir) = path.parent() else { continue };
                if dir.starts_with("/tmp") && dir.is_dir() && !dirs.iter().any(|d| d == dir) {
                    dirs.push(dir.to_path_buf());
                }
            }
        }
        dirs
    }
}

/// `$HOME` and `CLAUDE_CONFIG_DIR` as Claude Code will see them: from the variables set for it, else the
/// agent's own (unless the environment is cleared).
pub fn claude_home(
    env: &[(OsString, OsString)],
    env_clear: bool,
) -> (Option<PathBuf>, Option<PathBuf>) {
    let get = |key: &str| {
        env.iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| PathBuf::from(v))
            .or_else(|| {
                (!env_clear)
                    .then(|| std::env::var_os(key).map(PathBuf::from))
                    .flatten()
            })
            .filter(|p| !p.as_os_str().is_empty())
    };
    (get("HOME"), get("CLAUDE_CONFIG_DIR"))
}

/// True when `path` lies inside one of the folders a sandbox hides under `home`.
pub fn is_hidden(path: &Path, home: &Path) -> bool {
    HIDDEN_IN_HOME
        .iter()
        .any(|rel| path.starts_with(home.join(rel)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn the_plan_hides_what_exists_and_binds_the_project_and_claude_config_writable() {
        let home = tempfile::tempdir().unwrap();
        let home = home.path();
        std::fs::create_dir_all(home.join(".ssh")).unwrap();
        std::fs::write(home.join(".netrc"), "machine x password y").unwrap();
        std::fs::create_dir_all(home.join(".claude")).unwrap();
        std::fs::create_dir_all(home.join("src/app")).unwrap();
        let agent_config = home.join(".config/codetogether");
        std::fs::create_dir_all(&agent_config).unwrap();
        // Claude Code installed under /tmp (this test's home is a temp dir): a link in `.bin` to the real file.
        let package = home.join("node_modules/claude-code/bin");
        std::fs::create_dir_all(&package).unwrap();
        std::fs::create_dir_all(home.join("node_modules/.bin")).unwrap();
        std::fs::write(package.join("claude.exe"), "").unwrap();
        let claude = home.join("node_modules/.bin/claude");
        std::os::unix::fs::symlink("../claude-code/bin/claude.exe", &claude).unwrap();
        let plan = Plan {
            project: home.join("src/app"),
            home: Some(home.to_path_buf()),
            claude_config_dir: None,
            agent_config: agent_config.clone(),
            programs: vec![claude],
        };
        let bwrap = Bwrap {
            path: "/usr/bin/bwrap".into(),
        };
        let args = strings(&plan.command(&bwrap));
        let joined = args.join(" ");
        let h = home.display();
        assert!(joined.starts_with(
            "/usr/bin/bwrap --ro-bind / / --dev /dev --proc /proc --tmpfs /tmp --unshare-pid"
        ));
        assert!(joined.contains(&format!("--tmpfs {h}/.ssh")), "{joined}");
        assert!(
            joined.contains(&format!("--ro-bind /dev/null {h}/.netrc")),
            "{joined}"
        );
        assert!(
            joined.contains(&format!("--tmpfs {}", agent_config.display())),
            "{joined}"
        );
        assert!(
            !joined.contains(".aws"),
            "missing folders are not mounted over: {joined}"
        );
        assert!(
            joined.contains(&format!("--bind {h}/src/app {h}/src/app")),
            "{joined}"
        );
        assert!(
            joined.contains(&format!("--bind {h}/.claude {h}/.claude")),
            "{joined}"
        );
        assert!(
            joined.ends_with(&format!("--chdir {h}/src/app --")),
            "{joined}"
        );
        if home.starts_with("/tmp") {
            let real = std::fs::canonicalize(&package).unwrap();
            for dir in [home.join("node_modules/.bin"), real] {
                let d = dir.display();
                assert!(joined.contains(&format!("--ro-bind {d} {d}")), "{joined}");
            }
        }
        // Writable binds come after the hiding mounts, so a project is never hidden by accident.
        let last_hide = args.iter().rposition(|a| a == "--tmpfs").unwrap();
        let first_bind = args.iter().position(|a| a == "--bind").unwrap();
        assert!(last_hide < first_bind);
    }

    #[test]
    fn claude_home_comes_from_the_variables_given_to_claude() {
        let env = vec![
            (OsString::from("HOME"), OsString::from("/home/a")),
            (OsString::from("CLAUDE_CONFIG_DIR"), OsString::from("/cfg")),
        ];
        assert_eq!(
            claude_home(&env, true),
            (Some("/home/a".into()), Some("/cfg".into()))
        );
        assert_eq!(claude_home(&[], true), (None, None));
        assert!(is_hidden(
            Path::new("/home/a/.ssh/id_ed25519"),
            Path::new("/home/a")
        ));
        assert!(!is_hidden(
            Path::new("/home/a/src/.ssh-notes"),
            Path::new("/home/a")
        ));
    }
}
