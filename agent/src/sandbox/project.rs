//! The project folder, opened once and bound by descriptor: no window between checking a path and binding it.
//!
//! Checking a path and later handing the same path to bubblewrap leaves a race: whoever can write the
//! project's parent can swap the folder for a symlink (say to `$HOME`) in between, and bubblewrap would bind
//! what the symlink points to, writable. Instead the checked, canonical path is opened with
//! `O_PATH | O_NOFOLLOW | O_DIRECTORY`, the descriptor's real path is read back from `/proc/self/fd` and must
//! still be that path, and bubblewrap binds the descriptor (`--bind-fd`): later swaps change nothing.

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
    /// What was opened is not the folder that was checked.
    #[error("the project folder {} was replaced while the task started (it now leads to {}): the task was not started", path.display(), now.display())]
    Moved { path: PathBuf, now: PathBuf },
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
