//! Files attached to tasks, at the relay: refused for an agent that never said it takes them (with what to
//! do), refused past the limits, kept with a queued task, and written to the agent as parts that rebuild the
//! file, just before the start or input they belong to.

use std::time::Duration;

use ct_protocol::files::{decode_part, Attachment, MAX_FILES, MAX_FILE_BYTES};
use ct_protocol::project::{ProjectInfo, ProjectsReport};
use ct_protocol::task::TaskEvent;
use ct_protocol::{AgentMessage, Fingerprint, RelayMessage};
use ct_relay::core::tasks::{ReplyOutcome, Submit, TaskError};

use crate::support::{agent, event_acked, recv, Session, TestRelay};

fn report(accepts_files: bool) -> ProjectsReport {
    ProjectsReport {
        projects: vec![ProjectInfo {
            name: "web".into(),
            path: "/src/web".into(),
        }],
        allowed_dirs: vec!["/src".into()],
        accepts_shared: false,
        accepts_files,
        pool: false,
    }
}

fn file(name: &str, data: Vec<u8>) -> Attachment {
    Attachment {
        name: name.into(),
        media_type: Some("text/plain".into()),
        data,
    }
}

fn submit() -> Submit {
    Submit {
        user: "1".into(),
        project: "web".into(),
        prompt: "read it".into(),
        ..Default::default()
    }
}

/// Sends the agent's report and waits until the relay keeps it.
async fn reports(relay: &TestRelay, key: &ed25519_dalek::SigningKey, s: &mut Session, files: bool) {
    s.writer
        .send(&AgentMessage::Projects(report(files)))
        .await
        .unwrap();
    let fp = Fingerprint::of(&key.verifying_key());
    crate::support::eventually_async(Duration::from_secs(5), async || {
        relay
            .core
            .agent_projects(&fp)
            .await
            .unwrap()
            .is_some_and(|r| r.accepts_files == files)
    })
    .await;
}

/// Reads file parts until a non-part message; returns the files they rebuild and that message.
async fn parts_then(s: &mut Session) -> (Vec<Attachment>, RelayMessage) {
    let mut files: Vec<Attachment> = Vec::new();
    loop {
        match recv(s).await {
            RelayMessage::FilePart(p) => {
                let i = p.index as usize;
                if files.len() <= i {
                    files.push(Attachment {
                        name: p.name.clone(),
                        media_type: p.media_type.clone(),
                        data: Vec::new(),
                    });
                }
                assert_eq!(p.offset, files[i].data.len() as u64, "parts in order");
                files[i]
                    .data
                    .extend(decode_part(&p.data).expect("a part fits a chunk"));
            }
            other => return (files, other),
        }
    }
}

#[tokio::test]
async fn an_agent_that_never_said_it_takes_files_is_sent_none_and_the_person_is_told_to_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let (key, mut s) = agent(&relay, "1").await;
    reports(&relay, &key, &mut s, false).await;
    let err = relay
        .core
        .submit_task_with_files(submit(), vec![file("a.log", b"x".to_vec())])
        .await
        .unwrap_err();
    assert!(matches!(err, TaskError::FilesNotSupported { .. }), "{err}");
    assert!(err.to_string().contains("upgrade"), "{err}");
    // Nothing was started: the next thing the agent sees is a task without files.
    let rec = relay.core.submit_task(submit()).await.unwrap();
    match recv(&mut s).await {
        RelayMessage::StartTask(spec) => assert_eq!(spec.task, rec.spec.task),
        other => panic!("expected only the plain start, got {other:?}"),
    }
    relay.stop().await;
}

