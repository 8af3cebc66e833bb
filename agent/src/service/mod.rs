//! `ct-agent service install|uninstall|status|logs`: the agent as a service that survives reboots and
//! log-outs, on Linux (systemd), macOS (launchd) and WSL (systemd inside WSL, or a Windows logon task).
//!
//! - [`render`]: the templates in `installers/` and the quoting each file format needs.
//! - [`plan`]: install and uninstall as a list of steps, printed by `--dry-run` or carried out.
//! - [`systemd`], [`launchd`], [`wsl`]: one file per service manager: its files, its commands, its status.
//!
//! Everything is decided from a [`Host`] (facts read from the system) and [`Options`] (the flags) into a
//! [`Context`], so the rendered files and plans are testable for every platform on any machine.

pub mod launchd;
pub mod plan;
pub mod render;
pub mod systemd;
pub mod wsl;

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

pub use plan::{Plan, Step};

/// The variable the service files set so the agent knows what supervises it (see [`permanent_exit_code`]).
pub const ENV_SUPERVISOR: &str = "CT_AGENT_SUPERVISOR";
/// The allowed project folders, comma-separated absolute paths.
pub const ENV_ALLOWED_DIRS: &str = "ALLOWED_PROJECT_DIRS";

/// The exit status for an error restarting cannot fix. Normally [`crate::EXIT_PERMANENT`] (78), which
/// systemd units and the WSL launcher are told not to restart on. launchd cannot be told that, so under
/// launchd (the plist sets `CT_AGENT_SUPERVISOR=launchd`) the agent exits 0 and `KeepAlive` with
/// `SuccessfulExit=false` leaves it stopped rather than retrying a refused key every few seconds forever.
pub fn permanent_exit_code() -> u8 {
    match std::env::var(ENV_SUPERVISOR) {
        Ok(s) if s == "launchd" => 0,
        _ => crate::EXIT_PERMANENT,
    }
}

/// Which service manager runs the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Manager {
    /// A systemd user unit (`~/.config/systemd/user/ct-agent.service`).
    SystemdUser,
    /// A systemd system unit (`/etc/systemd/system/ct-agent.service`) running as one user.
    SystemdSystem,
    /// A launchd LaunchAgent (`~/Library/LaunchAgents/dev.codetogether.agent.plist`).
    Launchd,
    /// A Windows logon task starting the agent inside a WSL distribution.
    WindowsTask,
}

impl fmt::Display for Manager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::SystemdUser => "systemd user unit",
            Self::SystemdSystem => "systemd system unit",
            Self::Launchd => "launchd LaunchAgent",
            Self::WindowsTask => "Windows logon task (WSL)",
        })
    }
}

/// The operating system family, as far as services are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Os {
    Linux,
    Macos,
    Wsl,
}

/// Facts about this machine, read once by [`Host::probe`] (tests build one by hand).
#[derive(Debug, Clone)]
pub struct Host {
    pub os: Os,
    /// `/proc/sys/kernel/osrelease` on Linux (how WSL is recognised).
    pub kernel_release: String,
    /// Whether systemd is the running init (`/run/systemd/system` exists).
    pub systemd_running: bool,
    /// `systemctl --version`'s number, when systemctl is installed.
    pub systemd_version: Option<u32>,
    /// The user running this command, their uid and home.
    pub user: String,
    pub uid: u32,
    pub home: PathBuf,
    /// This program.
    pub exe: PathBuf,
    pub cwd: PathBuf,
    /// The variables that matter: PATH, CLAUDE_CONFIG_DIR, ALLOWED_PROJECT_DIRS, WSL_DISTRO_NAME, SUDO_USER,
    /// XDG_CONFIG_HOME.
    pub env: BTreeMap<String, String>,
}

const HOST_VARS: &[&str] = &[
    "PATH",
    "CLAUDE_CONFIG_DIR",
    ENV_ALLOWED_DIRS,
    "WSL_DISTRO_NAME",
    "SUDO_USER",
    "XDG_CONFIG_HOME",
    "HOME",
];

