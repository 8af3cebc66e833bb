//! Git worktrees for tasks that must not share the project's working tree: one per task, on branch
//! `ct/<task>`, created from the project's HEAD in the agent's own data folder, and merged, kept or discarded
//! once the task is over.
//!
//! Every git operation runs the real `git` CLI through `tokio::process` (never blocking a runtime thread),
//! with hooks switched off: a grantee's task writes the worktree, and nothing it wrote may run outside its
//! sandbox when the agent commits or merges. The project's own working tree is only ever touched by a merge
//! the requester or owner asked for, after `git merge-tree` showed it applies cleanly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;

use ct_protocol::task::{DiffStat, MAX_DIFF_LEN};

/// Why a task could not get a worktree. The message is what the user reads.
#[derive(Debug, thiserror::Error)]
pub enum WorktreeError {
    #[error("{} is not a git repository, so this task runs in the project's own folder (shared with any other task there)", .0.display())]
    NotARepo(PathBuf),
    #[error("the repository has no commit yet, so there is nothing to start a worktree from: commit once, then try again")]
    NoCommit,
    #[error("the repository is in the middle of a {0}: finish or abort it first (`git {0} --continue` or `--abort`); the project was left as it is")]
    Busy(&'static str),
    #[error("HEAD is detached (no branch is checked out), so a task's branch could not be merged back: check out a branch first; the project was left as it is")]
    Detached,
    #[error("a branch named {0} already exists in the project: delete or rename it, or give the task another id; the project was left as it is")]
    BranchExists(String),
    #[error("could not create the worktree: {0}; the project was left as it is")]
    Create(String),
    #[error("git failed: {0}")]
    Git(String),
}

/// One task's worktree: where it is, what it started from, and who may decide its fate.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Worktree {
    /// The task that created it.
    pub task: String,
    /// The project repository's top level (where merges land).
    pub repo: PathBuf,
    /// The worktree's top level.
    pub path: PathBuf,
    /// Its administrative folder inside the project's repository (`.git/worktrees/<task>`), read when it
    /// was created. The agent's git commands in the worktree name it, never discovering it from the
    /// worktree's `.git` file: the task can rewrite that file, to point the agent's git at a repository
    /// whose config runs commands (`core.fsmonitor`) outside the sandbox.
    pub git_dir: PathBuf,
    /// Where the task runs: the worktree's counterpart of the project folder (a project may be a
    /// subfolder of its repository).
    pub cwd: PathBuf,
    pub branch: String,
    /// The commit it was created from; the diff is against it.
    pub base: String,
    /// The requester (Discord id): with the owner, the only one who may merge, keep or discard.
    pub user: String,
    /// Claude Code sessions that ran in it, so a follow-up (`--resume`) finds it.
    pub sessions: Vec<String>,
    /// Follow-up tasks that ran in it.
    pub tasks: Vec<String>,
    /// Unix time the last task in it ended (for retention); `None` while one runs.
    pub ended: Option<u64>,
}

/// A new worktree and what the user should know about its start.
#[derive(Debug)]
pub struct Created {
    pub worktree: Worktree,
    pub note: Option<String>,
}

/// The agent's worktrees, by the task that created them, kept in `index.json` under their folder so a
/// restarted agent still knows them (for follow-ups, merges and retention). Nothing is held locked across an
/// await, except the save lock, which orders writes of the index.
#[derive(Debug)]
pub struct Worktrees {
    root: PathBuf,
    by_task: Mutex<HashMap<String, Worktree>>,
    saving: tokio::sync::Mutex<()>,
}

const INDEX: &str = "index.json";

