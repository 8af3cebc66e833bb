//! Project policy: which folders tasks may run in, the named projects (name → folder), and whether tasks from
//! users the owner shared this agent with are accepted.
//!
//! The allowed folders are the union of `ALLOWED_PROJECT_DIRS` (comma-separated), the `allowed_dirs` of
//! `projects.json` in the config directory, and every folder added as a project on this machine. **An empty
//! list allows nothing**: no folder is allowed until the owner sets `ALLOWED_PROJECT_DIRS` or runs
//! `ct-agent project add <name> <folder>`.
//!
//! Every check is on canonical real paths: `~` is expanded, a Windows path typed by a WSL user
//! (`C:\src\app`) becomes `/mnt/c/src/app`, then `std::fs::canonicalize` resolves `..` and symlinks, and the
//! result must lie inside a canonical allowed folder, compared component by component (`/a/proj2` is not
//! inside `/a/proj`). A project added from the relay must already lie inside an allowed folder: the relay can
//! name folders, never widen what the owner allowed on this machine.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{ConfigDir, ConfigError};

/// The environment variable listing allowed folders, comma-separated.
pub const ENV_ALLOWED_DIRS: &str = "ALLOWED_PROJECT_DIRS";
/// Named projects, extra allowed folders and the share policy, in the config directory (`0600`).
pub const PROJECTS_FILE: &str = "projects.json";
/// Longest project name.
pub const MAX_NAME_LEN: usize = 40;

/// Why a folder or project cannot be used. Refusals name the allowed folders and say how to allow one.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// No folder is allowed at all (the safe default).
    #[error(
        "no folder is allowed on this agent yet, so `{asked}` is refused: set ALLOWED_PROJECT_DIRS \
         (comma-separated folders) for the agent, or run `ct-agent project add <name> <folder>` on this machine"
    )]
    NothingAllowed { asked: String },
    /// The folder's real path is outside every allowed folder (after resolving `..` and symlinks).
    #[error(
        "{} is not inside an allowed folder (allowed: {}): run `ct-agent project add <name> {}` on this \
         machine, or add it to ALLOWED_PROJECT_DIRS",
        path.display(), PathList(allowed), path.display()
    )]
    OutsideAllowed {
        path: PathBuf,
        allowed: Vec<PathBuf>,
    },
    /// The folder does not exist (or cannot be resolved).
    #[error("{} does not exist or cannot be read: {reason} (allowed: {})", path.display(), PathList(allowed))]
    NotFound {
        path: PathBuf,
        reason: String,
        allowed: Vec<PathBuf>,
    },
    /// The path names a file, not a folder.
    #[error("{} is not a folder", path.display())]
    NotADirectory { path: PathBuf },
    /// A relative path (other than `~/...`): it would depend on the agent's working directory.
    #[error(
        "`{given}` is neither a project name nor an absolute path: give a project name ({}) or a full path \
         inside an allowed folder ({})",
        NameList(projects), PathList(allowed)
    )]
    NotAbsolute {
        given: String,
        projects: Vec<String>,
        allowed: Vec<PathBuf>,
    },
    /// `~` was used but the agent has no home directory.
    #[error("`{given}` starts with ~ but the agent has no HOME: give the full path")]
    NoHome { given: String },
    /// A Windows path on a machine that is not WSL.
    #[error("`{given}` is a Windows path; this agent runs on Linux/macOS, not WSL: give the path as this machine sees it")]
    WindowsPathOutsideWsl { given: String },
    /// A project name that is not known.
    #[error(
        "there is no project named `{name}` on this agent (projects: {})",
        NameList(known)
    )]
    UnknownProject { name: String, known: Vec<String> },
    /// A project name that breaks the naming rule.
    #[error(
        "`{name}` is not a valid project name: use 1 to {MAX_NAME_LEN} characters from a-z, 0-9, `.`, `_`, `-`, \
         starting with a letter or digit"
    )]
    InvalidName { name: String },
    /// A project of that name exists already (with another folder).
    #[error("a project named `{name}` already exists ({}): remove it first with `ct-agent project remove {name}`", path.display())]
    NameTaken { name: String, path: PathBuf },
    /// A Discord user id in the share list is not a snowflake.
    #[error("`{id}` is not a Discord user id (digits only)")]
    InvalidUserId { id: String },
    /// `projects.json` or the config directory cannot be used.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

