//! Running Claude Code inside a bubblewrap sandbox (Linux): an allow-list of what a task can see and reach.
//!
//! The sandbox starts from nothing and binds in only what a task needs ([`Plan::command`]):
//!
//! - the system folders (`/usr`, `/etc`, `/opt`, and `/bin`, `/lib`... or their usr-merge symlinks), read-only;
//!   nothing else of the host: no `/home`, `/root`, `/run` (so no `/run/user/$UID` with the D-Bus session bus,
//!   ssh-agent, gpg-agent or X11; no docker socket), no `/mnt` (no Windows drives under WSL), no `/var`, no `/sys`;
//! - an empty, private `/tmp` and an empty home folder (a tmpfs at the owner's `$HOME` path, so paths read the
//!   same), holding only Claude Code's config folder ([`ClaudeConfig`]) and, read-only, the folder Claude Code is
//!   installed in (wherever that is, even under `/tmp` or the owner's home);
//! - the project folder, writable, bound from a descriptor opened without following symlinks
//!   ([`ProjectDir`]), so swapping the folder for a symlink after the check cannot widen what is bound;
//! - its own session (`--new-session`: no TIOCSTI into the agent's terminal), and its own PID, IPC and UTS
//!   namespaces; no capabilities, even when the agent runs as root; the sandbox dies with the agent.
//!
//! Its environment is an explicit allow-list ([`env::sandbox_env`]): no token or socket address of the owner's
//! gets in. A grantee's sandbox has no network either ([`Network`]): the agent binary runs inside as a
//! forwarder ([`forward`]) whose only way out is the agent's metering proxy, so a task reaches neither the
//! internet nor anything listening on the owner's loopback, unless the owner opened the network
//! (`ct-agent sandbox network open`).
//!
//! Grantees' tasks are sandboxed by default and the owner's optionally ([`SandboxSettings`]). Where
//! bubblewrap is missing or cannot create namespaces, a task that should be sandboxed is refused with a
//! message saying how to install it, unless the owner opted out for grantees.

mod config;
pub mod env;
pub mod forward;
mod project;

use std::ffi::OsString;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

pub use config::{grantee_config_dir, ClaudeConfig, GRANTEES_DIR};
pub use project::{ProjectDir, ProjectError, Protected, RUNS_AS_OWNER};

/// System folders bound read-only (or recreated as the symlinks they are). Everything a task may run lives
/// here; nothing here belongs to one user.
const SYSTEM_DIRS: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt", "/nix",
];

/// The system folder, bound read-only into every sandbox, that holds `path` (canonical), if any: a pool's
/// workspaces or an agent's config there would be visible to every task.
pub fn seen_by_every_sandbox(path: &Path) -> Option<&'static str> {
    SYSTEM_DIRS.iter().copied().find(|d| path.starts_with(d))
}

/// Who runs in the sandbox, as the owner set it (`ct-agent sandbox`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxSettings {
    /// Sandbox the owner's own tasks too (off by default: they are the owner's own Claude Code).
    #[serde(default)]
    pub owner: bool,
    /// Run grantees' tasks without a sandbox where bubblewrap is missing (off: they are refused).
    #[serde(default)]
    pub unsandboxed_grantees: bool,
    /// Let the owner's own tasks use `bypassPermissions` (off: refused whatever the relay sends). Set only on
    /// this machine (`ct-agent sandbox bypass on`), so a relay cannot turn approvals off by itself.
    #[serde(default)]
    pub bypass_permissions: bool,
    /// Give every grantee's sandbox the host's network (`ct-agent sandbox network open`); off: they reach only
    /// the API, through the agent's proxy.
    #[serde(default)]
    pub open_network: bool,
    /// Grantees (Discord ids) whose sandboxes get the host's network (`ct-agent sandbox network open ID`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub open_network_for: Vec<String>,
}