impl Worktrees {
    /// The worktrees under `root` (inside the agent's data folder, which is 0700), as the index last saved
    /// them. Read once at start, before any task runs: none of them is in use, so each counts as ended.
    pub fn load(root: PathBuf) -> Self {
        let mut by_task: HashMap<String, Worktree> = match std::fs::read(root.join(INDEX)) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "the worktree index is unreadable; starting without it");
                HashMap::new()
            }),
            Err(_) => HashMap::new(),
        };
        let now = crate::config::unix_now();
        for w in by_task.values_mut() {
            w.ended.get_or_insert(now);
        }
        Self {
            root,
            by_task: Mutex::new(by_task),
            saving: tokio::sync::Mutex::new(()),
        }
    }

    /// Writes the index (atomically, off the runtime threads). A failure is logged: the worktrees still
    /// work until the agent restarts.
    async fn save(&self) {
        let _order = self.saving.lock().await;
        let bytes = match serde_json::to_vec_pretty(&*self.map()) {
            Ok(b) => b,
            Err(e) => return tracing::warn!(error = %e, "cannot encode the worktree index"),
        };
        let root = self.root.clone();
        let written = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
            crate::config::write_atomic(&root, INDEX, &bytes, 0o600).map_err(|e| e.to_string())
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot save the worktree index"),
            Err(e) => tracing::warn!(error = %e, "cannot save the worktree index"),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Worktree>> {
        self.by_task.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The worktree a task (its creator or a follow-up) ran in.
    pub fn of_task(&self, task: &str) -> Option<Worktree> {
        let map = self.map();
        map.get(task)
            .or_else(|| map.values().find(|w| w.tasks.iter().any(|t| t == task)))
            .cloned()
    }

    /// The worktree a Claude Code session ran in, for a follow-up that resumes it.
    pub fn of_session(&self, session: &str) -> Option<Worktree> {
        self.map()
            .values()
            .find(|w| w.sessions.iter().any(|s| s == session))
            .cloned()
    }

    /// Notes, at once, that `task` (a follow-up) runs in the worktree created by `owner_task`: from here on
    /// retention leaves it alone. [`Worktrees::add_task`] saves it.
    pub fn claim(&self, owner_task: &str, task: &str) {
        if let Some(w) = self.map().get_mut(owner_task) {
            if w.task != task && !w.tasks.iter().any(|t| t == task) {
                w.tasks.push(task.to_owned());
            }
            w.ended = None;
        }
    }

    /// [`Worktrees::claim`], saved.
    pub async fn add_task(&self, owner_task: &str, task: &str) {
        self.claim(owner_task, task);
        self.save().await;
    }

    /// Notes that Claude Code session `session` runs in `owner_task`'s worktree.
    pub async fn add_session(&self, owner_task: &str, session: &str) {
        let added = match self.map().get_mut(owner_task) {
            Some(w) if !w.sessions.iter().any(|s| s == session) => {
                w.sessions.push(session.to_owned());
                true
            }
            _ => false,
        };
        if added {
            self.save().await;
        }
    }

    /// Notes that the last task in `owner_task`'s worktree ended now.
    pub async fn ended(&self, owner_task: &str) {
        if let Some(w) = self.map().get_mut(owner_task) {
            w.ended = Some(crate::config::unix_now());
        }
        self.save().await;
    }

    /// Forgets a worktree (after it was removed).
    pub async fn forget(&self, owner_task: &str) {
        self.map().remove(owner_task);
        self.save().await;
    }

    /// Worktrees whose last task ended more than `retention_secs` ago.
    pub fn expired(&self, retention_secs: u64) -> Vec<Worktree> {
        let now = crate::config::unix_now();
        self.map()
            .values()
            .filter(|w| {
                w.ended
                    .is_some_and(|e| now.saturating_sub(e) >= retention_secs)
            })
            .cloned()
            .collect()
    }

    /// Whether `task`'s worktree is still past its retention now (no follow-up claimed it since it was
    /// listed by [`Worktrees::expired`]).
    pub fn still_expired(&self, task: &str, retention_secs: u64) -> bool {
        let now = crate::config::unix_now();
        self.map().get(task).is_some_and(|w| {
            w.ended
                .is_some_and(|e| now.saturating_sub(e) >= retention_secs)
        })
    }

    /// Creates worktree and branch `ct/<task>` from the HEAD of the repository holding `project`, for
    /// `user`. On any failure nothing is left behind and the project is untouched.
    pub async fn create(
        &self,
        project: &Path,
        task: &str,
        user: &str,
    ) -> Result<Created, WorktreeError> {
        let repo = match git(project, &["rev-parse", "--show-toplevel"]).await {
            Ok(out) if out.ok => PathBuf::from(out.stdout.trim()),
            _ => return Err(WorktreeError::NotARepo(project.to_path_buf())),
        };
        let prefix = git_ok(project, &["rev-parse", "--show-prefix"]).await?;
        let prefix = prefix.trim().to_owned();
        for (marker, what) in [
            ("rebase-merge", "rebase"),
            ("rebase-apply", "rebase"),
            ("MERGE_HEAD", "merge"),
            ("CHERRY_PICK_HEAD", "cherry-pick"),
            ("REVERT_HEAD", "revert"),
        ] {
            let path = git_ok(&repo, &["rev-parse", "--git-path", marker]).await?;
            let path = repo.join(path.trim());
            if tokio::fs::symlink_metadata(&path).await.is_ok() {
                return Err(WorktreeError::Busy(what));
            }
        }
        if !git(&repo, &["symbolic-ref", "-q", "HEAD"]).await?.ok {
            return Err(WorktreeError::Detached);
        }
        let head = git(&repo, &["rev-parse", "--verify", "-q", "HEAD^{commit}"]).await?;
        if !head.ok {
            return Err(WorktreeError::NoCommit);
        }
        let base = head.stdout.trim().to_owned();
        let branch = format!("ct/{task}");
        let exists = git(
            &repo,
            &[
                "show-ref",
                "--verify",
                "-q",
                &format!("refs/heads/{branch}"),
            ],
        )
        .await?;
        if exists.ok {
            return Err(WorktreeError::BranchExists(branch));
        }
        let dirty = git_ok(
            &repo,
            &["status", "--porcelain", "--untracked-files=normal"],
        )
        .await?;
        let short = &base[..base.len().min(10)];
        let note = (!dirty.trim().is_empty()).then(|| {
            format!(
                "the project has uncommitted changes: this task's worktree starts from the last commit \
                 ({short}) and does not include them"
            )
        });

        tokio::fs::create_dir_all(&self.root)
            .await
            .map_err(|e| WorktreeError::Create(format!("{}: {e}", self.root.display())))?;
        let path = self.root.join(task);
        let path_str = path.display().to_string();
        let added = git(
            &repo,
            &["worktree", "add", "-q", "-b", &branch, &path_str, &base],
        )
        .await?;
        if !added.ok {
            // Whatever half of it exists goes: the folder, the administrative entry, the branch.
            let _ = tokio::fs::remove_dir_all(&path).await;
            let _ = git(&repo, &["worktree", "prune"]).await;
            let _ = git(&repo, &["branch", "-D", &branch]).await;
            return Err(WorktreeError::Create(added.stderr.trim().to_owned()));
        }
        let path = tokio::fs::canonicalize(&path)
            .await
            .map_err(|e| WorktreeError::Create(e.to_string()))?;
        // Read now, before any task ran there.
        let git_dir = git_ok(&path, &["rev-parse", "--absolute-git-dir"])
            .await
            .map(|d| PathBuf::from(d.trim()))?;
        let cwd = if prefix.is_empty() {
            path.clone()
        } else {
            path.join(prefix.trim_end_matches('/'))
        };
        let worktree = Worktree {
            task: task.to_owned(),
            repo,
            path,
            git_dir,
            cwd,
            branch,
            base,
            user: user.to_owned(),
            sessions: Vec::new(),
            tasks: Vec::new(),
            ended: None,
        };
        self.map().insert(task.to_owned(), worktree.clone());
        self.save().await;
        Ok(Created { worktree, note })
    }
}

/// What a task changed in its worktree: everything it left is committed on its branch first (so a merge
/// takes it), then compared with where it started.
pub async fn summarize(
    w: &Worktree,
    finished_task: &str,
) -> Result<(DiffStat, String, bool), WorktreeError> {
    let gd = format!("--git-dir={}", w.git_dir.display());
    let wt = format!("--work-tree={}", w.path.display());
    let tree = |args: &[&'static str]| -> Vec<String> {
        [gd.as_str(), wt.as_str()]
            .iter()
            .chain(args)
            .map(|s| s.to_string())
            .collect()
    };
    let run = |args: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        git_ok(&w.path, &args).await
    };
    let status = run(tree(&["status", "--porcelain"])).await?;
    if !status.trim().is_empty() {
        run(tree(&["add", "-A"])).await?;
        let message = format!("CodeTogether task {finished_task}");
        // The identity comes from the project's repository, never from the worktree.
        let mut args = identity(&w.repo).await;
        args.extend(tree(&["commit", "-q", "--no-verify", "-m"]));
        args.push(message);
        run(args).await?;
    }
    let range = format!("{}..{}", w.base, w.branch);
    let numstat = git_ok(&w.repo, &["diff", "--numstat", &range]).await?;
    let mut stat = DiffStat::default();
    for line in numstat.lines() {
        let mut cols = line.split('\t');
        let ins = cols.next().and_then(|c| c.parse::<u32>().ok()).unwrap_or(0);
        let del = cols.next().and_then(|c| c.parse::<u32>().ok()).unwrap_or(0);
        stat.files_changed += 1;
        stat.insertions += ins;
        stat.deletions += del;
    }
    let diff = git_ok(&w.repo, &["diff", "--binary", &range]).await?;
    let cut = diff.len() > MAX_DIFF_LEN;
    let diff = if cut {
        let mut at = MAX_DIFF_LEN;
        while !diff.is_char_boundary(at) {
            at -= 1;
        }
        diff[..at].to_owned()
    } else {
        diff
    };
    Ok((stat, diff, cut))
}