struct PathList<'a>(&'a [PathBuf]);

impl fmt::Display for PathList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}", p.display())?;
        }
        Ok(())
    }
}

struct NameList<'a>(&'a [String]);

impl fmt::Display for NameList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&self.0.join(", "))
        }
    }
}

/// Whether the agent accepts tasks from users its owner shared it with. The agent decides this itself,
/// whatever the relay's share list says.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum SharePolicy {
    /// Only the owner's tasks run (the default).
    #[default]
    Off,
    /// Any user the relay says the owner shared this agent with.
    All,
    /// Only these Discord user ids (and only if the relay also says they are shared with).
    Listed { users: Vec<String> },
}

impl SharePolicy {
    /// Whether a task from grantee `discord_user_id` is accepted. The owner is not a grantee: check them first.
    pub fn accepts(&self, discord_user_id: &str) -> bool {
        match self {
            SharePolicy::Off => false,
            SharePolicy::All => true,
            SharePolicy::Listed { users } => users.iter().any(|u| u == discord_user_id),
        }
    }
}

/// Who asks to add a project: the owner on this machine, or the relay on the owner's behalf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `ct-agent project add` on this machine: any existing folder, which becomes allowed.
    Local,
    /// From the relay: the folder must already lie inside an allowed folder.
    Relay,
}

/// A named project.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Project {
    pub name: String,
    /// Canonical path, as resolved when the project was added.
    pub path: PathBuf,
}

/// What `projects.json` holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectsFile {
    /// Extra allowed folders besides `ALLOWED_PROJECT_DIRS` (edited by hand).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_dirs: Vec<PathBuf>,
    /// Project name → canonical folder.
    #[serde(default)]
    pub projects: BTreeMap<String, ProjectEntry>,
    /// Tasks from grantees.
    #[serde(default)]
    pub sharing: SharePolicy,
    /// Who runs inside the bubblewrap sandbox.
    #[serde(default)]
    pub sandbox: crate::sandbox::SandboxSettings,
}

/// One project in `projects.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectEntry {
    pub path: PathBuf,
    /// Added on this machine (so the folder itself is allowed) rather than from the relay.
    #[serde(default)]
    pub local: bool,
    /// Where its tasks edit unless a task asks otherwise (`ct-agent project set NAME isolation=...`);
    /// unset, a task gets a worktree only when another task already runs in the project's own folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<ct_protocol::task::Isolation>,
}

/// The facts about the machine that path handling depends on, injectable for tests.
#[derive(Debug, Clone, Default)]
pub struct Host {
    /// Running under WSL: Windows paths map to `/mnt/<drive>/...`.
    pub wsl: bool,
    /// `$HOME`, for `~`.
    pub home: Option<PathBuf>,
}

impl Host {
    /// This machine: WSL if `/proc/sys/kernel/osrelease` mentions Microsoft or WSL; `$HOME`.
    pub fn detect() -> Self {
        let osrelease = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        Self {
            wsl: is_wsl_release(&osrelease),
            home: std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .map(PathBuf::from),
        }
    }
}

/// Whether a kernel release string is WSL's (`5.15.153.1-microsoft-standard-WSL2`, `4.4.0-19041-Microsoft`).
pub fn is_wsl_release(osrelease: &str) -> bool {
    let lower = osrelease.to_ascii_lowercase();
    lower.contains("microsoft") || lower.contains("wsl")
}

/// The project policy of this agent.
#[derive(Debug, Clone)]
pub struct Policy {
    config: ConfigDir,
    host: Host,
    /// Canonical roots from `ALLOWED_PROJECT_DIRS`.
    env_roots: Vec<PathBuf>,
    /// Entries of `ALLOWED_PROJECT_DIRS` that could not be used, with why (for `doctor` and logs).
    ignored: Vec<(String, String)>,
    file: ProjectsFile,
}

impl Policy {
    /// Reads `ALLOWED_PROJECT_DIRS` and `projects.json` for this machine.
    pub fn load(config: &ConfigDir) -> Result<Self, PolicyError> {
        let env = std::env::var(ENV_ALLOWED_DIRS).unwrap_or_default();
        Self::load_with(config, &env, Host::detect())
    }

