//! What `service install` and `service uninstall` do, as a list of steps: printed by `--dry-run`, carried
//! out otherwise. Building the plan reads the system but never changes it; only [`Plan::execute`] does.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::PathBuf;
use std::process::Command;

use super::render::Rendered;

/// One change to the system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Create a directory (and its parents) with this mode if it does not exist.
    Mkdir { path: PathBuf, mode: u32 },
    /// Write a file atomically with this mode, replacing any previous version.
    Write(Rendered),
    /// Remove a file or an empty directory; a missing one is fine.
    Remove { path: PathBuf },
    /// Remove a directory and everything in it; a missing one is fine.
    RemoveTree { path: PathBuf },
    /// Run a command. With `may_fail`, a failure is reported and the plan goes on (e.g. stopping a
    /// service that is not running).
    Run {
        argv: Vec<String>,
        may_fail: bool,
        why: String,
    },
}

/// An ordered list of steps, and what to tell the user afterwards.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// Printed after the steps (dry run) or after they succeeded.
    pub notes: Vec<String>,
}

/// A step that failed, with the advice of the platform that planned it.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {cause}{}", advice.as_deref().map(|a| format!("\n{a}")).unwrap_or_default())]
pub struct StepError {
    pub what: String,
    /// Not `source`: the message already includes it, and error chains would print it twice.
    pub cause: io::Error,
    pub advice: Option<String>,
}

impl Plan {
    pub fn run(&mut self, argv: &[&str], why: impl Into<String>) {
        self.steps.push(Step::Run {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            may_fail: false,
            why: why.into(),
        });
    }

    pub fn run_may_fail(&mut self, argv: &[&str], why: impl Into<String>) {
        self.steps.push(Step::Run {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            may_fail: true,
            why: why.into(),
        });
    }

    /// The dry-run text: every file with its full contents and every command, in order.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for (i, step) in self.steps.iter().enumerate() {
            let n = i + 1;
            match step {
                Step::Mkdir { path, mode } => {
                    let _ = writeln!(
                        out,
                        "{n}. create directory {} (mode {mode:o})",
                        path.display()
                    );
                }
                Step::Write(file) => {
                    let enc = if file.utf16 { ", UTF-16LE" } else { "" };
                    let _ = writeln!(
                        out,
                        "{n}. write {} (mode {:o}{enc}):",
                        file.path.display(),
                        file.mode
                    );
                    for line in file.text.lines() {
                        let _ = writeln!(out, "   | {line}");
                    }
                }
                Step::Remove { path } => {
                    let _ = writeln!(out, "{n}. remove {}", path.display());
                }
                Step::RemoveTree { path } => {
                    let _ = writeln!(
                        out,
                        "{n}. remove directory {} and its contents",
                        path.display()
                    );
                }
                Step::Run {
                    argv,
                    may_fail,
                    why,
                } => {
                    let tail = if *may_fail {
                        "; a failure is not fatal"
                    } else {
                        ""
                    };
                    let _ = writeln!(out, "{n}. run: {}    # {why}{tail}", shell_line(argv));
                }
            }
        }
        if !self.notes.is_empty() {
            out.push('\n');
            for note in &self.notes {
                let _ = writeln!(out, "{note}");
            }
        }
        out
    }

    /// Carries the plan out, printing each step to `log` as it goes. Stops at the first step that must not
    /// fail; `advice` is added to that error.
    pub fn execute(&self, log: &mut dyn io::Write, advice: Option<&str>) -> Result<(), StepError> {
        let fail = |what: String, cause: io::Error| StepError {
            what,
            cause,
            advice: advice.map(str::to_string),
        };
        for step in &self.steps {
            match step {
                Step::Mkdir { path, mode } => {
                    fs::DirBuilder::new()
                        .recursive(true)
                        .mode(*mode)
                        .create(path)
                        .map_err(|e| fail(format!("cannot create {}", path.display()), e))?;
                }
                Step::Write(file) => {
                    write_file(file)
                        .map_err(|e| fail(format!("cannot write {}", file.path.display()), e))?;
                    let _ = writeln!(log, "wrote {}", file.path.display());
                }
                Step::Remove { path } => {
                    let result = if path.is_dir() && !path.is_symlink() {
                        fs::remove_dir(path)
                    } else {
                        fs::remove_file(path)
                    };
                    match result {
                        Ok(()) => {
                            let _ = writeln!(log, "removed {}", path.display());
                        }
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(fail(format!("cannot remove {}", path.display()), e)),
                    }
                }
                Step::RemoveTree { path } => match fs::remove_dir_all(path) {
                    Ok(()) => {
                        let _ = writeln!(log, "removed {}", path.display());
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(fail(format!("cannot remove {}", path.display()), e)),
                },
                Step::Run { argv, may_fail, .. } => {
                    let _ = writeln!(log, "$ {}", shell_line(argv));
                    match run_checked(argv) {
                        Ok(_) => {}
                        Err(e) if *may_fail => {
                            let _ = writeln!(log, "  (ignored: {e})");
                        }
                        Err(e) => return Err(fail(format!("`{}` failed", shell_line(argv)), e)),
                    }
                }
            }
        }
        Ok(())
    }
}