impl Host {
    /// Reads this machine. `os` overrides the detected system (for `--dry-run --target`).
    pub fn probe(os: Option<Os>) -> io::Result<Self> {
        let kernel_release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string();
        let detected = if cfg!(target_os = "macos") {
            Os::Macos
        } else if wsl::is_wsl_kernel(&kernel_release) {
            Os::Wsl
        } else {
            Os::Linux
        };
        let env: BTreeMap<String, String> = HOST_VARS
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
            .collect();
        let user = plan::run_checked(&["id".into(), "-un".into()])?
            .trim()
            .to_string();
        let uid = plan::run_checked(&["id".into(), "-u".into()])?
            .trim()
            .parse()
            .map_err(|_| io::Error::other("`id -u` did not print a number"))?;
        let home = env
            .get("HOME")
            .filter(|h| !h.is_empty())
            .map(PathBuf::from)
            .or_else(|| lookup_user(&user).map(|(_, h)| h))
            .ok_or_else(|| io::Error::other("cannot find your home directory: set HOME"))?;
        let exe = std::env::current_exe()?;
        let exe = exe.canonicalize().unwrap_or(exe);
        Ok(Self {
            os: os.unwrap_or(detected),
            kernel_release,
            systemd_running: Path::new("/run/systemd/system").is_dir(),
            systemd_version: systemd::installed_version(),
            user,
            uid,
            home,
            exe,
            cwd: std::env::current_dir()?,
            env,
        })
    }

