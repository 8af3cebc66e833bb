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

/// The printing job's script ([`LongJob::printing`]): lines `1..=$1`, a fifth of a second apart, and after
/// the first half a wait for the release file, so output comes before and after whatever the test does
/// meanwhile. Its own file, so the other jobs' script is untouched.
const PRINTING_SCRIPT: &str = "long-job-lines.sh";

const PRINTING: &str = "#!/bin/sh
# Stands in for a build that prints as it goes: $1 lines; after half of them, waits for long-job.release.
n=$1
i=1
while [ $i -le $n ]; do
  echo \"line $i of $n\"
  if [ $i -eq $((n / 2)) ]; then
    while [ ! -e long-job.release ]; do sleep 0.05; done
  fi
  sleep 0.2
  i=$((i + 1))
done
echo finished
";

/// A script in a project that keeps the Bash tool busy, and how to find it running.
#[derive(Debug, Clone)]
pub struct LongJob {
    project: PathBuf,
    /// `None`: until released.
    seconds: Option<u32>,
    /// Lines a printing job prints ([`LongJob::printing`]); `None` for the silent ones.
    lines: Option<u32>,
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

    /// A job that prints `lines` numbered lines (`line 3 of 10`) a fifth of a second apart, stops after half
    /// of them until [`LongJob::release`], then prints the rest and `finished`: output that spans what a test
    /// does while the job runs, each line of which can be looked for exactly once afterwards.
    ///
    /// # Panics
    /// If the script cannot be written.
    pub fn printing(project: &Path, lines: u32) -> Self {
        std::fs::write(project.join(PRINTING_SCRIPT), PRINTING)
            .expect("writing the printing long-job script");
        Self {
            project: project.to_path_buf(),
            seconds: None,
            lines: Some(lines),
        }
    }

    /// What a printing job writes to its output, in order (empty for the silent ones).
    pub fn output_lines(&self) -> Vec<String> {
        match self.lines {
            Some(n) => (1..=n)
                .map(|i| format!("line {i} of {n}"))
                .chain(["finished".to_string()])
                .collect(),
            None => Vec::new(),
        }
    }

    fn create(project: &Path, seconds: Option<u32>) -> Self {
        std::fs::write(project.join(LONG_JOB_SCRIPT), SCRIPT).expect("writing the long-job script");
        Self {
            project: project.to_path_buf(),
            seconds,
            lines: None,
        }
    }

    /// The Bash tool command that runs it.
    pub fn command(&self) -> String {
        if let Some(n) = self.lines {
            return format!("sh {PRINTING_SCRIPT} {n}");
        }
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
    /// for a gated or printing one. Other tests in the same process may run their own long job, so it must also run in
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