#[tokio::test]
async fn files_past_the_limits_are_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let (key, mut s) = agent(&relay, "1").await;
    reports(&relay, &key, &mut s, true).await;
    let core = &relay.core;
    let big = vec![0u8; MAX_FILE_BYTES as usize + 1];
    let err = core
        .submit_task_with_files(submit(), vec![file("big.bin", big)])
        .await
        .unwrap_err();
    assert!(matches!(err, TaskError::FileTooBig { .. }), "{err}");
    let many = (0..=MAX_FILES)
        .map(|i| file(&format!("{i}"), vec![1]))
        .collect();
    let err = core
        .submit_task_with_files(submit(), many)
        .await
        .unwrap_err();
    assert!(matches!(err, TaskError::TooManyFiles { .. }), "{err}");
    let four = (0..4)
        .map(|i| file(&format!("{i}"), vec![0; MAX_FILE_BYTES as usize]))
        .collect();
    let err = core
        .submit_task_with_files(submit(), four)
        .await
        .unwrap_err();
    assert!(matches!(err, TaskError::FilesTooBig { .. }), "{err}");
    relay.stop().await;
}

#[tokio::test]
async fn files_go_in_parts_before_the_start_and_the_input_and_are_then_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let (key, mut s) = agent(&relay, "1").await;
    reports(&relay, &key, &mut s, true).await;
    let big: Vec<u8> = (0..1_300_000u32).map(|i| (i % 253) as u8).collect();
    let files = vec![file("../a.log", b"line\n".to_vec()), file("big.bin", big)];
    let rec = relay
        .core
        .submit_task_with_files(submit(), files.clone())
        .await
        .unwrap();
    let (got, next) = parts_then(&mut s).await;
    let RelayMessage::StartTask(spec) = next else {
        panic!("expected the start after the parts, got {next:?}");
    };
    assert_eq!(spec.task, rec.spec.task);
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].name, "a.log", "names are made safe at the relay too");
    assert_eq!(
        (&got[0].data, &got[1].data),
        (&files[0].data, &files[1].data)
    );
    let task = spec.task.clone();
    let store = relay.core.store();
    crate::support::eventually(Duration::from_secs(5), || {
        store.task_files(&task).unwrap().is_empty()
    })
    .await;

    // A follow-up into the running task: its files, then its input.
    event_acked(
        &mut s,
        &task,
        1,
        TaskEvent::Started {
            cwd: "/src/web".into(),
        },
    )
    .await;
    let outcome = relay
        .core
        .reply_with_files(
            "1",
            &task,
            "and this".into(),
            None,
            vec![file("b.txt", b"more".to_vec())],
        )
        .await
        .unwrap();
    assert!(matches!(outcome, ReplyOutcome::Sent(_)));
    let (got, next) = parts_then(&mut s).await;
    assert!(
        matches!(&next, RelayMessage::TaskInput { task: t, prompt } if *t == task && prompt == "and this"),
        "{next:?}"
    );
    assert_eq!(got, vec![file("b.txt", b"more".to_vec())]);
    relay.stop().await;
}

#[tokio::test]
async fn a_queued_task_cancelled_before_it_started_leaves_no_files_behind() {
    let dir = tempfile::tempdir().unwrap();
    // One task at a time: the second waits in the agent's queue, with its files.
    let mut config = ct_relay::RelayConfig::new(dir.path().into(), "127.0.0.1:0".parse().unwrap());
    config.core.max_running_per_agent = 1;
    let relay = TestRelay::start_with(config).await;
    let (key, mut s) = agent(&relay, "1").await;
    reports(&relay, &key, &mut s, true).await;
    relay.core.submit_task(submit()).await.unwrap();
    assert!(matches!(recv(&mut s).await, RelayMessage::StartTask(_)));
    let rec = relay
        .core
        .submit_task_with_files(submit(), vec![file("a.log", b"x".to_vec())])
        .await
        .unwrap();
    let task = rec.spec.task.clone();
    let store = relay.core.store();
    assert_eq!(store.task_files(&task).unwrap().len(), 1);
    relay.core.cancel_task("1", &task).await.unwrap();
    assert!(
        store.task_files(&task).unwrap().is_empty(),
        "a task that will never be sent keeps no files"
    );
    relay.stop().await;
}