    fn var(&self, key: &str) -> Option<&str> {
        self.env
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

/// A user's uid and home directory from the user database (`getent passwd`, so LDAP users work too).
pub fn lookup_user(name: &str) -> Option<(u32, PathBuf)> {
    let line = plan::run_checked(&["getent".into(), "passwd".into(), name.into()]).ok()?;
    parse_passwd_line(line.lines().next()?)
}

/// `name:x:uid:gid:gecos:home:shell` → uid and home.
pub fn parse_passwd_line(line: &str) -> Option<(u32, PathBuf)> {
    let fields: Vec<&str> = line.split(':').collect();
    if fields.len() < 7 {
        return None;
    }
    Some((fields[2].parse().ok()?, PathBuf::from(fields[5])))
}

/// The flags of `service install` (and, for the scope, of the other subcommands).
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// A system unit instead of a user unit (Linux/WSL with systemd).
    pub system: bool,
    /// Which user a system unit runs as [default: `$SUDO_USER`, else the current user].
    pub run_as: Option<String>,
    /// `--config-dir` / `CT_AGENT_CONFIG_DIR` as given (resolved per target user).
    pub config_dir: Option<PathBuf>,
    /// `--allow-dir`, added to `ALLOWED_PROJECT_DIRS` from the environment.
    pub allow_dirs: Vec<PathBuf>,
    /// `--rw-path`: more paths the service may write (e.g. `~/.cargo`, `~/.npm`).
    pub rw_paths: Vec<PathBuf>,
    /// `--writable-home`: the whole home directory writable.
    pub writable_home: bool,
    /// `--windows-task`: on WSL, a Windows logon task even when systemd runs in the distribution.
    pub windows_task: bool,
}

/// Why a service command cannot go ahead. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Render(#[from] render::RenderError),
    #[error(transparent)]
    Step(#[from] plan::StepError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

/// Everything the service files are rendered from.
#[derive(Debug, Clone)]
pub struct Context {
    pub manager: Manager,
    /// The user the agent runs as, their uid and home.
    pub user: String,
    pub uid: u32,
    pub home: PathBuf,
    pub exe: PathBuf,
    pub config_dir: PathBuf,
    pub allowed: Vec<PathBuf>,
    pub rw_paths: Vec<PathBuf>,
    pub writable_home: bool,
    /// Claude Code's config directory, and whether it came from `CLAUDE_CONFIG_DIR` (then passed on).
    pub claude_config_dir: PathBuf,
    pub claude_config_env: bool,
    pub path_env: String,
    pub systemd_version: Option<u32>,
    /// The WSL distribution (WSL only).
    pub wsl_distro: Option<String>,
}

/// The PATH a service gets when the installing shell had none.
const FALLBACK_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

impl Context {
    /// Decides the service manager and every path from the host facts and the flags. Reads nothing else,
    /// except the user database for `--system --run-as` (through `lookup`).
    pub fn resolve(
        host: &Host,
        opts: &Options,
        lookup: &dyn Fn(&str) -> Option<(u32, PathBuf)>,
    ) -> Result<Self, ServiceError> {
        let manager = choose_manager(host, opts)?;
        let (user, uid, home) = if manager == Manager::SystemdSystem {
            let name = opts
                .run_as
                .clone()
                .or_else(|| host.var("SUDO_USER").map(str::to_string))
                .unwrap_or_else(|| host.user.clone());
            if name == host.user {
                (name, host.uid, host.home.clone())
            } else {
                let (uid, home) = lookup(&name).ok_or_else(|| {
                    ServiceError::Unsupported(format!(
                        "there is no user {name:?} on this machine: pass --run-as with the user the agent should run as"
                    ))
                })?;
                (name, uid, home)
            }
        } else {
            if opts.run_as.is_some() {
                return Err(ServiceError::Unsupported(
                    "--run-as only applies to a system unit (--system); a user service runs as you"
                        .into(),
                ));
            }
            (host.user.clone(), host.uid, host.home.clone())
        };
        let same_user = uid == host.uid;
        let config_dir = match &opts.config_dir {
            Some(dir) => absolute(&host.cwd, dir),
            // XDG_CONFIG_HOME belongs to the installing user; another user gets the default under their home.
            None => crate::config::resolve_from(
                None,
                None,
                same_user
                    .then(|| host.env.get("XDG_CONFIG_HOME").map(Into::into))
                    .flatten(),
                Some(home.clone().into_os_string()),
            )
            .unwrap_or_else(|| home.join(".config/codetogether")),
        };
        let (claude_config_dir, claude_config_env) =
            match host.var("CLAUDE_CONFIG_DIR").filter(|_| same_user) {
                Some(dir) => (absolute(&host.cwd, Path::new(dir)), true),
                None => (home.join(".claude"), false),
            };
        let mut allowed: Vec<PathBuf> = Vec::new();
        for dir in host
            .var(ENV_ALLOWED_DIRS)
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .chain(opts.allow_dirs.iter().cloned())
        {
            let dir = absolute(&host.cwd, &dir);
            let dir = dir.canonicalize().unwrap_or(dir);
            if !allowed.contains(&dir) {
                allowed.push(dir);
            }
        }
        let rw_paths = opts
            .rw_paths
            .iter()
            .map(|p| absolute(&host.cwd, p))
            .collect();
        Ok(Self {
            manager,
            user,
            uid,
            home,
            exe: host.exe.clone(),
            config_dir,
            allowed,
            rw_paths,
            writable_home: opts.writable_home,
            claude_config_dir,
            claude_config_env,
            path_env: host.var("PATH").unwrap_or(FALLBACK_PATH).to_string(),
            systemd_version: host.systemd_version,
            wsl_distro: host.var("WSL_DISTRO_NAME").map(str::to_string),
        })
    }

    /// The allowed folders as strings (for `ALLOWED_PROJECT_DIRS`).
    pub fn allowed_strings(&self) -> Vec<String> {
        self.allowed
            .iter()
            .map(|p| p.display().to_string())
            .collect()
    }
}

fn absolute(cwd: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        cwd.join(p)
    }
}

fn choose_manager(host: &Host, opts: &Options) -> Result<Manager, ServiceError> {
    match host.os {
        Os::Macos => {
            if opts.system || opts.windows_task {
                return Err(ServiceError::Unsupported(
                    "on macOS the agent runs as a LaunchAgent of your user: drop --system/--windows-task".into(),
                ));
            }
            Ok(Manager::Launchd)
        }
        Os::Wsl if opts.windows_task || !host.systemd_running => {
            if opts.system {
                return Err(ServiceError::Unsupported(
                    "systemd is not running in this WSL distribution, so there is no system unit to install. \
                     Either enable systemd (add `[boot]` `systemd=true` to /etc/wsl.conf, then `wsl.exe --shutdown` \
                     from Windows) or drop --system to use a Windows logon task"
                        .into(),
                ));
            }
            Ok(Manager::WindowsTask)
        }
        Os::Linux | Os::Wsl => {
            if opts.windows_task {
                return Err(ServiceError::Unsupported(
                    "--windows-task only applies inside WSL".into(),
                ));
            }
            Ok(if opts.system {
                Manager::SystemdSystem
            } else {
                Manager::SystemdUser
            })
        }
    }
}

/// The install plan for `ctx` (nothing is changed).
pub fn install_plan(ctx: &Context, host: &Host) -> Result<Plan, ServiceError> {
    match ctx.manager {
        Manager::SystemdUser | Manager::SystemdSystem => systemd::install_plan(ctx, host),
        Manager::Launchd => launchd::install_plan(ctx),
        Manager::WindowsTask => {
            // Planning for WSL from elsewhere (`--target wsl --dry-run`): there is no Windows to ask.
            let interop = if wsl::is_wsl_kernel(&host.kernel_release) {
                wsl::Interop::System
            } else {
                wsl::Interop::Fixed {
                    windows_user: "<WINDOWS-USER>".into(),
                    unc_prefix: format!(
                        "\\\\wsl.localhost\\{}",
                        ctx.wsl_distro.as_deref().unwrap_or("<distro>")
                    ),
                }
            };
            wsl::install_plan(ctx, &interop)
        }
    }
}

/// The uninstall plan for `ctx`: undoes what [`install_plan`] created.
pub fn uninstall_plan(ctx: &Context) -> Result<Plan, ServiceError> {
    match ctx.manager {
        Manager::SystemdUser | Manager::SystemdSystem => Ok(systemd::uninstall_plan(ctx)),
        Manager::Launchd => Ok(launchd::uninstall_plan(ctx)),
        Manager::WindowsTask => wsl::uninstall_plan(ctx),
    }
}

/// Advice added to a failed step of a plan for this manager.
pub fn advice(ctx: &Context, host: &Host) -> Option<String> {
    match ctx.manager {
        Manager::SystemdUser | Manager::SystemdSystem if !host.systemd_running => Some(
            "systemd is not running on this machine (no /run/systemd/system), so there is no service manager to \
             hand the agent to. Run `ct-agent run` under whatever supervises processes here (a container's \
             restart policy, supervisord, tmux), or use `--dry-run` to see the unit; \
             `ct-agent service uninstall` removes what was written so far."
                .into(),
        ),
        Manager::SystemdSystem if host.uid != 0 => Some(
            "a system unit needs root: run it again with sudo (the agent still runs as your user)".into(),
        ),
        Manager::SystemdUser => Some(
            "`systemctl --user` needs your user's systemd instance: log in normally (not `su`), or set \
             XDG_RUNTIME_DIR=/run/user/$(id -u)."
                .into(),
        ),
        Manager::WindowsTask => Some(wsl::INTEROP_ADVICE.into()),
        _ => None,
    }
}

/// What the service manager says about the agent's service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceStatus {
    pub manager: Manager,
    /// The unit, plist or task name.
    pub name: String,
    pub installed: bool,
    pub running: bool,
    /// The manager's own words (e.g. `active (running)`, `state = running`).
    pub detail: String,
    /// What to do, when something is off.
    pub advice: Option<String>,
}

