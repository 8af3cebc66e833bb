//! A pool worker's workspaces (`ct-agent run --pool`): one folder per user, one folder per project in it.
//!
//! A worker serves many people, none of them its owner (it is paired to `pool:NAME`), each in a workspace of
//! their own: `<workspaces>/users/<discord id>/<project>/`. Every task runs sandboxed with only its project
//! folder bound (see [`crate::tasks`]); this module creates, lists and removes those folders for the relay's
//! project commands, and measures a workspace against its quota.
//!
//! Nothing here trusts what is inside a user's folder: a user's own tasks can write anything into their
//! projects (symlinks included), and an operator may have left anything in `users/`. So the user's folder is
//! opened by descriptor without following a link, and every name is created, opened, renamed and removed
//! relative to that descriptor with `O_NOFOLLOW` (as [`crate::attachments`] does); names are checked first
//! ([`check_name`]) and a user id is digits only ([`check_user`]), so no input names a path elsewhere.
//!
//! A git clone goes into a hidden temporary folder next to the project (names starting with `.` are never
//! projects) and is renamed into place only once complete and within the quota; on any failure the
//! temporary folder is removed, so nothing is left behind.

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ct_protocol::project::ProjectInfo;
use rand::RngCore as _;
use rustix::fs::{self as rfs, AtFlags, Mode, OFlags};
use rustix::io::Errno;

/// The folder under the workspaces root that holds one folder per user.
/// How deep the workspace's size is measured; deeper trees count as over the quota.
const MAX_DEPTH: usize = 64;

/// Clones one worker runs at once (see [`PoolConfig::create`]).
static CLONES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

pub const USERS_DIR: &str = "users";
/// Longest project name.
pub const MAX_NAME: usize = 64;
/// Longest git URL accepted.
pub const MAX_URL: usize = 2048;
/// Projects one user may have.
pub const MAX_PROJECTS: usize = 100;
/// The protocols `git clone` may use by default (`GIT_ALLOW_PROTOCOL`); see [`PoolConfig::git_protocols`].
pub const GIT_PROTOCOLS: &[&str] = &["https", "ssh"];

/// How a pool worker runs (`ct-agent run --pool ...`).
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Where the workspaces live (`--workspaces`, default `/data`); canonical once [`PoolConfig::prepare`]d.
    pub workspaces: PathBuf,
    /// What every user may spend unless `ct-agent sharing budget` set their own (`--budget-per-user`).
    pub budget_per_user: Option<crate::meter::Budget>,
    /// Per task: address space, CPU seconds, processes, largest file (see [`Limits`]).
    pub limits: Limits,
    /// Largest a user's workspace may be before tasks and new projects are refused (bytes).
    pub quota_bytes: u64,
    /// How long a `git clone` may take.
    pub clone_timeout: Duration,
    /// URL schemes a project may be cloned from, also given to git as `GIT_ALLOW_PROTOCOL`. `https` and
    /// `ssh` (which covers `git@host:path`) unless a test widens it: `CT_AGENT_POOL_GIT_PROTOCOLS=file` lets
    /// the tests clone a local bare repository, since there is no git server offline. Never for a real
    /// worker: `file://` would clone any repository on the worker's disk.
    pub git_protocols: Vec<String>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            workspaces: PathBuf::from("/data"),
            budget_per_user: None,
            limits: Limits::default(),
            quota_bytes: 10_240 * 1024 * 1024,
            clone_timeout: Duration::from_secs(600),
            git_protocols: GIT_PROTOCOLS.iter().map(|p| (*p).to_owned()).collect(),
        }
    }
}

/// Resource limits on each pool task's whole process tree, set with util-linux `prlimit` around the sandbox
/// (limits are inherited across `fork` and `exec`, so bubblewrap, Claude Code and every tool it runs get them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// `RLIMIT_AS`, per process (`--task-memory-mib`).
    pub memory_bytes: u64,
    /// `RLIMIT_CPU`, per process (`--task-cpu-secs`).
    pub cpu_secs: u64,
    /// `RLIMIT_NPROC` (`--task-processes`). The kernel counts it per real user id (in the user namespace the
    /// process was created in), not per process tree: every sandbox of a worker runs as the worker's uid, so
    /// all of a worker's tasks, and the worker itself, share this one count. It stops a fork bomb from
    /// taking the machine, not one user from crowding out another; run one worker per few users, or give each
    /// worker its own uid (the container images do), for a tighter bound.
    pub processes: u64,
    /// `RLIMIT_FSIZE`: the largest file a task may write (the workspace quota, so one file cannot outgrow it).
    pub file_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: 4096 * 1024 * 1024,
            cpu_secs: 3600,
            processes: 512,
            file_bytes: 10_240 * 1024 * 1024,
        }
    }
}