    /// [`Policy::load`] with the variable's value and the host given, for tests.
    pub fn load_with(
        config: &ConfigDir,
        allowed_env: &str,
        host: Host,
    ) -> Result<Self, PolicyError> {
        let file: ProjectsFile = config.load_json(PROJECTS_FILE)?.unwrap_or_default();
        let mut env_roots = Vec::new();
        let mut ignored = Vec::new();
        for entry in allowed_env
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            match host_path(entry, &host).and_then(|p| canonical_dir(&p, &[])) {
                Ok(root) => env_roots.push(root),
                Err(err) => {
                    tracing::warn!(entry, %err, "ignoring an entry of {ENV_ALLOWED_DIRS}");
                    ignored.push((entry.to_owned(), err.to_string()));
                }
            }
        }
        Ok(Self {
            config: config.clone(),
            host,
            env_roots,
            ignored,
            file,
        })
    }

    /// Every allowed folder (canonical, deduplicated): the variable, the file's `allowed_dirs` and local
    /// projects. Empty means nothing is allowed.
    pub fn allowed_dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = self.env_roots.clone();
        dirs.extend(self.file.allowed_dirs.iter().cloned());
        dirs.extend(
            self.file
                .projects
                .values()
                .filter(|p| p.local)
                .map(|p| p.path.clone()),
        );
        let mut seen = std::collections::HashSet::new();
        dirs.retain(|d| seen.insert(d.clone()));
        dirs
    }

    /// Entries of `ALLOWED_PROJECT_DIRS` that were ignored, with the reason.
    pub fn ignored_env_entries(&self) -> &[(String, String)] {
        &self.ignored
    }

    /// The named projects, by name.
    pub fn list(&self) -> Vec<Project> {
        self.file
            .projects
            .iter()
            .map(|(name, e)| Project {
                name: name.clone(),
                path: e.path.clone(),
            })
            .collect()
    }

    /// Who besides the owner may run tasks here.
    pub fn sharing(&self) -> &SharePolicy {
        &self.file.sharing
    }

    /// Sets and saves the share policy. Listed ids must be Discord snowflakes (digits).
    pub fn set_sharing(&mut self, sharing: SharePolicy) -> Result<(), PolicyError> {
        if let SharePolicy::Listed { users } = &sharing {
            if let Some(bad) = users
                .iter()
                .find(|u| u.is_empty() || !u.bytes().all(|b| b.is_ascii_digit()))
            {
                return Err(PolicyError::InvalidUserId { id: bad.clone() });
            }
        }
        let mut file = self.file.clone();
        file.sharing = sharing;
        self.save(file)
    }

    /// Who runs inside the sandbox.
    pub fn sandbox(&self) -> &crate::sandbox::SandboxSettings {
        &self.file.sandbox
    }

    /// Sets and saves who runs inside the sandbox.
    pub fn set_sandbox(
        &mut self,
        sandbox: crate::sandbox::SandboxSettings,
    ) -> Result<(), PolicyError> {
        let mut file = self.file.clone();
        file.sandbox = sandbox;
        self.save(file)
    }

    /// Names `path` as project `name` and saves it. From [`Origin::Local`] the folder becomes allowed; from
    /// [`Origin::Relay`] it must already be inside an allowed folder. Adding the same name and folder again
    /// is a no-op.
    pub fn add(&mut self, name: &str, path: &str, origin: Origin) -> Result<Project, PolicyError> {
        validate_name(name)?;
        let canonical = match origin {
            Origin::Local => canonical_dir(&host_path(path, &self.host)?, &self.allowed_dirs())?,
            Origin::Relay => self.resolve_path(path)?,
        };
        if let Some(existing) = self.file.projects.get(name) {
            if existing.path == canonical {
                return Ok(Project {
                    name: name.to_owned(),
                    path: canonical,
                });
            }
            return Err(PolicyError::NameTaken {
                name: name.to_owned(),
                path: existing.path.clone(),
            });
        }
        let mut file = self.file.clone();
        file.projects.insert(
            name.to_owned(),
            ProjectEntry {
                path: canonical.clone(),
                local: origin == Origin::Local,
                isolation: None,
            },
        );
        self.save(file)?;
        Ok(Project {
            name: name.to_owned(),
            path: canonical,
        })
    }

    /// The owner's choice of isolation for the project named `name` (a path has none).
    pub fn isolation_of(&self, name: &str) -> Option<ct_protocol::task::Isolation> {
        self.file
            .projects
            .get(name.trim())
            .and_then(|e| e.isolation)
    }

    /// Sets and saves the isolation its tasks get by default.
    pub fn set_isolation(
        &mut self,
        name: &str,
        isolation: ct_protocol::task::Isolation,
    ) -> Result<(), PolicyError> {
        let mut file = self.file.clone();
        let Some(entry) = file.projects.get_mut(name) else {
            return Err(PolicyError::UnknownProject {
                name: name.to_owned(),
                known: self.file.projects.keys().cloned().collect(),
            });
        };
        entry.isolation = Some(isolation);
        self.save(file)
    }

    /// Forgets project `name` (and, for a local project, no longer allows its folder on that account).
    pub fn remove(&mut self, name: &str) -> Result<Project, PolicyError> {
        let mut file = self.file.clone();
        let Some(entry) = file.projects.remove(name) else {
            return Err(PolicyError::UnknownProject {
                name: name.to_owned(),
                known: self.file.projects.keys().cloned().collect(),
            });
        };
        self.save(file)?;
        Ok(Project {
            name: name.to_owned(),
            path: entry.path,
        })
    }

    /// The canonical folder a task may run in, from a project name or a path (absolute, `~/...`, or a
    /// Windows path under WSL). Refuses anything whose real path is outside the allowed folders.
    pub fn resolve(&self, project_or_path: &str) -> Result<PathBuf, PolicyError> {
        let given = project_or_path.trim();
        if let Some(entry) = self.file.projects.get(given) {
            // Resolve again: the folder may have been replaced by a symlink since it was added.
            return self.check(&entry.path, given);
        }
        if is_name_like(given) {
            return Err(PolicyError::UnknownProject {
                name: given.to_owned(),
                known: self.file.projects.keys().cloned().collect(),
            });
        }
        self.resolve_path(given)
    }

    fn resolve_path(&self, given: &str) -> Result<PathBuf, PolicyError> {
        let path = host_path(given, &self.host).map_err(|err| match err {
            PolicyError::NotAbsolute { given, .. } => PolicyError::NotAbsolute {
                given,
                projects: self.file.projects.keys().cloned().collect(),
                allowed: self.allowed_dirs(),
            },
            other => other,
        })?;
        self.check(&path, given)
    }

    fn check(&self, path: &Path, given: &str) -> Result<PathBuf, PolicyError> {
        let allowed = self.allowed_dirs();
        if allowed.is_empty() {
            return Err(PolicyError::NothingAllowed {
                asked: given.to_owned(),
            });
        }
        let canonical = canonical_dir(path, &allowed)?;
        // Path::starts_with compares whole components: /a/proj2 does not start with /a/proj.
        if allowed.iter().any(|root| canonical.starts_with(root)) {
            Ok(canonical)
        } else {
            Err(PolicyError::OutsideAllowed {
                path: canonical,
                allowed,
            })
        }
    }

    fn save(&mut self, file: ProjectsFile) -> Result<(), PolicyError> {
        self.config.store_json(PROJECTS_FILE, &file, 0o600)?;
        self.file = file;
        Ok(())
    }
}