impl ServiceStatus {
    pub fn render(&self) -> String {
        let mut out = format!(
            "{} {}: {}{}\n",
            self.manager,
            self.name,
            match (self.installed, self.running) {
                (false, _) => "not installed",
                (true, true) => "installed, running",
                (true, false) => "installed, not running",
            },
            if self.detail.is_empty() {
                String::new()
            } else {
                format!(" ({})", self.detail)
            }
        );
        if let Some(a) = &self.advice {
            out.push_str(&format!("  {a}\n"));
        }
        out
    }
}

/// Asks the service manager about the agent.
pub fn status(ctx: &Context) -> ServiceStatus {
    match ctx.manager {
        Manager::SystemdUser | Manager::SystemdSystem => systemd::status(ctx),
        Manager::Launchd => launchd::status(ctx),
        Manager::WindowsTask => wsl::status(ctx),
    }
}

/// The command that shows the agent's log (`-n lines`, `-f` to follow).
pub fn logs_command(ctx: &Context, lines: u32, follow: bool) -> Vec<String> {
    match ctx.manager {
        Manager::SystemdUser | Manager::SystemdSystem => systemd::logs_command(ctx, lines, follow),
        Manager::Launchd => tail(&launchd::log_file(ctx), lines, follow),
        Manager::WindowsTask => tail(&wsl::log_file(ctx), lines, follow),
    }
}

