//! Tasks in git worktrees, end to end: real git, the real relay and agent, the real Claude Code CLI on the
//! fake Messages API. Two tasks at once in one project each write the same file in their own worktree; the
//! summary shows each branch's diff; merging the first fast-forwards, the second conflicts and changes nothing;
//! discarding removes worktree and branch; a follow-up resumes in its worktree.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::tasks::{
    claude_processes, prompts_in_last_request, submit, world_with, write, Follow, Opts, World,
    OWNER, T,
};
use ct_agent::projects::{Host, Policy};
use ct_protocol::task::{DiffStat, FinalState, Isolation, TaskEvent, TaskOptions, WorktreeAction};
use ct_testkit::process::poll_until;
use ct_testkit::Reply;
use serde_json::Value;

pub(crate) fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The world's project as a git repository with one commit on `main`.
pub(crate) fn repo(w: &World) {
    git(&w.project, &["init", "-q", "-b", "main"]);
    git(&w.project, &["config", "user.name", "Test"]);
    git(&w.project, &["config", "user.email", "test@example.com"]);
    std::fs::write(w.project.join("README"), "hello\n").unwrap();
    git(&w.project, &["add", "README"]);
    git(&w.project, &["commit", "-q", "-m", "first"]);
}

fn in_worktree() -> TaskOptions {
    TaskOptions {
        permission_mode: Some("acceptEdits".into()),
        isolation: Some(Isolation::Worktree),
        ..TaskOptions::default()
    }
}

/// Where the agent puts task `task`'s worktree: its own data folder.
pub(crate) fn worktree_of(w: &World, task: &str) -> PathBuf {
    std::fs::canonicalize(w.agent_dir())
        .unwrap()
        .join("worktrees")
        .join(task)
}

/// A model turn for whichever task asks: the first request of a conversation whose prompt carries `marker`
/// writes `file` with `content`; once the tool result is back, it says it is done.
fn write_for(markers: Vec<(String, PathBuf, String)>) -> Reply {
    Reply::with(move |body: &Value| {
        let text = body["messages"].to_string();
        let answered = text.contains("tool_result");
        for (marker, file, content) in &markers {
            if text.contains(marker.as_str()) && !answered {
                return Reply::tool_use("Write", write(file, content));
            }
        }
        Reply::text("done")
    })
}

async fn worktree_end(f: &mut Follow) -> (String, DiffStat, String) {
    match f
        .until("the worktree summary", |e| {
            matches!(
                e,
                TaskEvent::Worktree {
                    change: Some(_),
                    ..
                }
            )
        })
        .await
    {
        TaskEvent::Worktree {
            branch,
            change: Some(change),
            diff: Some(diff),
            ..
        } => (branch, change, diff),
        other => panic!("{other:?}"),
    }
}

