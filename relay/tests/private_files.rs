//! The relay's data directory holds its key, its certificate and every stored prompt and output: another
//! user on the machine must not be able to read any of it, including the store's own files.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ct_protocol::task::TaskEvent;
use ct_relay::tasks::Submit;

use crate::support::{event_acked, expect_start, TestRelay};

/// Every entry under `dir` that group or others may read, write or enter, with its mode.
fn readable_by_others(dir: &Path) -> Vec<(PathBuf, u32)> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(p) = pending.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            out.push((p.clone(), mode));
        }
        if meta.is_dir() {
            pending.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
    }
    out
}

#[tokio::test]
async fn nothing_in_the_data_directory_is_readable_by_other_users() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // A store left by an older relay, with a file others could read.
    std::fs::create_dir_all(data.join("db")).unwrap();
    std::fs::write(data.join("db/left-over"), b"old output").unwrap();
    std::fs::set_permissions(
        data.join("db/left-over"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();

    let relay = TestRelay::start(&data).await;
    // Store something: an agent, a task and its output.
    let (_, mut agent) = crate::support::agent(&relay, "1").await;
    let id = relay
        .core
        .submit_task(Submit {
            user: "1".into(),
            project: "web".into(),
            prompt: "print the secret".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .spec
        .task;
    assert_eq!(expect_start(&mut agent).await.task, id);
    event_acked(
        &mut agent,
        &id,
        1,
        TaskEvent::Text {
            text: "s3cret".into(),
        },
    )
    .await;
    relay.stop().await;

    let open = readable_by_others(&data);
    assert!(open.is_empty(), "readable by other users: {open:?}");
    assert!(
        std::fs::read_dir(data.join("db")).unwrap().count() > 1,
        "the store's files were looked at"
    );
}
