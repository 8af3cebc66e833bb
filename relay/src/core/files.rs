//! Files attached to a task or to a follow-up: what the relay accepts (how many, how big, for which agent),
//! and how they reach the agent.
//!
//! A new task's files are stored with it (both stores keep them: a task may wait in its agent's queue, and the
//! relay may restart meanwhile) and go out as [`FilePart`](ct_protocol::files::FilePart)s just before its `StartTask`; once the session has
//! written them, the relay forgets them (a task dispatched is never dispatched again: if the agent never got
//! it, it ends as lost). A follow-up's files go straight to the running session, which must be on this node.

use ct_protocol::files::{safe_name, Attachment, MAX_FILES, MAX_FILE_BYTES, MAX_TASK_FILES_BYTES};

use super::tasks::TaskError;
use super::Core;
use crate::store::AgentRecord;

/// Refuses files past the limits, and gives each a safe name (the agent makes it safe again: it trusts no
/// relay with its disk).
pub(crate) fn checked(files: Vec<Attachment>) -> Result<Vec<Attachment>, TaskError> {
    if files.len() > MAX_FILES {
        return Err(TaskError::TooManyFiles {
            count: files.len(),
            max: MAX_FILES,
        });
    }
    let mut total = 0u64;
    let mut out = Vec::with_capacity(files.len());
    for mut f in files {
        let size = f.data.len() as u64;
        if size > MAX_FILE_BYTES {
            return Err(TaskError::FileTooBig {
                name: safe_name(&f.name),
                size: super::submit::human_bytes(size),
                max: super::submit::human_bytes(MAX_FILE_BYTES),
            });
        }
        total += size;
        f.name = safe_name(&f.name);
        f.media_type = f
            .media_type
            .filter(|t| t.len() <= 100 && t.bytes().all(|b| b.is_ascii_graphic() || b == b' '));
        out.push(f);
    }
    if total > MAX_TASK_FILES_BYTES {
        return Err(TaskError::FilesTooBig {
            total: super::submit::human_bytes(total),
            max: super::submit::human_bytes(MAX_TASK_FILES_BYTES),
        });
    }
    Ok(out)
}

/// Files only for an agent that said it takes them: an older one could not decode a `FilePart`, and would
/// lose the files silently if they came any other way.
pub(crate) fn agent_takes_files(agent: &AgentRecord) -> Result<(), TaskError> {
    match &agent.projects {
        Some(report) if report.accepts_files => Ok(()),
        _ => Err(TaskError::FilesNotSupported {
            agent: agent.name.clone(),
        }),
    }
}

/// Bytes of a batch of files.
pub(crate) fn size_of(files: &[Attachment]) -> u64 {
    files.iter().map(|f| f.data.len() as u64).sum()
}

impl Core {
    /// The agent's session wrote `task`'s start with its files: the relay need not keep them any longer.
    pub async fn files_delivered(&self, task: String) {
        let forgot = self.read(move |store| store.delete_task_files(&task)).await;
        if let Ok(Err(e)) = forgot {
            // Retention deletes them with the task later.
            tracing::warn!(error = %e, "could not forget a task's delivered files");
        }
    }
}
