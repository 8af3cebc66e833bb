//! A long-running child for the Bash tool that every supported CLI version runs: a script in the project.
//!
//! Cancel, interrupt and no-orphan tests need Claude Code's Bash tool to start something that keeps running.
//! A bare `sleep 300` served until 2.1.3xx, which refuses a standalone long sleep ("Blocked: standalone sleep
//! 300 ... use run_in_background"). What users really run for minutes is a script of their project (a test
//! suite, a build); no version refuses that. It is not read-only, so the CLI may ask before running it: tests
//! answer the approval if one comes, and do not count on either.
//!
//! The job runs for a number of seconds ([`LongJob::write`]), or until the test releases it
//! ([`LongJob::gated`]): a test that needs something to happen *while* the job runs waits on that, not on a
//! clock.

use std::path::{Path, PathBuf};

use crate::process::{cmdline, descendants_of};

/// The script's file name in the project.
pub const LONG_JOB_SCRIPT: &str = "long-job.sh";

/// The file whose appearance ends a gated job.
const RELEASE_FILE: &str = "long-job.release";

const SCRIPT: &str = "#!/bin/sh
# Stands in for a long build or test run: $1 seconds, or until long-job.release appears.
if [ -n \"$1\" ]; then
  sleep \"$1\"
else
  while [ ! -e long-job.release ]; do sleep 0.05; done
fi
echo finished
";

/// A script in a project that keeps the Bash tool busy, and how to find it running.
#[derive(Debug, Clone)]
pub struct LongJob {
    project: PathBuf,
    /// `None`: until released.
    seconds: Option<u32>,
}

impl LongJob {
    /// A job of `seconds` seconds, whose child is `sleep SECONDS`. `project` must be canonical: the child's
    /// cwd is compared with it.
    ///
    /// # Panics
    /// If the script cannot be written.
    pub fn write(project: &Path, seconds: u32) -> Self {
        Self::create(project, Some(seconds))
    }

    /// A job that runs until [`LongJob::release`].
    ///
    /// # Panics
    /// If the script cannot be written.
    pub fn gated(project: &Path) -> Self {
        Self::create(project, None)
    }

    fn create(project: &Path, seconds: Option<u32>) -> Self {
        std::fs::write(project.join(LONG_JOB_SCRIPT), SCRIPT).expect("writing the long-job script");
        Self {
            project: project.to_path_buf(),
            seconds,
        }
    }

    /// The Bash tool command that runs it.
    pub fn command(&self) -> String {
        match self.seconds {
            Some(s) => format!("sh {LONG_JOB_SCRIPT} {s}"),
            None => format!("sh {LONG_JOB_SCRIPT}"),
        }
    }

    /// Ends a gated job.
    ///
    /// # Panics
    /// If the release file cannot be written.
    pub fn release(&self) {
        std::fs::write(self.project.join(RELEASE_FILE), "").expect("releasing the long job");
    }

    /// The job's process, if it runs below `root` now: the `sleep SECONDS` of a timed job, the script itself
    /// for a gated one. Other tests in the same process may run their own long job, so it must also run in
    /// this project.
    pub fn child_below(&self, root: u32) -> Option<u32> {
        let want = match self.seconds {
            Some(s) => format!("sleep {s}"),
            None => self.command(),
        };
        descendants_of(root).into_iter().find(|&pid| {
            cmdline(pid).is_some_and(|c| c == want)
                && std::fs::read_link(format!("/proc/{pid}/cwd"))
                    .is_ok_and(|cwd| cwd == self.project)
        })
    }
}