/// Checks a project name: 1..=40 of `[a-z0-9._-]`, starting with a letter or digit (so it is never `.`,
/// `..` or an option).
pub fn validate_name(name: &str) -> Result<(), PolicyError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(PolicyError::InvalidName {
            name: name.to_owned(),
        })
    }
}

/// Something that can only be meant as a name: no separator, no `~`, no drive letter.
fn is_name_like(s: &str) -> bool {
    !s.is_empty() && !s.contains(['/', '\\', '~', ':'])
}

/// Turns what a user typed into an absolute path on this machine: `~` expanded, a Windows path mapped under
/// WSL. Does not touch the filesystem.
pub fn host_path(given: &str, host: &Host) -> Result<PathBuf, PolicyError> {
    let given = given.trim();
    if let Some(rest) = windows_path(given) {
        if !host.wsl {
            return Err(PolicyError::WindowsPathOutsideWsl {
                given: given.to_owned(),
            });
        }
        return Ok(rest);
    }
    if given == "~" || given.starts_with("~/") {
        let home = host.home.as_ref().ok_or_else(|| PolicyError::NoHome {
            given: given.to_owned(),
        })?;
        let rest = given.trim_start_matches('~').trim_start_matches('/');
        return Ok(if rest.is_empty() {
            home.clone()
        } else {
            home.join(rest)
        });
    }
    let path = PathBuf::from(given);
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(PolicyError::NotAbsolute {
            given: given.to_owned(),
            projects: Vec::new(),
            allowed: Vec::new(),
        })
    }
}