impl Limits {
    /// The `prlimit --as=... --cpu=... --nproc=... --fsize=... --` prefix, or why it cannot be used.
    pub fn command(&self) -> Result<Vec<OsString>, String> {
        let prlimit = find_on_path("prlimit").ok_or(
            "this pool worker cannot limit its tasks' memory, CPU time and processes: util-linux's `prlimit` \
             is not on its PATH (install util-linux)",
        )?;
        Ok(vec![
            prlimit.into(),
            format!("--as={}", self.memory_bytes).into(),
            format!("--cpu={}", self.cpu_secs).into(),
            format!("--nproc={}", self.processes).into(),
            format!("--fsize={}", self.file_bytes).into(),
            "--".into(),
        ])
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

impl PoolConfig {
    /// Creates the workspaces folder (`0700`) if needed and makes its path canonical. Refused when tasks'
    /// sandboxes would see it: every sandbox binds the system folders read-only, so workspaces under `/opt`
    /// or `/usr` would show every user's files to every other.
    pub fn prepare(&mut self) -> Result<(), String> {
        use std::os::unix::fs::DirBuilderExt as _;
        let seen = |path: &Path| {
            match crate::sandbox::seen_by_every_sandbox(path) {
            Some(shared) => Err(format!(
                "the workspaces folder {} is inside {shared}, which every task's sandbox sees: choose a folder \
                 elsewhere (`--workspaces /data`)",
                path.display()
            )),
            None => Ok(()),
        }
        };
        if !self.workspaces.is_absolute() {
            return Err(format!(
                "the workspaces folder must be an absolute path, not {}",
                self.workspaces.display()
            ));
        }
        // Checked before anything is created there, and again once links are resolved.
        seen(&self.workspaces)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.workspaces)
            .map_err(|e| {
                format!(
                    "cannot create the workspaces folder {}: {e}",
                    self.workspaces.display()
                )
            })?;
        let canonical = std::fs::canonicalize(&self.workspaces)
            .map_err(|e| format!("cannot open {}: {e}", self.workspaces.display()))?;
        seen(&canonical)?;
        self.workspaces = canonical;
        Ok(())
    }

    /// Removes what a worker that stopped mid-clone or mid-removal left in users' folders (hidden
    /// `.clone-*` and `.trash-*` folders, never projects). Only at start, when no clone or removal runs.
    pub fn sweep_leftovers(&self) {
        let Ok(users) = std::fs::read_dir(self.workspaces.join(USERS_DIR)) else {
            return;
        };
        for user in users.flatten() {
            let Some(id) = user.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let Ok((dir, path)) = self.user_dir(&id) else {
                continue;
            };
            let Ok(read) = rfs::openat(
                &dir,
                ".",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .and_then(rfs::Dir::read_from) else {
                continue;
            };
            for entry in read.flatten() {
                let Ok(name) = entry.file_name().to_str() else {
                    continue;
                };
                if name.starts_with(".clone-") || name.starts_with(".trash-") {
                    let leftover = path.join(name);
                    match remove_tree(&leftover) {
                        Ok(()) => {
                            tracing::info!(path = %leftover.display(), "removed what an interrupted clone or removal left")
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, path = %leftover.display(), "cannot remove what an interrupted clone or removal left")
                        }
                    }
                }
            }
        }
    }

    /// `<workspaces>/users/<user>`, opened by descriptor without following a link (created `0700` when
    /// missing), with its path.
    pub fn user_dir(&self, user: &str) -> Result<(OwnedFd, PathBuf), String> {
        check_user(user)?;
        let io = |what: &str, e: Errno| format!("cannot open the workspace {what}: {e}");
        let root = rfs::open(
            &self.workspaces,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io("folder", e))?;
        let users = open_or_make(&root, USERS_DIR).map_err(|e| io("users folder", e))?;
        let dir = open_or_make(&users, user).map_err(|e| io(&format!("of {user}"), e))?;
        Ok((dir, self.workspaces.join(USERS_DIR).join(user)))
    }

    /// The folder of `user`'s project `name`, which must exist as a real folder.
    pub fn project_dir(&self, user: &str, name: &str) -> Result<PathBuf, String> {
        check_name(name)?;
        let (dir, path) = self.user_dir(user)?;
        match rfs::openat(
            &dir,
            name,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(_) => Ok(path.join(name)),
            Err(Errno::NOENT) => Err(format!(
                "you have no project `{name}` on this pool worker: create it with `/project add {name}` \
                 (optionally with a git URL to clone)"
            )),
            Err(Errno::LOOP | Errno::NOTDIR) => Err(format!(
                "`{name}` in your workspace is not a folder: remove it with `/project remove {name}`"
            )),
            Err(e) => Err(format!("cannot open your project `{name}`: {e}")),
        }
    }

    /// `user`'s projects (real folders with a project's name; anything else in the folder is not one).
    pub fn list(&self, user: &str) -> Result<Vec<ProjectInfo>, String> {
        let (dir, path) = self.user_dir(user)?;
        let mut out = Vec::new();
        let read = rfs::openat(
            &dir,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .and_then(rfs::Dir::read_from)
        .map_err(|e| format!("cannot read your workspace: {e}"))?;
        for entry in read {
            let entry = entry.map_err(|e| format!("cannot read your workspace: {e}"))?;
            let Ok(name) = entry.file_name().to_str() else {
                continue;
            };
            if check_name(name).is_err() {
                continue;
            }
            let is_dir = rfs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)
                .map(|st| rfs::FileType::from_raw_mode(st.st_mode) == rfs::FileType::Directory)
                .unwrap_or(false);
            if is_dir {
                out.push(ProjectInfo {
                    name: name.to_owned(),
                    path: path.join(name).display().to_string(),
                });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Creates `user`'s project `name`: empty, or cloned from `git`. Refused when the name or URL breaks the
    /// rules, the project exists, or the workspace is over its quota (before, or after the clone).
    pub async fn create(&self, user: &str, name: &str, git: Option<&str>) -> Result<(), String> {
        check_name(name)?;
        if let Some(url) = git {
            check_git_url(url, &self.git_protocols)?;
        }
        let this = self.clone();
        let (user_s, name_s) = (user.to_owned(), name.to_owned());
        let (dir, path, used) = tokio::task::spawn_blocking(move || -> Result<_, String> {
            let (dir, path) = this.user_dir(&user_s)?;
            let used = this.check_quota_of(&dir)?;
            if this.list(&user_s)?.len() >= MAX_PROJECTS {
                return Err(format!(
                    "you already have {MAX_PROJECTS} projects on this pool worker: remove one first"
                ));
            }
            match rfs::statat(&dir, name_s.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
                Err(Errno::NOENT) => Ok((dir, path, used)),
                Ok(_) => Err(format!(
                    "you already have a project (or file) named `{name_s}` here: pick another name, or \
                     remove it first with `/project remove {name_s}`"
                )),
                Err(e) => Err(format!("cannot look at your workspace: {e}")),
            }
        })
        .await
        .map_err(|e| e.to_string())??;
        let Some(url) = git else {
            return match rfs::mkdirat(&dir, name, Mode::from_raw_mode(0o755)) {
                Ok(()) => Ok(()),
                Err(Errno::EXIST) => Err(format!("`{name}` already exists in your workspace")),
                Err(e) => Err(format!("cannot create project `{name}`: {e}")),
            };
        };
        // However many users ask at once, a worker clones a couple of repositories at a time (each may take
        // minutes of network and disk); the others wait their turn.
        let _turn = CLONES.acquire().await.map_err(|e| e.to_string())?;
        let temp = format!(".clone-{}", random_hex());
        let room = self.quota_bytes.saturating_sub(used);
        let cloned = self.clone_into(&path.join(&temp), url, room).await;
        let placed = match cloned {
            Ok(()) => {
                let this = self.clone();
                let (temp, name) = (temp.clone(), name.to_owned());
                let dir = dir.try_clone().map_err(|e| e.to_string())?;
                tokio::task::spawn_blocking(move || -> Result<(), String> {
                    this.check_quota_of(&dir).map(drop).map_err(|e| {
                        format!("the clone made your workspace too large, so it was removed: {e}")
                    })?;
                    rfs::renameat_with(
                        &dir,
                        temp.as_str(),
                        &dir,
                        name.as_str(),
                        rfs::RenameFlags::NOREPLACE,
                    )
                    .map_err(|e| format!("cannot put the clone in place as `{name}`: {e}"))
                })
                .await
                .map_err(|e| e.to_string())?
            }
            Err(e) => Err(e),
        };
        if placed.is_err() {
            let leftover = path.join(&temp);
            let _ = tokio::task::spawn_blocking(move || remove_tree(&leftover)).await;
        }
        placed
    }

    /// Clones `url` into `target`, stopping git when it takes longer than the timeout or the clone grows past
    /// `room` bytes (measured every second, so a huge repository cannot fill the disk before the quota check).
    async fn clone_into(&self, target: &Path, url: &str, room: u64) -> Result<(), String> {
        let mut cmd = match self.limits_for_git() {
            Some(mut prefix) => {
                let mut c = tokio::process::Command::new(prefix.remove(0));
                c.args(prefix).arg("git");
                c
            }
            None => tokio::process::Command::new("git"),
        };
        // Nothing of the worker's own git or ssh setup: no credential helper, no keys, no agent, no prompt,
        // so a user can clone only what anyone could.
        cmd.env_clear()
            .envs(["PATH", "LANG"].iter().filter_map(|k| Some((k, std::env::var_os(k)?))))
            .env("HOME", "/nonexistent")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_ALLOW_PROTOCOL", self.git_protocols.join(":"))
            .env(
                "GIT_SSH_COMMAND",
                "ssh -F /dev/null -o BatchMode=yes -o IdentitiesOnly=yes -o IdentityFile=/dev/null \
                 -o StrictHostKeyChecking=accept-new -o UserKnownHostsFile=/dev/null",
            )
            .args(["-c", "core.hooksPath=/dev/null", "clone", "--quiet", "--no-recurse-submodules", "--"])
            .arg(url)
            .arg(target)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot run git to clone {url}: {e}"))?;
        // The remote writes git's stderr ("remote: ..."): only its tail is kept, however much it sends.
        let stderr = crate::claude::process::StderrTail::default();
        let collect = child.stderr.take().map(|e| stderr.clone().collect(e));
        // Dropping the wait (on a timeout or over the quota) kills git (`kill_on_drop`).
        let wait = async {
            let (status, _) = tokio::join!(child.wait(), async {
                if let Some(c) = collect {
                    c.await;
                }
            });
            status
        };
        tokio::pin!(wait);
        let deadline = tokio::time::sleep(self.clone_timeout);
        tokio::pin!(deadline);
        let mut every = tokio::time::interval(Duration::from_secs(1));
        let out = loop {
            tokio::select! {
                out = &mut wait => break out,
                () = &mut deadline => {
                    return Err(format!(
                        "cloning {url} took longer than {}s and was stopped: nothing was created",
                        self.clone_timeout.as_secs()
                    ))
                }
                _ = every.tick() => {
                    let t = target.to_path_buf();
                    let size = tokio::task::spawn_blocking(move || {
                        rfs::open(&t, OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
                            .map_or(Some(0), |fd| tree_size(fd.as_fd(), 0))
                            // A clone that cannot be measured is stopped like one over the quota.
                            .unwrap_or(u64::MAX)
                    })
                    .await
                    .unwrap_or(0);
                    if size > room {
                        return Err(format!(
                            "cloning {url} was stopped at {}: it would not fit in what is left of your \
                             workspace's {} quota ({}). Nothing was created",
                            mib(size),
                            mib(self.quota_bytes),
                            mib(room)
                        ));
                    }
                }
            }
        };
        match out {
            Err(e) => Err(format!("git failed to clone {url}: {e}")),
            Ok(status) if status.success() => Ok(()),
            Ok(_) => {
                let err: String = stderr.text().chars().take(500).collect();
                Err(format!(
                    "could not clone {url}: {err}. Nothing was created; check the URL (a public \
                     https:// or ssh:// repository: this worker has no credentials of yours)"
                ))
            }
        }
    }

    /// A clone gets the same limit on file size as a task (the rest of prlimit's limits would only get in
    /// git's way); `None` without prlimit.
    fn limits_for_git(&self) -> Option<Vec<OsString>> {
        let prlimit = find_on_path("prlimit")?;
        Some(vec![
            prlimit.into(),
            format!("--fsize={}", self.limits.file_bytes).into(),
            "--".into(),
        ])
    }

    /// Removes `user`'s project `name` and everything in it.
    pub fn remove(&self, user: &str, name: &str) -> Result<(), String> {
        check_name(name)?;
        let (dir, path) = self.user_dir(user)?;
        match rfs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Err(Errno::NOENT) => {
                return Err(format!("you have no project `{name}` on this pool worker"))
            }
            Err(e) => return Err(format!("cannot look at your workspace: {e}")),
            Ok(_) => {}
        }
        // Moved aside first (one atomic step, by descriptor), then removed: a task starting meanwhile finds
        // no project rather than half of one.
        let trash = format!(".trash-{}", random_hex());
        rfs::renameat(&dir, name, &dir, trash.as_str())
            .map_err(|e| format!("cannot remove project `{name}`: {e}"))?;
        remove_tree(&path.join(trash)).map_err(|e| format!("cannot remove project `{name}`: {e}"))
    }

    /// Refused, with the sizes, when `user`'s workspace is at or over its quota.
    pub fn check_quota(&self, user: &str) -> Result<(), String> {
        let (dir, _) = self.user_dir(user)?;
        self.check_quota_of(&dir).map(drop)
    }

    /// The workspace's size in bytes, or the refusal when it is at or over the quota.
    fn check_quota_of(&self, dir: &OwnedFd) -> Result<u64, String> {
        let used = tree_size(dir.as_fd(), 0).ok_or_else(|| {
            format!(
                "your workspace on this pool worker cannot be measured (folders nested over {MAX_DEPTH} deep, or \
                 one that cannot be read), so it counts as over its quota: remove them, or the project \
                 (`/project remove NAME`)"
            )
        })?;
        if used >= self.quota_bytes {
            return Err(format!(
                "your workspace on this pool worker uses {} of its {} quota: remove files or a project \
                 (`/project remove NAME`) first",
                mib(used),
                mib(self.quota_bytes)
            ));
        }
        Ok(used)
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn random_hex() -> String {
    let mut bytes = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `name` under `parent`, opened as a folder without following a link; created `0700` when missing.
fn open_or_make(parent: &OwnedFd, name: &str) -> Result<OwnedFd, Errno> {
    let open = || {
        rfs::openat(
            parent,
            name,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
    };
    match open() {
        Err(Errno::NOENT) => {
            match rfs::mkdirat(parent, name, Mode::from_raw_mode(0o700)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(e),
            }
            open()
        }
        other => other,
    }
}

/// Bytes in the tree under `dir` (apparent sizes, links not followed), or `None` when some of it cannot be
/// measured: deeper than 64 levels (a hostile tree must not risk the stack), or a folder that stays unreadable.
/// A task runs as the worker's own user, so it could `chmod 000` a folder to hide what is in it: such a
/// folder is given its owner's read and search bits back before it is measured, and one that still cannot be
/// read counts as unmeasurable rather than as empty.
fn tree_size(dir: rustix::fd::BorrowedFd<'_>, depth: usize) -> Option<u64> {
    if depth > MAX_DEPTH {
        return None;
    }
    let read = match rfs::openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .and_then(rfs::Dir::read_from)
    {
        Ok(read) => read,
        // Removed while it was measured: empty.
        Err(Errno::NOENT) => return Some(0),
        Err(_) => return None,
    };
    let mut total = 0u64;
    for entry in read {
        let entry = entry.ok()?;
        let name = entry.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        let Ok(st) = rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) else {
            continue;
        };
        total = total.saturating_add(u64::try_from(st.st_size).unwrap_or(0));
        if rfs::FileType::from_raw_mode(st.st_mode) == rfs::FileType::Directory {
            if st.st_mode & 0o500 != 0o500 {
                let mode = Mode::from_raw_mode((st.st_mode & 0o7777) | 0o700);
                // Not its owner: the read below fails, and the tree counts as unmeasurable.
                let _ = rfs::chmodat(dir, name, mode, AtFlags::empty());
            }
            let sub = match rfs::openat(
                dir,
                name,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(sub) => sub,
                // Gone since it was listed (a clone in progress moves things about): nothing to count.
                Err(Errno::NOENT) => continue,
                Err(_) => return None,
            };
            total = total.saturating_add(tree_size(sub.as_fd(), depth + 1)?);
        }
    }
    Some(total)
}

/// Removes a folder and everything in it without following links (std's `remove_dir_all` opens each level
/// with `O_NOFOLLOW`); a missing folder is fine.
fn remove_tree(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// A pool user id: a Discord id, digits only, so it can never name a path.
pub fn check_user(user: &str) -> Result<(), String> {
    if user.is_empty() || user.len() > 20 || !user.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "`{user}` is not a Discord user id: a pool worker serves only Discord users"
        ));
    }
    Ok(())
}

/// A project name: `[A-Za-z0-9._-]{1,64}`, not starting with `.` (so never `.`, `..`, or a hidden folder of
/// the worker's own), with no `/` or `\`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && !name.contains("..")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a project name: use 1 to {MAX_NAME} letters, digits, `.`, `_` or `-`, not starting \
             with `.` (no `/`, `\\` or `..`)"
        ))
    }
}

/// A git URL a project may be cloned from: `https://...`, `ssh://...` or `user@host:path`, of the schemes
/// in `allowed`. Never one git would read as an option (`-...`), a local path or `file://` (unless a test
/// allowed `file`), or a remote helper (`ext::`, `fd::`).
pub fn check_git_url(url: &str, allowed: &[String]) -> Result<(), String> {
    let refuse = |why: &str| {
        Err(format!(
            "`{}` cannot be cloned here: {why}. Give an https:// or ssh:// URL, or git@host:path",
            url.chars().take(200).collect::<String>()
        ))
    };
    if url.len() > MAX_URL {
        return refuse("it is too long");
    }
    if url.starts_with('-') || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return refuse("it is not a URL");
    }
    if url.contains("::") {
        return refuse("remote helpers are not allowed");
    }
    let scheme = if let Some((scheme, rest)) = url.split_once("://") {
        if rest.is_empty() || rest.starts_with('-') {
            return refuse("it names no host");
        }
        scheme.to_ascii_lowercase()
    } else {
        // scp-like `user@host:path`: a host before the first `:`, no `/` in it (else git reads a local path).
        let Some((host, path)) = url.split_once(':') else {
            return refuse("it is not a URL");
        };
        let host_part = host.rsplit('@').next().unwrap_or_default();
        if !host.contains('@') || host.contains('/') || host_part.is_empty() || path.is_empty() {
            return refuse("it is not a URL");
        }
        "ssh".to_owned()
    };
    if !allowed.contains(&scheme) {
        return refuse(&format!("`{scheme}` is not allowed on a pool worker"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_escape_or_hide_are_refused() {
        for good in ["app", "my-app_2", "a.b", "A", &"x".repeat(64)] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "/abs",
            ".hidden",
            "a/b",
            "a\\b",
            "a..b",
            "a b",
            "é",
            &"x".repeat(65),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        for bad in ["", "../1", "1/2", "a", &"1".repeat(21)] {
            assert!(check_user(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn only_https_ssh_and_scp_like_urls_are_cloned() {
        let allowed: Vec<String> = GIT_PROTOCOLS.iter().map(|s| s.to_string()).collect();
        for good in [
            "https://github.com/a/b.git",
            "ssh://git@github.com/a/b.git",
            "git@github.com:a/b.git",
        ] {
            assert!(check_git_url(good, &allowed).is_ok(), "{good}");
        }
        for bad in [
            "file:///etc",
            "/etc",
            "./x",
            "-uhttps://x",
            "--upload-pack=touch /tmp/x",
            "ext::sh -c touch% /tmp/pwned",
            "fd::3",
            "http://example.com/x.git",
            "git://example.com/x.git",
            "https://",
            "https://a b",
            "x:y",
            "a/b@c:d",
        ] {
            assert!(check_git_url(bad, &allowed).is_err(), "{bad:?}");
        }
        assert!(check_git_url("file:///srv/x.git", &["file".into()]).is_ok());
    }
}