/// How a merge went.
#[derive(Debug, PartialEq, Eq)]
pub enum Merged {
    FastForward,
    MergeCommit,
    /// Nothing changed: these files conflict.
    Conflict(Vec<String>),
}

/// Merges `w`'s branch into the branch checked out in the project: tried first with `git merge-tree`
/// (which touches neither the index nor the working tree), so a conflict changes nothing.
pub async fn merge(w: &Worktree) -> Result<Merged, WorktreeError> {
    if !git(&w.repo, &["symbolic-ref", "-q", "HEAD"]).await?.ok {
        return Err(WorktreeError::Detached);
    }
    let trial = git(
        &w.repo,
        &[
            "merge-tree",
            "--write-tree",
            "--name-only",
            "--no-messages",
            "HEAD",
            &w.branch,
        ],
    )
    .await?;
    match trial.code {
        Some(0) => {}
        Some(1) => {
            let files = trial
                .stdout
                .lines()
                .skip(1)
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect();
            return Ok(Merged::Conflict(files));
        }
        _ => return Err(WorktreeError::Git(trial.stderr.trim().to_owned())),
    }
    let ff = git(&w.repo, &["merge-base", "--is-ancestor", "HEAD", &w.branch])
        .await?
        .ok;
    let message = format!("Merge CodeTogether task {}", w.task);
    let mut args = identity(&w.repo).await;
    let tail: &[&str] = if ff {
        &["merge", "-q", "--ff-only", "--no-verify", &w.branch]
    } else {
        &[
            "merge",
            "-q",
            "--no-ff",
            "--no-verify",
            "-m",
            &message,
            &w.branch,
        ]
    };
    args.extend(tail.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = git(&w.repo, &args).await?;
    if !out.ok {
        // Uncommitted changes in the project in the way, say: leave it as it was.
        let merging = git(&w.repo, &["rev-parse", "-q", "--verify", "MERGE_HEAD"]).await?;
        if merging.ok {
            let _ = git(&w.repo, &["merge", "--abort"]).await;
        }
        return Err(WorktreeError::Git(format!(
            "the merge did not apply and the project was left as it was: {}",
            first_lines(&out.stderr, 6)
        )));
    }
    Ok(if ff {
        Merged::FastForward
    } else {
        Merged::MergeCommit
    })
}

/// Removes `w`'s worktree folder (and its entry in the repository), and its branch when `branch` is set.
pub async fn remove(w: &Worktree, branch: bool) -> Result<(), WorktreeError> {
    let path = w.path.display().to_string();
    if tokio::fs::symlink_metadata(&w.path).await.is_ok() {
        let removed = git(&w.repo, &["worktree", "remove", "--force", &path]).await?;
        if !removed.ok {
            // Git refuses a worktree whose `.git` file the task changed: the folder goes anyway.
            tokio::fs::remove_dir_all(&w.path)
                .await
                .map_err(|e| WorktreeError::Git(format!("cannot remove {path}: {e}")))?;
        }
    }
    let _ = git(&w.repo, &["worktree", "prune"]).await;
    if branch {
        git_ok(&w.repo, &["branch", "-D", &w.branch]).await?;
    }
    Ok(())
}

/// `-c user.name=... -c user.email=...` when the repository has no identity of its own, so committing a
/// task's work never fails for want of one.
async fn identity(dir: &Path) -> Vec<String> {
    let has = git(dir, &["config", "--get", "user.email"])
        .await
        .is_ok_and(|o| o.ok);
    let mut args = vec!["-c".to_owned(), "core.hooksPath=/dev/null".to_owned()];
    if !has {
        args.extend([
            "-c".to_owned(),
            "user.name=CodeTogether".to_owned(),
            "-c".to_owned(),
            "user.email=ct-agent@localhost".to_owned(),
        ]);
    }
    args
}

fn first_lines(text: &str, n: usize) -> String {
    text.trim().lines().take(n).collect::<Vec<_>>().join(" / ")
}

/// A finished git command.
#[derive(Debug)]
struct Out {
    ok: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `git -C dir args`: no prompts, no pager, hooks off, plain English messages.
async fn git(dir: &Path, args: &[&str]) -> Result<Out, WorktreeError> {
    let out = tokio::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "core.hooksPath=/dev/null"])
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("LC_ALL", "C")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| WorktreeError::Git(format!("cannot run git: {e}")))?;
    Ok(Out {
        ok: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// [`git`], its stdout when it succeeded.
async fn git_ok(dir: &Path, args: &[&str]) -> Result<String, WorktreeError> {
    let out = git(dir, args).await?;
    if out.ok {
        Ok(out.stdout)
    } else {
        Err(WorktreeError::Git(format!(
            "git {}: {}",
            args.first().unwrap_or(&""),
            first_lines(&out.stderr, 6)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(dir: &Path, args: &[&str]) -> String {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn repo() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let repo = std::fs::canonicalize(dir.path()).unwrap().join("repo");
        std::fs::create_dir(&repo).unwrap();
        sh(&repo, &["init", "-q", "-b", "main"]);
        sh(&repo, &["config", "user.name", "T"]);
        sh(&repo, &["config", "user.email", "t@example.com"]);
        std::fs::write(repo.join("a.txt"), "a\n").unwrap();
        sh(&repo, &["add", "a.txt"]);
        sh(&repo, &["commit", "-q", "-m", "one"]);
        (dir, repo)
    }

    fn status(repo: &Path) -> (String, String) {
        (
            sh(repo, &["rev-parse", "HEAD"]),
            sh(repo, &["status", "--porcelain"]),
        )
    }

    #[tokio::test]
    async fn an_existing_branch_name_is_refused_and_nothing_is_created() {
        let (dir, repo) = repo();
        sh(&repo, &["branch", "ct/t_1"]);
        let before = status(&repo);
        let trees = Worktrees::load(dir.path().join("wt"));
        let err = trees.create(&repo, "t_1", "1").await.unwrap_err();
        assert!(matches!(err, WorktreeError::BranchExists(ref b) if b == "ct/t_1"));
        assert!(err.to_string().contains("already exists"));
        assert!(!dir.path().join("wt/t_1").exists());
        assert_eq!(status(&repo), before);
        assert!(trees.of_task("t_1").is_none());
    }

    #[tokio::test]
    async fn a_failed_create_leaves_no_branch_and_no_folder() {
        let (dir, repo) = repo();
        let before = status(&repo);
        // Where the worktree should go is a file: `git worktree add` fails as it would on a full disk.
        let root = dir.path().join("wt");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("t_2"), "in the way").unwrap();
        let trees = Worktrees::load(root);
        let err = trees.create(&repo, "t_2", "1").await.unwrap_err();
        assert!(matches!(err, WorktreeError::Create(_)), "{err}");
        assert_eq!(sh(&repo, &["branch", "--list", "ct/*"]), "");
        assert_eq!(status(&repo), before);
    }

    #[tokio::test]
    async fn a_diverged_branch_merges_with_a_merge_commit_and_is_removed() {
        let (dir, repo) = repo();
        let trees = Worktrees::load(dir.path().join("wt"));
        let w = trees.create(&repo, "t_3", "1").await.unwrap().worktree;
        std::fs::write(w.path.join("b.txt"), "b\n").unwrap();
        let (stat, diff, cut) = summarize(&w, "t_3").await.unwrap();
        assert_eq!(
            (stat.files_changed, stat.insertions, stat.deletions, cut),
            (1, 1, 0, false)
        );
        assert!(diff.contains("+b"), "{diff}");
        // The project moves on meanwhile.
        std::fs::write(repo.join("c.txt"), "c\n").unwrap();
        sh(&repo, &["add", "c.txt"]);
        sh(&repo, &["commit", "-q", "-m", "two"]);
        assert_eq!(merge(&w).await.unwrap(), Merged::MergeCommit);
        assert!(repo.join("b.txt").exists() && repo.join("c.txt").exists());
        assert_eq!(sh(&repo, &["rev-list", "--count", "HEAD^@"]), "3");
        remove(&w, true).await.unwrap();
        assert!(!w.path.exists());
        assert_eq!(sh(&repo, &["branch", "--list", "ct/*"]), "");
    }

    #[tokio::test]
    async fn a_hook_the_task_wrote_never_runs_when_the_agent_commits_or_merges() {
        use std::os::unix::fs::PermissionsExt as _;
        let (dir, repo) = repo();
        // The project uses hooks from its own tree, as husky sets it up: a task can write them.
        sh(&repo, &["config", "core.hooksPath", ".husky"]);
        let trees = Worktrees::load(dir.path().join("wt"));
        let w = trees.create(&repo, "t_4", "1").await.unwrap().worktree;
        let marker = dir.path().join("hook-ran");
        std::fs::create_dir(w.path.join(".husky")).unwrap();
        for hook in [
            "pre-commit",
            "commit-msg",
            "post-commit",
            "pre-merge-commit",
            "post-merge",
        ] {
            let path = w.path.join(".husky").join(hook);
            std::fs::write(&path, format!("#!/bin/sh\ntouch {}\n", marker.display())).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        summarize(&w, "t_4").await.unwrap();
        assert_eq!(sh(&w.path, &["status", "--porcelain"]), "", "committed");
        assert_eq!(merge(&w).await.unwrap(), Merged::FastForward);
        assert!(
            !marker.exists(),
            "a hook from the task's tree ran outside its sandbox"
        );
    }

    #[tokio::test]
    async fn a_git_file_the_task_rewrote_never_redirects_the_agents_git() {
        use std::os::unix::fs::PermissionsExt as _;
        let (dir, repo) = repo();
        let trees = Worktrees::load(dir.path().join("wt"));
        let w = trees.create(&repo, "t_5", "1").await.unwrap().worktree;
        // The task builds a repository of its own inside its worktree, whose config runs a command on any
        // `git status`, and points the worktree's `.git` file at it.
        let marker = dir.path().join("fsmonitor-ran");
        let evil = w.path.join("evil");
        sh(&w.path, &["init", "-q", "--bare", evil.to_str().unwrap()]);
        let script = w.path.join("run.sh");
        std::fs::write(&script, format!("#!/bin/sh\ntouch {}\n", marker.display())).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        sh(
            &evil,
            &["config", "core.fsmonitor", script.to_str().unwrap()],
        );
        sh(&evil, &["config", "core.bare", "false"]);
        std::fs::write(w.path.join(".git"), format!("gitdir: {}\n", evil.display())).unwrap();
        std::fs::write(w.path.join("work.txt"), "work\n").unwrap();

        let (stat, _, _) = summarize(&w, "t_5").await.unwrap();
        assert!(
            !marker.exists(),
            "the task's git config ran a command outside its sandbox"
        );
        assert!(stat.files_changed >= 1, "{stat:?}");
        // The work is on the task's branch of the project's repository.
        let files = sh(&repo, &["ls-tree", "-r", "--name-only", &w.branch]);
        assert!(files.lines().any(|f| f == "work.txt"), "{files}");
        remove(&w, true).await.unwrap();
        assert!(!w.path.exists());
        assert_eq!(sh(&repo, &["branch", "--list", "ct/*"]), "");
    }
}