/// `C:\src\app` or `C:/src/app` → `/mnt/c/src/app`; `\\wsl$\Ubuntu\home\a` or `\\wsl.localhost\Ubuntu\home\a`
/// → `/home/a`. `None` if `s` is not a Windows path.
fn windows_path(s: &str) -> Option<PathBuf> {
    let b = s.as_bytes();
    if b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':' {
        let rest = &s[2..];
        if !(rest.is_empty() || rest.starts_with('\\') || rest.starts_with('/')) {
            return None;
        }
        let drive = (b[0] as char).to_ascii_lowercase();
        let mut path = PathBuf::from(format!("/mnt/{drive}"));
        path.extend(rest.split(['\\', '/']).filter(|p| !p.is_empty()));
        return Some(path);
    }
    let unc = s.replace('\\', "/");
    let lower = unc.to_ascii_lowercase();
    for prefix in ["//wsl$/", "//wsl.localhost/"] {
        if lower.starts_with(prefix) {
            // Skip the distribution name: its files are this machine's root.
            let after = &unc[prefix.len()..];
            let rest = after.split_once('/').map_or("", |(_, r)| r);
            let mut path = PathBuf::from("/");
            path.extend(rest.split('/').filter(|p| !p.is_empty()));
            return Some(path);
        }
    }
    None
}