fn tail(file: &Path, lines: u32, follow: bool) -> Vec<String> {
    let mut argv = vec!["tail".to_string(), "-n".into(), lines.to_string()];
    if follow {
        argv.push("-F".into());
    }
    argv.push(file.display().to_string());
    argv
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn host(os: Os) -> Host {
        Host {
            os,
            kernel_release: "6.8.0".into(),
            systemd_running: true,
            systemd_version: Some(255),
            user: "alice".into(),
            uid: 1000,
            home: "/home/alice".into(),
            exe: "/home/alice/.cargo/bin/ct-agent".into(),
            cwd: "/home/alice".into(),
            env: [
                ("PATH", "/home/alice/.cargo/bin:/usr/bin:/bin"),
                (ENV_ALLOWED_DIRS, "/srv/proj-a, /srv/proj b"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        }
    }

    fn no_users(_: &str) -> Option<(u32, PathBuf)> {
        None
    }

    #[test]
    fn managers_per_platform() {
        let opts = Options::default();
        let pick = |h: &Host, o: &Options| Context::resolve(h, o, &no_users).map(|c| c.manager);
        assert_eq!(pick(&host(Os::Linux), &opts).unwrap(), Manager::SystemdUser);
        let system = Options {
            system: true,
            ..Default::default()
        };
        assert_eq!(
            pick(&host(Os::Linux), &system).unwrap(),
            Manager::SystemdSystem
        );
        assert_eq!(pick(&host(Os::Macos), &opts).unwrap(), Manager::Launchd);
        assert!(pick(&host(Os::Macos), &system).is_err());
        let mut wsl = host(Os::Wsl);
        assert_eq!(pick(&wsl, &opts).unwrap(), Manager::SystemdUser);
        let task = Options {
            windows_task: true,
            ..Default::default()
        };
        assert_eq!(pick(&wsl, &task).unwrap(), Manager::WindowsTask);
        wsl.systemd_running = false;
        assert_eq!(pick(&wsl, &opts).unwrap(), Manager::WindowsTask);
        let err = pick(&wsl, &system).unwrap_err().to_string();
        assert!(err.contains("systemd=true"), "{err}");
        assert!(pick(&host(Os::Linux), &task).is_err());
    }

    #[test]
    fn paths_come_from_env_and_flags() {
        let opts = Options {
            allow_dirs: vec!["rel/dir".into(), "/srv/proj-a".into()],
            ..Default::default()
        };
        let ctx = Context::resolve(&host(Os::Linux), &opts, &no_users).unwrap();
        assert_eq!(
            ctx.config_dir,
            PathBuf::from("/home/alice/.config/codetogether")
        );
        assert_eq!(ctx.claude_config_dir, PathBuf::from("/home/alice/.claude"));
        assert!(!ctx.claude_config_env);
        assert_eq!(
            ctx.allowed,
            vec![
                PathBuf::from("/srv/proj-a"),
                PathBuf::from("/srv/proj b"),
                PathBuf::from("/home/alice/rel/dir")
            ]
        );
    }

    #[test]
    fn a_system_unit_runs_as_the_sudo_user_with_their_home() {
        let mut h = host(Os::Linux);
        h.user = "root".into();
        h.uid = 0;
        h.home = "/root".into();
        h.env.insert("SUDO_USER".into(), "bob".into());
        h.env
            .insert("CLAUDE_CONFIG_DIR".into(), "/root/.claude".into());
        let opts = Options {
            system: true,
            ..Default::default()
        };
        let lookup = |name: &str| (name == "bob").then(|| (1001, PathBuf::from("/home/bob")));
        let ctx = Context::resolve(&h, &opts, &lookup).unwrap();
        assert_eq!((ctx.user.as_str(), ctx.uid), ("bob", 1001));
        assert_eq!(
            ctx.config_dir,
            PathBuf::from("/home/bob/.config/codetogether")
        );
        assert_eq!(ctx.claude_config_dir, PathBuf::from("/home/bob/.claude"));
        let opts = Options {
            system: true,
            run_as: Some("carol".into()),
            ..Default::default()
        };
        assert!(Context::resolve(&h, &opts, &lookup).is_err());
    }

    #[test]
    fn passwd_lines() {
        assert_eq!(
            parse_passwd_line("bob:x:1001:1001:Bob,,,:/home/bob:/bin/bash"),
            Some((1001, PathBuf::from("/home/bob")))
        );
        assert_eq!(parse_passwd_line("garbage"), None);
    }
}
