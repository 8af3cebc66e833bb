//! The project folder, opened once and bound by descriptor: no window between checking a path and binding it.
//!
//! Checking a path and later handing the same path to bubblewrap leaves a race: whoever can write the
//! project's parent can swap the folder for a symlink (say to `$HOME`) in between, and bubblewrap would bind
//! what the symlink points to, writable. Instead the checked, canonical path is opened with
//! `O_PATH | O_NOFOLLOW | O_DIRECTORY`, the descriptor's real path is read back from `/proc/self/fd` and must
//! still be that path, and bubblewrap binds the descriptor (`--bind-fd`): later swaps change nothing.
//!
//! A grantee's task may change the project's files, which its owner sees in a diff; it must not change what
//! runs as the owner later without showing in one: git's hooks and config (`core.fsmonitor` runs on every
//! `git status`) and Claude Code's project settings and hooks. Those entries ([`RUNS_AS_OWNER`]) are opened the
//! same way, relative to the project's descriptor, and bound read-only over the writable project
//! ([`ProjectDir::protected`]).

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd as _, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why the project folder could not be opened as checked.
#[derive(Debug, thiserror::Error)]
pub enum ProjectError {
    /// Opening failed (a symlink now stands there: `ELOOP`/`ENOTDIR`; or it is gone).
    #[error("cannot open the project folder {} without following links: {source}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    /// An entry that runs as the owner later is a symbolic link: binding it would bind wherever it points.
    #[error("{} in the project is a symbolic link, so a shared task cannot be kept from changing what it leads to: replace the link with the real folder or file, or run the task yourself", path.display())]
    Linked { path: PathBuf },
    /// What was opened is not the folder that was checked.
    #[error("the project folder {} was replaced while the task started (it now leads to {}): the task was not started", path.display(), now.display())]
    Moved { path: PathBuf, now: PathBuf },
}

/// Entries of a project whose contents run as its owner later without showing in a diff: git's hooks and config,
/// Claude Code's project settings (hooks, permissions) and its project MCP servers.
pub const RUNS_AS_OWNER: &[&str] = &[".git", ".claude", ".mcp.json"];

/// One of [`RUNS_AS_OWNER`] in a project, opened without following a link, to be bound read-only.
#[derive(Debug, Clone)]
pub struct Protected {
    /// Where it is (and is bound, inside the sandbox).
    pub path: PathBuf,
    fd: Arc<OwnedFd>,
}

impl Protected {
    /// The descriptor bubblewrap binds (and closes).
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The descriptor, for the child process that must inherit it.
    pub fn shared_fd(&self) -> Arc<OwnedFd> {
        self.fd.clone()
    }
}

/// An open project folder: its canonical path and an `O_PATH` descriptor on it.
#[derive(Debug, Clone)]
pub struct ProjectDir {
    path: PathBuf,
    fd: Arc<OwnedFd>,
}

impl ProjectDir {
    /// Opens `canonical` (already resolved and checked by the policy) without following a symlink in its
    /// place, and checks that the descriptor's real path is still `canonical`.
    pub fn open(canonical: &Path) -> Result<Self, ProjectError> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(canonical)
            .map_err(|source| ProjectError::Open {
                path: canonical.to_path_buf(),
                source,
            })?;
        let fd = OwnedFd::from(file);
        let now =
            std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(|source| {
                ProjectError::Open {
                    path: canonical.to_path_buf(),
                    source,
                }
            })?;
        if now != canonical {
            return Err(ProjectError::Moved {
                path: canonical.to_path_buf(),
                now,
            });
        }
        Ok(Self {
            path: canonical.to_path_buf(),
            fd: Arc::new(fd),
        })
    }

    /// The path it was opened at (where it is bound inside the sandbox).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The descriptor bubblewrap binds.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The descriptor, for a child process that must inherit it.
    pub fn shared_fd(&self) -> Arc<OwnedFd> {
        self.fd.clone()
    }

    /// The project's [`RUNS_AS_OWNER`] entries, each opened relative to the project's descriptor without
    /// following a link. `.claude` is created (empty) when missing, or the task could create it with hooks in
    /// it; a missing `.git` or `.mcp.json` stays missing (a new `.git` is a new repository the owner would have
    /// to choose to use; a new `.mcp.json` shows in the project's files and its servers need the owner's
    /// approval in Claude Code).
    pub fn protected(&self) -> Result<Vec<Protected>, ProjectError> {
        let mut found = Vec::new();
        for name in RUNS_AS_OWNER {
            let path = self.path.join(name);
            let via_fd = format!("/proc/self/fd/{}/{name}", self.fd.as_raw_fd());
            if *name == ".claude" {
                match std::fs::create_dir(&via_fd) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(source) => return Err(ProjectError::Open { path, source }),
                }
            }
            let file = match OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&via_fd)
            {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(ProjectError::Open { path, source }),
            };
            // With O_PATH | O_NOFOLLOW a symlink opens as itself.
            let meta = file.metadata().map_err(|source| ProjectError::Open {
                path: path.clone(),
                source,
            })?;
            if meta.file_type().is_symlink() {
                return Err(ProjectError::Linked { path });
            }
            found.push(Protected {
                path,
                fd: Arc::new(OwnedFd::from(file)),
            });
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_runs_as_the_owner_is_found_and_a_link_in_its_place_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let project = std::fs::canonicalize(tmp.path()).unwrap();
        std::fs::create_dir_all(project.join(".git/hooks")).unwrap();
        let dir = ProjectDir::open(&project).unwrap();
        let names: Vec<PathBuf> = dir
            .protected()
            .unwrap()
            .into_iter()
            .map(|p| p.path)
            .collect();
        assert_eq!(names, [project.join(".git"), project.join(".claude")]);
        assert!(
            project.join(".claude").is_dir(),
            "created so that it can be bound"
        );
        std::fs::remove_dir(project.join(".claude")).unwrap();
        std::os::unix::fs::symlink(tmp.path(), project.join(".claude")).unwrap();
        let err = dir.protected().unwrap_err();
        assert!(matches!(err, ProjectError::Linked { .. }), "{err}");
    }

    #[test]
    fn a_symlink_in_place_of_the_folder_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(tmp.path()).unwrap();
        let real = root.join("app");
        std::fs::create_dir(&real).unwrap();
        let opened = ProjectDir::open(&real).unwrap();
        assert_eq!(opened.path(), real);

        // The checked path is now a symlink to elsewhere: O_NOFOLLOW refuses it.
        std::fs::rename(&real, root.join("app.real")).unwrap();
        std::os::unix::fs::symlink(root.join("elsewhere"), &real).unwrap();
        std::fs::create_dir(root.join("elsewhere")).unwrap();
        let err = ProjectDir::open(&real).unwrap_err();
        assert!(matches!(err, ProjectError::Open { .. }), "{err}");

        // A parent swapped for a symlink: the final component is a real folder, but not the checked one.
        let parent = root.join("parent");
        std::fs::create_dir_all(root.join("other/app")).unwrap();
        std::os::unix::fs::symlink(root.join("other"), &parent).unwrap();
        let err = ProjectDir::open(&parent.join("app")).unwrap_err();
        assert!(matches!(err, ProjectError::Moved { .. }), "{err}");

        // The descriptor opened before the swap still names the original folder.
        assert_eq!(
            std::fs::read_link(format!("/proc/self/fd/{}", opened.fd())).unwrap(),
            root.join("app.real")
        );
    }
}