/// The canonical real path of an existing folder.
fn canonical_dir(path: &Path, allowed: &[PathBuf]) -> Result<PathBuf, PolicyError> {
    let canonical = std::fs::canonicalize(path).map_err(|e| PolicyError::NotFound {
        path: path.to_path_buf(),
        reason: e.to_string(),
        allowed: allowed.to_vec(),
    })?;
    if !canonical.is_dir() {
        return Err(PolicyError::NotADirectory { path: canonical });
    }
    debug_assert!(!canonical.components().any(|c| c == Component::ParentDir));
    Ok(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    struct Fixture {
        _tmp: tempfile::TempDir,
        root: PathBuf,
        config: ConfigDir,
    }

    /// A canonical temp root with `allowed/proj`, `allowed/proj2`, `outside/secret` and a config dir.
    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(tmp.path()).unwrap();
        for d in ["allowed/proj", "allowed/proj2", "outside/secret"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let config = ConfigDir::open(root.join("config")).unwrap();
        Fixture {
            _tmp: tmp,
            root,
            config,
        }
    }

    fn host() -> Host {
        Host {
            wsl: false,
            home: None,
        }
    }

    fn policy(f: &Fixture, env: &str, host: Host) -> Policy {
        Policy::load_with(&f.config, env, host).unwrap()
    }

    fn s(p: &Path) -> String {
        p.display().to_string()
    }

    #[test]
    fn inside_allowed_resolves_to_the_canonical_path() {
        let f = fixture();
        let p = policy(&f, &s(&f.root.join("allowed")), host());
        let got = p.resolve(&s(&f.root.join("allowed/./proj/"))).unwrap();
        assert_eq!(got, f.root.join("allowed/proj"));
    }

    #[test]
    fn dot_dot_escape_is_refused_and_names_the_allowed_folder() {
        let f = fixture();
        let allowed = f.root.join("allowed");
        let p = policy(&f, &s(&allowed), host());
        let err = p
            .resolve(&format!("{}/proj/../../outside/secret", s(&allowed)))
            .unwrap_err();
        assert!(matches!(err, PolicyError::OutsideAllowed { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&s(&allowed)), "{msg}");
        assert!(msg.contains("ct-agent project add"), "{msg}");
        assert!(msg.contains(ENV_ALLOWED_DIRS), "{msg}");
    }

    #[test]
    fn symlink_pointing_out_is_refused() {
        let f = fixture();
        let allowed = f.root.join("allowed");
        symlink(f.root.join("outside/secret"), allowed.join("link")).unwrap();
        let p = policy(&f, &s(&allowed), host());
        let err = p.resolve(&s(&allowed.join("link"))).unwrap_err();
        assert!(
            matches!(&err, PolicyError::OutsideAllowed { path, .. } if *path == f.root.join("outside/secret")),
            "{err}"
        );
        // A symlink that stays inside is fine, and resolves to its target.
        symlink(allowed.join("proj"), allowed.join("inner")).unwrap();
        assert_eq!(
            p.resolve(&s(&allowed.join("inner"))).unwrap(),
            allowed.join("proj")
        );
    }

    #[test]
    fn sibling_with_a_common_prefix_is_not_inside() {
        let f = fixture();
        let p = policy(&f, &s(&f.root.join("allowed/proj")), host());
        assert!(p.resolve(&s(&f.root.join("allowed/proj"))).is_ok());
        let err = p.resolve(&s(&f.root.join("allowed/proj2"))).unwrap_err();
        assert!(matches!(err, PolicyError::OutsideAllowed { .. }), "{err}");
    }

    #[test]
    fn tilde_expands_to_home() {
        let f = fixture();
        let h = Host {
            wsl: false,
            home: Some(f.root.join("allowed")),
        };
        let p = policy(&f, "~", h.clone());
        assert_eq!(p.allowed_dirs(), vec![f.root.join("allowed")]);
        assert_eq!(p.resolve("~/proj").unwrap(), f.root.join("allowed/proj"));
        assert_eq!(p.resolve("~").unwrap(), f.root.join("allowed"));
        let no_home = policy(&f, &s(&f.root), host());
        assert!(matches!(
            no_home.resolve("~/proj"),
            Err(PolicyError::NoHome { .. })
        ));
    }

    #[test]
    fn windows_paths_map_under_wsl_only() {
        assert_eq!(
            windows_path(r"C:\src\app"),
            Some(PathBuf::from("/mnt/c/src/app"))
        );
        assert_eq!(
            windows_path("D:/src/app/"),
            Some(PathBuf::from("/mnt/d/src/app"))
        );
        assert_eq!(windows_path("c:"), Some(PathBuf::from("/mnt/c")));
        assert_eq!(
            windows_path(r"\\wsl$\Ubuntu\home\ann\app"),
            Some(PathBuf::from("/home/ann/app"))
        );
        assert_eq!(
            windows_path(r"\\wsl.localhost\Ubuntu-22.04\home\ann"),
            Some(PathBuf::from("/home/ann"))
        );
        assert_eq!(windows_path("/home/ann"), None);
        assert_eq!(windows_path("c:foo"), None);

        let wsl = Host {
            wsl: true,
            home: None,
        };
        assert_eq!(
            host_path(r"C:\src\app", &wsl).unwrap(),
            PathBuf::from("/mnt/c/src/app")
        );
        let err = host_path(r"C:\src\app", &host()).unwrap_err();
        assert!(
            matches!(err, PolicyError::WindowsPathOutsideWsl { .. }),
            "{err}"
        );

        assert!(is_wsl_release("5.15.153.1-microsoft-standard-WSL2\n"));
        assert!(is_wsl_release("4.4.0-19041-Microsoft"));
        assert!(!is_wsl_release("6.8.0-45-generic"));
    }

    #[test]
    fn empty_allowed_list_refuses_everything_and_says_how_to_allow() {
        let f = fixture();
        let p = policy(&f, " , ", host());
        assert!(p.allowed_dirs().is_empty());
        let err = p.resolve(&s(&f.root.join("allowed/proj"))).unwrap_err();
        assert!(matches!(err, PolicyError::NothingAllowed { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.starts_with("no folder is allowed on this agent yet"),
            "{msg}"
        );
        assert!(msg.contains("ALLOWED_PROJECT_DIRS"), "{msg}");
        assert!(
            msg.contains("ct-agent project add <name> <folder>"),
            "{msg}"
        );
    }

    #[test]
    fn missing_env_entries_are_ignored_and_reported() {
        let f = fixture();
        let p = policy(
            &f,
            &format!("{},/does/not/exist", s(&f.root.join("allowed"))),
            host(),
        );
        assert_eq!(p.allowed_dirs(), vec![f.root.join("allowed")]);
        assert_eq!(p.ignored_env_entries().len(), 1);
        assert_eq!(p.ignored_env_entries()[0].0, "/does/not/exist");
    }

    #[test]
    fn names_are_validated() {
        for ok in [
            "app",
            "my-app",
            "a.b_c-1",
            "0day",
            &"x".repeat(MAX_NAME_LEN),
        ] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "App",
            "-x",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a b",
            "é",
            &"x".repeat(MAX_NAME_LEN + 1),
        ] {
            assert!(
                matches!(validate_name(bad), Err(PolicyError::InvalidName { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn local_add_allows_the_folder_and_persists_0600() {
        let f = fixture();
        let mut p = policy(&f, "", host());
        let proj = f.root.join("outside/secret");
        let added = p.add("secret", &s(&proj), Origin::Local).unwrap();
        assert_eq!(added.path, proj);
        assert_eq!(p.resolve("secret").unwrap(), proj);
        assert_eq!(p.resolve(&s(&proj)).unwrap(), proj);

        let file = f.config.file(PROJECTS_FILE);
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let reloaded = policy(&f, "", host());
        assert_eq!(reloaded.list(), vec![added.clone()]);

        // Same again is a no-op; another folder under the same name is refused.
        p.add("secret", &s(&proj), Origin::Local).unwrap();
        let err = p
            .add("secret", &s(&f.root.join("allowed")), Origin::Local)
            .unwrap_err();
        assert!(matches!(err, PolicyError::NameTaken { .. }), "{err}");

        p.remove("secret").unwrap();
        assert!(p.list().is_empty());
        assert!(matches!(
            p.resolve(&s(&proj)),
            Err(PolicyError::NothingAllowed { .. })
        ));
        assert!(matches!(
            p.remove("secret"),
            Err(PolicyError::UnknownProject { .. })
        ));
    }

    #[test]
    fn relay_add_must_stay_inside_allowed_folders() {
        let f = fixture();
        let mut p = policy(&f, &s(&f.root.join("allowed")), host());
        let ok = p
            .add("proj", &s(&f.root.join("allowed/proj")), Origin::Relay)
            .unwrap();
        assert_eq!(ok.path, f.root.join("allowed/proj"));
        let err = p
            .add("secret", &s(&f.root.join("outside/secret")), Origin::Relay)
            .unwrap_err();
        assert!(matches!(err, PolicyError::OutsideAllowed { .. }), "{err}");
    }

    #[test]
    fn a_project_folder_swapped_for_a_symlink_is_refused() {
        let f = fixture();
        let mut p = policy(&f, &s(&f.root.join("allowed")), host());
        let proj = f.root.join("allowed/proj");
        p.add("proj", &s(&proj), Origin::Relay).unwrap();
        std::fs::remove_dir(&proj).unwrap();
        symlink(f.root.join("outside/secret"), &proj).unwrap();
        let err = p.resolve("proj").unwrap_err();
        assert!(matches!(err, PolicyError::OutsideAllowed { .. }), "{err}");
    }

    #[test]
    fn unknown_names_relative_paths_and_files_are_refused() {
        let f = fixture();
        std::fs::write(f.root.join("allowed/file.txt"), "x").unwrap();
        let p = policy(&f, &s(&f.root.join("allowed")), host());
        assert!(matches!(
            p.resolve("nope"),
            Err(PolicyError::UnknownProject { .. })
        ));
        let err = p.resolve("allowed/proj").unwrap_err();
        assert!(matches!(err, PolicyError::NotAbsolute { .. }), "{err}");
        assert!(err.to_string().contains(&s(&f.root.join("allowed"))));
        assert!(matches!(
            p.resolve(&s(&f.root.join("allowed/file.txt"))),
            Err(PolicyError::NotADirectory { .. })
        ));
        assert!(matches!(
            p.resolve(&s(&f.root.join("allowed/missing"))),
            Err(PolicyError::NotFound { .. })
        ));
    }

    #[test]
    fn share_policy_defaults_off_and_round_trips() {
        let f = fixture();
        let mut p = policy(&f, "", host());
        assert_eq!(p.sharing(), &SharePolicy::Off);
        assert!(!p.sharing().accepts("42"));
        p.set_sharing(SharePolicy::Listed {
            users: vec!["42".into()],
        })
        .unwrap();
        let reloaded = policy(&f, "", host());
        assert!(reloaded.sharing().accepts("42"));
        assert!(!reloaded.sharing().accepts("43"));
        assert!(SharePolicy::All.accepts("43"));
        assert!(matches!(
            p.set_sharing(SharePolicy::Listed {
                users: vec!["<@42>".into()]
            }),
            Err(PolicyError::InvalidUserId { .. })
        ));
        let text = std::fs::read_to_string(f.config.file(PROJECTS_FILE)).unwrap();
        assert!(text.contains(r#""mode": "listed""#), "{text}");
    }
}