fn branches(dir: &Path) -> String {
    git(dir, &["branch", "--list", "ct/*"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_tasks_in_worktrees_do_not_collide_and_merge_back() {
    let mut w = world_with(Opts::default()).await;
    repo(&w);
    let head = git(&w.project, &["rev-parse", "HEAD"]);
    let core = &w.relay.core;

    let a = core
        .submit_task(submit(
            OWNER,
            "app",
            "marker-A: write same.txt",
            in_worktree(),
        ))
        .await
        .expect("accepted");
    let b = core
        .submit_task(submit(
            OWNER,
            "app",
            "marker-B: write same.txt",
            in_worktree(),
        ))
        .await
        .expect("accepted");
    let (ta, tb) = (a.spec.task.clone(), b.spec.task.clone());
    let (wa, wb) = (worktree_of(&w, &ta), worktree_of(&w, &tb));
    let markers = vec![
        (
            "marker-A".to_string(),
            wa.join("same.txt"),
            "from A\n".to_string(),
        ),
        (
            "marker-B".to_string(),
            wb.join("same.txt"),
            "from B\n".to_string(),
        ),
    ];
    for _ in 0..4 {
        w.fake.push(write_for(markers.clone()));
    }
    let (mut fa, mut fb) = (w.follow(&ta).await, w.follow(&tb).await);
    // The summary (before the end) names each branch and its change against where it started.
    let (branch_a, stat_a, diff_a) = worktree_end(&mut fa).await;
    let (branch_b, _, diff_b) = worktree_end(&mut fb).await;
    assert_eq!(fa.finished().await.0, FinalState::Done, "{:#?}", fa.seen);
    assert_eq!(fb.finished().await.0, FinalState::Done, "{:#?}", fb.seen);

    // Each wrote its own file, in its own worktree; the project's tree has neither.
    assert_eq!(
        std::fs::read_to_string(wa.join("same.txt")).unwrap(),
        "from A\n"
    );
    assert_eq!(
        std::fs::read_to_string(wb.join("same.txt")).unwrap(),
        "from B\n"
    );
    assert!(!w.project.join("same.txt").exists());
    assert_eq!(git(&w.project, &["status", "--porcelain"]), "");

    assert_eq!(branch_a, format!("ct/{ta}"));
    assert_eq!(
        stat_a,
        DiffStat {
            files_changed: 1,
            insertions: 1,
            deletions: 0
        }
    );
    assert!(diff_a.contains("+from A"), "{diff_a}");
    assert_eq!(branch_b, format!("ct/{tb}"));
    assert!(diff_b.contains("+from B"), "{diff_b}");
    assert_eq!(
        core.task(&ta).await.unwrap().worktree,
        Some(branch_a.clone())
    );

    // A restarted agent still knows its worktrees.
    w.restart_agent().await;
    let core = &w.relay.core;

    // Someone who is neither the requester nor the owner cannot decide.
    assert!(core
        .worktree("999", &ta, WorktreeAction::Discard)
        .await
        .is_err());
    assert!(wa.exists());

    // Merging the first fast-forwards the project's branch, and removes its worktree and branch.
    let merged = core
        .worktree(OWNER, &ta, WorktreeAction::Merge)
        .await
        .unwrap();
    assert!(merged.ok, "{merged:?}");
    assert!(merged.message.contains("fast-forward"), "{merged:?}");
    assert_eq!(
        std::fs::read_to_string(w.project.join("same.txt")).unwrap(),
        "from A\n"
    );
    assert_eq!(git(&w.project, &["rev-parse", "HEAD~1"]), head);
    assert!(!wa.exists());
    assert!(!branches(&w.project).contains(&branch_a));

    let audit = core
        .audit(&ct_relay::audit::AuditFilter::default(), 50, None)
        .await
        .unwrap();
    assert!(
        audit.iter().any(|e| matches!(
            &e.kind,
            ct_relay::audit::AuditKind::WorktreeDecided { action, ok: true, .. } if action == "merge"
        ) && e.task.as_deref() == Some(ta.as_str())),
        "the merge is audited: {audit:#?}"
    );

    // The second conflicts: reported with the file, nothing changed.
    let before = git(&w.project, &["rev-parse", "HEAD"]);
    let conflict = core
        .worktree(OWNER, &tb, WorktreeAction::Merge)
        .await
        .unwrap();
    assert!(!conflict.ok, "{conflict:?}");
    assert_eq!(conflict.conflicts, vec!["same.txt".to_string()]);
    assert_eq!(git(&w.project, &["rev-parse", "HEAD"]), before);
    assert_eq!(git(&w.project, &["status", "--porcelain"]), "");
    assert_eq!(
        std::fs::read_to_string(w.project.join("same.txt")).unwrap(),
        "from A\n"
    );
    assert!(wb.exists());

    // Keeping leaves both where they are.
    let kept = core
        .worktree(OWNER, &tb, WorktreeAction::Keep)
        .await
        .unwrap();
    assert!(kept.ok && kept.message.contains(&branch_b), "{kept:?}");
    assert!(wb.exists() && branches(&w.project).contains(&branch_b));

    // Discarding removes its worktree and its branch.
    let discarded = core
        .worktree(OWNER, &tb, WorktreeAction::Discard)
        .await
        .unwrap();
    assert!(discarded.ok, "{discarded:?}");
    assert!(!wb.exists());
    assert_eq!(branches(&w.project), "");
    assert_eq!(git(&w.project, &["worktree", "list"]).lines().count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_repositories_get_a_clear_message_and_stay_untouched() {
    let w = world_with(Opts::default()).await;

    // Not a repository: said so, and the task runs in the project's own folder.
    w.fake.push(Reply::text("done"));
    let mut f = w.start(submit(OWNER, "app", "hi", in_worktree())).await;
    let said = f
        .until(
            "the note",
            |e| matches!(e, TaskEvent::Text { text } if text.contains("not a git repository")),
        )
        .await;
    assert!(format!("{said:?}").contains("runs in the project's own folder"));
    assert_eq!(f.finished().await.0, FinalState::Done);

    repo(&w);
    // Uncommitted changes: the worktree starts from HEAD and says so; the change stays in the project only.
    std::fs::write(w.project.join("README"), "edited\n").unwrap();
    w.fake.push(Reply::text("done"));
    let mut f = w.start(submit(OWNER, "app", "hi", in_worktree())).await;
    let note = f
        .until("the start note", |e| {
            matches!(e, TaskEvent::Worktree { change: None, .. })
        })
        .await;
    assert!(
        format!("{note:?}").contains("uncommitted changes"),
        "{note:?}"
    );
    assert_eq!(f.finished().await.0, FinalState::Done);
    assert_eq!(
        std::fs::read_to_string(w.project.join("README")).unwrap(),
        "edited\n"
    );
    git(&w.project, &["checkout", "--", "README"]);

    // Detached HEAD: refused with a message, nothing created.
    let head = git(&w.project, &["rev-parse", "HEAD"]);
    git(&w.project, &["checkout", "-q", "--detach", &head]);
    let mut f = w.start(submit(OWNER, "app", "hi", in_worktree())).await;
    let (state, message) = f.finished().await;
    assert_eq!(state, FinalState::Failed);
    assert!(message.unwrap().contains("detached"));
    assert!(!worktree_of(&w, &f.task).exists());
    git(&w.project, &["checkout", "-q", "main"]);

    // Mid-rebase (a rebase stopped on a conflict): refused, the rebase state left as it was.
    git(&w.project, &["checkout", "-q", "-b", "side"]);
    std::fs::write(w.project.join("README"), "side\n").unwrap();
    git(&w.project, &["commit", "-q", "-am", "side"]);
    git(&w.project, &["checkout", "-q", "main"]);
    std::fs::write(w.project.join("README"), "main\n").unwrap();
    git(&w.project, &["commit", "-q", "-am", "main"]);
    let rebase = Command::new("git")
        .arg("-C")
        .arg(&w.project)
        .args(["rebase", "side"])
        .output()
        .unwrap();
    assert!(!rebase.status.success(), "the rebase stops on its conflict");
    let mut f = w.start(submit(OWNER, "app", "hi", in_worktree())).await;
    let (state, message) = f.finished().await;
    assert_eq!(state, FinalState::Failed);
    assert!(message.unwrap().contains("middle of a rebase"));
    assert!(!worktree_of(&w, &f.task).exists());
    git(&w.project, &["rebase", "--abort"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follow_up_after_the_process_ended_resumes_in_the_same_worktree() {
    let w = world_with(Opts {
        idle_timeout: Some(Duration::from_millis(300)),
        ..Opts::default()
    })
    .await;
    repo(&w);
    let rec = w
        .relay
        .core
        .submit_task(submit(OWNER, "app", "remember kumquat", in_worktree()))
        .await
        .unwrap();
    let tree = worktree_of(&w, &rec.spec.task);
    w.fake.push(Reply::tool_use(
        "Write",
        write(&tree.join("one.txt"), "1\n"),
    ));
    w.fake.push(Reply::text("first answer"));
    let mut f = w.follow(&rec.spec.task).await;
    assert_eq!(f.finished().await.0, FinalState::Done, "{:#?}", f.seen);
    poll_until(T, "the idle Claude Code exits", || {
        claude_processes(&tree).is_empty()
    })
    .await
    .expect("idle process closed");

    w.fake.push(Reply::tool_use(
        "Write",
        write(&tree.join("two.txt"), "2\n"),
    ));
    w.fake.push(Reply::text("kumquat"));
    let mut g = w.resume_as_owner(&f.task, "which word?").await;
    let (branch, stat, _) = worktree_end(&mut g).await;
    assert_eq!(g.finished().await.0, FinalState::Done, "{:#?}", g.seen);
    assert_eq!(branch, format!("ct/{}", rec.spec.task));
    assert_eq!(stat.files_changed, 2, "both tasks' files on the one branch");
    let conversation = prompts_in_last_request(&w.fake);
    assert!(
        conversation.contains("kumquat") && conversation.contains("which word?"),
        "--resume found the session from the worktree: {conversation}"
    );
    assert!(tree.join("two.txt").exists());
    assert!(!w.project.join("two.txt").exists() && !w.project.join("one.txt").exists());

    // The follow-up's id names the same worktree: merging it takes both.
    let merged = w
        .relay
        .core
        .worktree(OWNER, &g.task, WorktreeAction::Merge)
        .await
        .unwrap();
    assert!(merged.ok, "{merged:?}");
    assert!(w.project.join("one.txt").exists() && w.project.join("two.txt").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_beside_a_running_one_gets_a_worktree_unless_the_owner_chose_shared() {
    let w = world_with(Opts::default()).await;
    repo(&w);
    let ask = TaskOptions {
        permission_mode: Some("default".into()),
        ..TaskOptions::default()
    };
    // A waits on an approval, running in the project's own folder.
    w.fake.push(Reply::tool_use(
        "Write",
        write(&w.project.join("a.txt"), "a\n"),
    ));
    let mut a = w.start(submit(OWNER, "app", "a", ask.clone())).await;
    a.until("A's approval", |e| {
        matches!(e, TaskEvent::ApprovalRequested { .. })
    })
    .await;

    // B asks for no isolation: beside A, it gets a worktree, and says why.
    w.fake.push(Reply::text("done"));
    let mut b = w.start(submit(OWNER, "app", "b", ask.clone())).await;
    b.until(
        "the reason",
        |e| matches!(e, TaskEvent::Text { text } if text.contains("another task is running")),
    )
    .await;
    b.until("B's worktree", |e| {
        matches!(e, TaskEvent::Worktree { change: None, .. })
    })
    .await;
    assert_eq!(b.finished().await.0, FinalState::Done, "{:#?}", b.seen);
    assert!(worktree_of(&w, &b.task).is_dir());

    // The owner chose shared for the project: C runs in its folder, beside A.
    Policy::load_with(&w.agent_config, &w.allowed_env, Host::detect())
        .unwrap()
        .set_isolation("app", Isolation::Shared)
        .unwrap();
    w.fake.push(Reply::text("done"));
    let mut c = w.start(submit(OWNER, "app", "c", ask)).await;
    assert_eq!(c.finished().await.0, FinalState::Done, "{:#?}", c.seen);
    assert!(
        !c.seen
            .iter()
            .any(|(_, e)| matches!(e, TaskEvent::Worktree { .. })),
        "{:#?}",
        c.seen
    );
    assert!(!worktree_of(&w, &c.task).exists());

    w.relay.core.cancel_task(OWNER, &a.task).await.unwrap();
    assert_eq!(a.finished().await.0, FinalState::Cancelled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worktrees_past_their_retention_go_but_never_one_in_use_and_their_branch_stays() {
    let w = world_with(Opts {
        idle_timeout: Some(Duration::from_millis(300)),
        worktree_retention: Some(Duration::ZERO),
        ..Opts::default()
    })
    .await;
    repo(&w);
    // A ended, and its process is gone.
    w.fake.push(Reply::text("done"));
    let mut a = w.start(submit(OWNER, "app", "a", in_worktree())).await;
    assert_eq!(a.finished().await.0, FinalState::Done);
    let wa = worktree_of(&w, &a.task);
    assert!(wa.is_dir());
    poll_until(T, "A's idle Claude Code exits", || {
        claude_processes(&wa).is_empty()
    })
    .await
    .expect("idle process closed");

    // B waits on an approval in its worktree while C starts: starting tasks sweeps A's worktree, never B's.
    w.fake.push(Reply::tool_use(
        "Write",
        write(&w.project.join("x.txt"), "x\n"),
    ));
    let mut b = w
        .start(submit(
            OWNER,
            "app",
            "b",
            TaskOptions {
                permission_mode: Some("default".into()),
                isolation: Some(Isolation::Worktree),
                ..TaskOptions::default()
            },
        ))
        .await;
    b.until("B's approval", |e| {
        matches!(e, TaskEvent::ApprovalRequested { .. })
    })
    .await;
    w.fake.push(Reply::text("done"));
    let mut c = w
        .start(submit(
            OWNER,
            "app",
            "c",
            TaskOptions {
                isolation: Some(Isolation::Shared),
                ..TaskOptions::default()
            },
        ))
        .await;
    assert_eq!(c.finished().await.0, FinalState::Done);
    poll_until(T, "A's worktree removed", || !wa.exists())
        .await
        .expect("past its retention");
    assert!(
        branches(&w.project).contains(&format!("ct/{}", a.task)),
        "its branch stays"
    );
    assert!(worktree_of(&w, &b.task).is_dir(), "B's is in use");
    w.relay.core.cancel_task(OWNER, &b.task).await.unwrap();
    assert_eq!(b.finished().await.0, FinalState::Cancelled);
}

/// An idle agent lets go of worktrees past their retention too: no other task has to start.
#[tokio::test]
async fn an_idle_agent_removes_worktrees_past_their_retention_by_itself() {
    let w = world_with(Opts {
        idle_timeout: Some(Duration::from_millis(300)),
        worktree_retention: Some(Duration::ZERO),
        worktree_sweep_every: Some(Duration::from_millis(200)),
        ..Opts::default()
    })
    .await;
    repo(&w);
    w.fake.push(Reply::text("done"));
    let mut a = w.start(submit(OWNER, "app", "a", in_worktree())).await;
    assert_eq!(a.finished().await.0, FinalState::Done);
    let wa = worktree_of(&w, &a.task);
    poll_until(T, "the idle agent removes A's worktree", || !wa.exists())
        .await
        .expect("removed without another task starting");
    assert!(
        branches(&w.project).contains(&format!("ct/{}", a.task)),
        "its branch stays"
    );
}