/// Writes through a temporary file in the same directory and a rename, so a unit or plist is never seen
/// half-written by a service manager that happens to read it.
fn write_file(file: &Rendered) -> io::Result<()> {
    let dir = file
        .path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no parent directory"))?;
    let name = file
        .path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?
        .to_string_lossy()
        .into_owned();
    crate::config::write_atomic(dir, &name, &file.bytes(), file.mode)
        .map_err(|e| io::Error::other(e.to_string()))?;
    // write_atomic creates with `mode` masked by the umask; make the mode exact (a unit must be 0644).
    fs::set_permissions(&file.path, fs::Permissions::from_mode(file.mode))
}

/// Runs a command, returning its standard output; a non-zero exit is an error carrying its stderr.
pub fn run_checked(argv: &[String]) -> io::Result<String> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command"))?;
    let output = Command::new(program).args(args).output().map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            io::Error::new(
                e.kind(),
                format!("{program} is not installed or not on PATH"),
            )
        } else {
            e
        }
    })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stdout = String::from_utf8_lossy(&output.stdout);
        let text = if stderr.trim().is_empty() {
            stdout
        } else {
            stderr
        };
        Err(io::Error::other(format!(
            "{} ({})",
            text.trim(),
            output.status
        )))
    }
}

/// A command as one could paste it into a shell.
pub fn shell_line(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            let plain = !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@,+%".contains(&b));
            if plain {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_shows_files_and_commands() {
        let mut plan = Plan::default();
        plan.steps.push(Step::Write(Rendered::utf8(
            "/x/unit",
            0o644,
            "[Unit]\nA=b\n".into(),
        )));
        plan.run(&["systemctl", "--user", "daemon-reload"], "reload");
        plan.run_may_fail(&["echo", "a b"], "why");
        plan.notes.push("note".into());
        let text = plan.describe();
        assert!(
            text.contains("1. write /x/unit (mode 644):\n   | [Unit]\n   | A=b\n"),
            "{text}"
        );
        assert!(
            text.contains("2. run: systemctl --user daemon-reload    # reload\n"),
            "{text}"
        );
        assert!(
            text.contains("3. run: echo 'a b'    # why; a failure is not fatal"),
            "{text}"
        );
        assert!(text.ends_with("\nnote\n"), "{text}");
    }

    #[test]
    fn execute_writes_removes_and_runs() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        let file = dir.join("f");
        let mut plan = Plan::default();
        plan.steps.push(Step::Mkdir {
            path: dir.clone(),
            mode: 0o755,
        });
        plan.steps
            .push(Step::Write(Rendered::utf8(&file, 0o644, "hi\n".into())));
        plan.run_may_fail(&["false"], "ignored");
        let mut log = Vec::new();
        plan.execute(&mut log, None).unwrap();
        assert_eq!(fs::read_to_string(&file).unwrap(), "hi\n");
        assert_eq!(
            fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o644
        );

        let mut undo = Plan::default();
        undo.steps.push(Step::Remove { path: file.clone() });
        undo.steps.push(Step::Remove { path: file.clone() }); // already gone: fine
        undo.execute(&mut log, None).unwrap();
        assert!(!file.exists());

        let mut bad = Plan::default();
        bad.run(&["false"], "must work");
        let err = bad.execute(&mut log, Some("do this")).unwrap_err();
        assert!(err.to_string().contains("`false` failed"), "{err}");
        assert!(err.to_string().ends_with("\ndo this"), "{err}");
    }
}