impl SandboxSettings {
    /// Whether grantee `user`'s sandbox keeps the host's network.
    pub fn network_open_for(&self, user: &str) -> bool {
        self.open_network || self.open_network_for.iter().any(|u| u == user)
    }
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
    // The same namespaces a task gets, so a kernel that refuses one of them is found here, not mid-task.
    let out = std::process::Command::new(&path)
        .args([
            "--ro-bind",
            "/",
            "/",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--new-session",
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
#[derive(Debug)]
pub struct Plan<'a> {
    /// Writable; also the working directory. Bound from its descriptor, which the child must inherit.
    pub project: &'a ProjectDir,
    /// Entries of the project bound read-only over it (a grantee's task: [`ProjectDir::protected`]), from
    /// descriptors the child must inherit too.
    pub protected: &'a [Protected],
    /// `$HOME` inside the sandbox: an empty tmpfs at this path.
    pub home: PathBuf,
    /// The folder holding the Claude Code executable (resolved), bound read-only at the same path.
    pub claude_install: Option<PathBuf>,
    /// Which Claude Code config the task uses.
    pub config: &'a ClaudeConfig,
    /// `Some`: no network but the way to the API proxy.
    pub network: Option<Network>,
}

/// A sandbox without a network: its own empty namespace, the API proxy's socket bound in, and the agent binary
/// (read-only) run first as the forwarder between the two.
#[derive(Debug, Clone)]
pub struct Network {
    /// The `ct-agent` executable.
    pub forwarder: PathBuf,
    /// The proxy's unix socket for this session (host path).
    pub socket: PathBuf,
}

impl Plan<'_> {
    /// The `bwrap ... --` prefix for this plan. Later mounts go over earlier ones, so the order is: system,
    /// `/dev`, `/proc`, `/tmp`, the empty home, then what is bound into them.
    pub fn command(&self, bwrap: &Bwrap) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![bwrap.path.clone().into()];
        let mut push = |items: &[&std::ffi::OsStr]| {
            args.extend(items.iter().map(|s| s.to_os_string()));
        };
        push(&[
            "--die-with-parent".as_ref(),
            "--new-session".as_ref(),
            "--unshare-pid".as_ref(),
            "--unshare-ipc".as_ref(),
            "--unshare-uts".as_ref(),
            "--unshare-cgroup-try".as_ref(),
            // An agent run as root (a pool worker in a container, often) would otherwise hand the task
            // every capability: CAP_MKNOD and CAP_SYS_ADMIN are enough to mount the host's disk and read
            // everything, another pool user's workspace included; without CAP_SYS_RESOURCE the task's
            // rlimits hold for root too. Unprivileged, it drops what the user namespace would grant.
            "--cap-drop".as_ref(),
            "ALL".as_ref(),
        ]);
        for dir in SYSTEM_DIRS {
            let path = Path::new(dir);
            match std::fs::symlink_metadata(path) {
                Ok(m) if m.file_type().is_symlink() => {
                    if let Ok(target) = std::fs::read_link(path) {
                        push(&["--symlink".as_ref(), target.as_os_str(), path.as_os_str()]);
                    }
                }
                Ok(m) if m.is_dir() => {
                    push(&["--ro-bind".as_ref(), path.as_os_str(), path.as_os_str()])
                }
                _ => {}
            }
        }
        // systemd-resolved (and others) keep resolv.conf under /run, which is not bound: bind just that file.
        if let Ok(resolv) = std::fs::canonicalize("/etc/resolv.conf") {
            if !resolv.starts_with("/etc") {
                push(&["--ro-bind".as_ref(), resolv.as_os_str(), resolv.as_os_str()]);
            }
        }
        push(&[
            "--dev".as_ref(),
            "/dev".as_ref(),
            "--proc".as_ref(),
            "/proc".as_ref(),
            "--tmpfs".as_ref(),
            "/tmp".as_ref(),
            "--tmpfs".as_ref(),
            self.home.as_os_str(),
        ]);
        if let Some(dir) = &self.claude_install {
            push(&["--ro-bind".as_ref(), dir.as_os_str(), dir.as_os_str()]);
        }
        for (from, to) in self.config.binds(&self.home) {
            push(&["--bind".as_ref(), from.as_os_str(), to.as_os_str()]);
        }
        if let Some(net) = &self.network {
            push(&[
                "--unshare-net".as_ref(),
                "--ro-bind".as_ref(),
                net.forwarder.as_os_str(),
                net.forwarder.as_os_str(),
                "--bind".as_ref(),
                net.socket.as_os_str(),
                forward::SOCKET.as_ref(),
            ]);
        }
        let fd = OsString::from(self.project.fd().as_raw_fd().to_string());
        let project = self.project.path().as_os_str();
        push(&["--bind-fd".as_ref(), fd.as_os_str(), project]);
        for entry in self.protected {
            let fd = OsString::from(entry.fd().to_string());
            push(&[
                "--ro-bind-fd".as_ref(),
                fd.as_os_str(),
                entry.path.as_os_str(),
            ]);
        }
        push(&["--chdir".as_ref(), project, "--".as_ref()]);
        if let Some(net) = &self.network {
            let port = OsString::from(forward::PORT.to_string());
            push(&[
                net.forwarder.as_os_str(),
                "sandbox-forward".as_ref(),
                "--port".as_ref(),
                port.as_os_str(),
                "--socket".as_ref(),
                forward::SOCKET.as_ref(),
                "--".as_ref(),
            ]);
        }
        args
    }
}

/// The Claude Code executable as the sandbox must reach it: symlinks resolved (a `node_modules/.bin/claude` or
/// `~/.local/bin/claude` link points into another folder), and the folder that holds it.
pub fn claude_install(bin: &Path) -> std::io::Result<(PathBuf, PathBuf)> {
    let real = std::fs::canonicalize(bin)?;
    let dir = real
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    Ok((real, dir))
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
    fn the_plan_binds_only_the_system_the_home_and_the_project() {
        let scratch = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(scratch.path()).unwrap();
        let project = root.join("src/app");
        std::fs::create_dir_all(&project).unwrap();
        let own = root.join("agent/grantees/200/claude");
        std::fs::create_dir_all(&own).unwrap();
        let dir = ProjectDir::open(&project).unwrap();
        let config = ClaudeConfig::Own(own.clone());
        let plan = Plan {
            project: &dir,
            protected: &[],
            home: "/home/owner".into(),
            claude_install: Some("/opt/claude/bin".into()),
            config: &config,
            network: None,
        };
        let bwrap = Bwrap {
            path: "/usr/bin/bwrap".into(),
        };
        let args = strings(&plan.command(&bwrap));
        let joined = args.join(" ");
        assert!(joined.starts_with(
            "/usr/bin/bwrap --die-with-parent --new-session --unshare-pid --unshare-ipc --unshare-uts"
        ));
        for absent in [
            "--ro-bind / /",
            "/run",
            "/home/owner/.claude.json",
            "/mnt",
            "/var",
        ] {
            assert!(!joined.contains(absent), "{absent} in {joined}");
        }
        assert!(joined.contains("--ro-bind /usr /usr"), "{joined}");
        assert!(
            joined.contains("--tmpfs /tmp --tmpfs /home/owner"),
            "{joined}"
        );
        assert!(
            joined.contains("--ro-bind /opt/claude/bin /opt/claude/bin"),
            "{joined}"
        );
        assert!(
            joined.contains(&format!("--bind {} /home/owner/.claude", own.display())),
            "{joined}"
        );
        let fd = dir.fd().as_raw_fd();
        assert!(
            joined.ends_with(&format!(
                "--bind-fd {fd} {p} --chdir {p} --",
                p = project.display()
            )),
            "{joined}"
        );
        // The home is emptied before anything is bound into it.
        let home = args.iter().position(|a| a == "/home/owner").unwrap();
        let config_bind = args
            .iter()
            .position(|a| a == "/home/owner/.claude")
            .unwrap();
        assert!(home < config_bind);
    }

    #[test]
    fn without_a_network_the_forwarder_runs_first_with_only_the_proxy_socket() {
        let scratch = tempfile::tempdir().unwrap();
        let project = std::fs::canonicalize(scratch.path()).unwrap();
        let dir = ProjectDir::open(&project).unwrap();
        let config = ClaudeConfig::Own(project.join("cfg"));
        let plan = Plan {
            project: &dir,
            protected: &[],
            home: "/home/owner".into(),
            claude_install: None,
            config: &config,
            network: Some(Network {
                forwarder: "/home/owner/.cargo/bin/ct-agent".into(),
                socket: "/home/owner/.config/codetogether/run/ab.sock".into(),
            }),
        };
        let bwrap = Bwrap {
            path: "/usr/bin/bwrap".into(),
        };
        let joined = strings(&plan.command(&bwrap)).join(" ");
        assert!(joined.contains("--unshare-net"), "{joined}");
        assert!(
            joined.contains(&format!(
                "--bind /home/owner/.config/codetogether/run/ab.sock {}",
                forward::SOCKET
            )),
            "{joined}"
        );
        assert!(
            joined.ends_with(&format!(
                "-- /home/owner/.cargo/bin/ct-agent sandbox-forward --port {} --socket {} --",
                forward::PORT,
                forward::SOCKET
            )),
            "{joined}"
        );
        // The forwarder is bound after the home is emptied, so one installed under the home is reachable.
        let home = joined.find("--tmpfs /home/owner").unwrap();
        let fwd = joined
            .find("--ro-bind /home/owner/.cargo/bin/ct-agent")
            .unwrap();
        assert!(home < fwd, "{joined}");
    }

    #[test]
    fn the_claude_install_is_found_through_symlinks() {
        let scratch = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(scratch.path()).unwrap();
        let pkg = root.join("node_modules/pkg/bin");
        std::fs::create_dir_all(&pkg).unwrap();
        std::fs::write(pkg.join("claude.exe"), "").unwrap();
        std::fs::create_dir_all(root.join("node_modules/.bin")).unwrap();
        let link = root.join("node_modules/.bin/claude");
        std::os::unix::fs::symlink("../pkg/bin/claude.exe", &link).unwrap();
        assert_eq!(
            claude_install(&link).unwrap(),
            (pkg.join("claude.exe"), pkg.clone())
        );
    }
}
