//! `ClaudeProcess`: one running `claude -p ... --output-format stream-json` child, read line by line as JSON
//! events, with stdin kept open for stream-json input and control responses.
//!
//! Everything waits on output lines with a timeout; nothing sleeps. Dropping the value kills the CLI and every
//! process it started (the Bash tool puts its children in their own process group, so killing the CLI alone
//! would orphan them).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::claude::ClaudeEnv;

/// The flags of a long-lived session driven over stdin/stdout with tool approvals on stdio.
pub const SESSION_ARGS: &[&str] = &[
    "-p",
    "--input-format",
    "stream-json",
    "--output-format",
    "stream-json",
    "--verbose",
    "--permission-prompt-tool",
    "stdio",
];

/// A running CLI whose stdout is a stream of JSON events.
#[derive(Debug)]
pub struct ClaudeProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr_path: PathBuf,
    events: Vec<Value>,
    next_request: u64,
}

impl ClaudeProcess {
    /// Spawns `claude ARGS` in `cwd` with `env`; stdin is piped (kept open) and stderr goes to a file in the
    /// env's temp HOME (see [`ClaudeProcess::stderr`]).
    pub fn spawn(env: &ClaudeEnv, cwd: &Path, args: &[&str]) -> anyhow::Result<Self> {
        let stderr_path = env.home().join(format!("stderr-{}.log", unique()));
        let stderr = std::fs::File::create(&stderr_path).context("creating the stderr log")?;
        let mut child = env
            .command(cwd)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .context("spawning claude")?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("claude stdout")?;
        Ok(Self {
            child,
            stdin,
            stdout: BufReader::new(stdout).lines(),
            stderr_path,
            events: Vec::new(),
            next_request: 1,
        })
    }

    /// The CLI's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Every event read so far, in order.
    pub fn events(&self) -> &[Value] {
        &self.events
    }

    /// The last events, one compact line each (long ones cut), for failure messages.
    pub fn recent_events(&self) -> String {
        const SHOWN: usize = 30;
        const WIDTH: usize = 600;
        let skip = self.events.len().saturating_sub(SHOWN);
        self.events[skip..]
            .iter()
            .map(|ev| {
                let line = ev.to_string();
                match line.char_indices().nth(WIDTH) {
                    Some((cut, _)) => format!("{}...", &line[..cut]),
                    None => line,
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// What the CLI wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The next stdout line as JSON (a non-JSON line comes back as a JSON string); `None` at end of output.
    pub async fn next_event(&mut self, timeout: Duration) -> anyhow::Result<Option<Value>> {
        let line = tokio::time::timeout(timeout, self.stdout.next_line())
            .await
            .map_err(|_| {
                anyhow!(
                    "no output from claude within {timeout:?}; stderr: {}",
                    self.stderr()
                )
            })?
            .context("reading claude stdout")?;
        let Some(line) = line else { return Ok(None) };
        let event = serde_json::from_str(&line).unwrap_or(Value::String(line));
        tracing::debug!(%event, "claude event");
        self.events.push(event.clone());
        Ok(Some(event))
    }

    /// Reads events until one satisfies `pred` and returns it; fails at end of output or after `timeout` in all.
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                Ok(Some(ev)) if pred(&ev) => return Ok(ev),
                Ok(Some(_)) => {}
                Ok(None) => bail!(
                    "claude ended its output before the awaited event; events:\n{}\nstderr: {}",
                    self.recent_events(),
                    self.stderr()
                ),
                Err(err) => bail!("{err:#}\nevents so far:\n{}", self.recent_events()),
            }
        }
    }

    /// Waits for the next `{"type":"result"}` event.
    pub async fn wait_for_result(&mut self, timeout: Duration) -> anyhow::Result<Value> {
        self.wait_for(timeout, |ev| ev["type"] == "result").await
    }

    /// Waits for the next `control_request` whose `request.subtype` is `subtype` (e.g. `can_use_tool`).
    pub async fn wait_for_control_request(
        &mut self,
        timeout: Duration,
        subtype: &str,
    ) -> anyhow::Result<Value> {
        self.wait_for(timeout, |ev| {
            ev["type"] == "control_request" && ev["request"]["subtype"] == subtype
        })
        .await
    }

    /// Writes one JSON line to stdin.
    pub async fn send(&mut self, msg: &Value) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().context("stdin already closed")?;
        let mut line = msg.to_string();
        line.push('\n');
        stdin
            .write_all(line.as_bytes())
            .await
            .context("writing to claude stdin")?;
        stdin.flush().await.context("flushing claude stdin")?;
        Ok(())
    }

    /// Sends a stream-json user message: `{"type":"user","message":{"role":"user","content":TEXT}}`.
    pub async fn send_user(&mut self, text: &str) -> anyhow::Result<()> {
        self.send(&json!({ "type": "user", "message": { "role": "user", "content": text } }))
            .await
    }

    /// Answers a `can_use_tool` control request with allow, passing `updated_input` (required by the CLI; send
    /// the request's own `input` to allow it unchanged).
    pub async fn allow(&mut self, request_id: &str, updated_input: &Value) -> anyhow::Result<()> {
        let response = json!({ "behavior": "allow", "updatedInput": updated_input });
        self.send(&control_success(request_id, response)).await
    }

    /// Answers a `can_use_tool` control request with deny and `message` (required by the CLI).
    pub async fn deny(&mut self, request_id: &str, message: &str) -> anyhow::Result<()> {
        let response = json!({ "behavior": "deny", "message": message });
        self.send(&control_success(request_id, response)).await
    }

    /// Sends a `control_request` with `request` as its body and returns the request id used.
    pub async fn control_request(&mut self, request: Value) -> anyhow::Result<String> {
        let id = format!("ct-req-{}", self.next_request);
        self.next_request += 1;
        self.send(&json!({ "type": "control_request", "request_id": id, "request": request }))
            .await?;
        Ok(id)
    }

    /// Sends the `interrupt` control request and returns its request id.
    pub async fn interrupt(&mut self) -> anyhow::Result<String> {
        self.control_request(json!({ "subtype": "interrupt" }))
            .await
    }

    /// Closes stdin: the CLI finishes the running turn and exits.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Reads the remaining output (kept in [`ClaudeProcess::events`]) and waits for the exit status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        tokio::time::timeout(timeout, async {
            while self.next_event(timeout).await?.is_some() {}
            self.child.wait().await.context("waiting for claude")
        })
        .await
        .map_err(|_| anyhow!("claude did not exit within {timeout:?}"))?
    }

    /// Pids of every live process below the CLI (children, grandchildren, ...), from /proc.
    pub fn descendants(&self) -> Vec<u32> {
        self.pid().map(descendants_of).unwrap_or_default()
    }
}

impl Drop for ClaudeProcess {
    fn drop(&mut self) {
        // Collect the tree before the CLI dies: afterwards its children are re-parented and out of reach.
        let tree = self.descendants();
        let _ = self.child.start_kill();
        if !tree.is_empty() {
            let _ = std::process::Command::new("kill")
                .arg("-KILL")
                .args(tree.iter().map(u32::to_string))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn control_success(request_id: &str, response: Value) -> Value {
    json!({
        "type": "control_response",
        "response": { "subtype": "success", "request_id": request_id, "response": response },
    })
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// (pid, ppid) of every process in /proc.
fn process_table() -> Vec<(u32, u32)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name in parentheses may itself contain spaces or ')'; fields resume after the last ')'.
        let rest = &stat[stat.rfind(')')? + 2..];
        let ppid = rest.split(' ').nth(1)?.parse().ok()?;
        Some((pid, ppid))
    })
    .collect()
}

/// Pids of every process below `root`.
pub fn descendants_of(root: u32) -> Vec<u32> {
    let table = process_table();
    let mut found = Vec::new();
    let mut seen: HashSet<u32> = HashSet::from([root]);
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for &(pid, ppid) in &table {
            if ppid == parent && seen.insert(pid) {
                found.push(pid);
                frontier.push(pid);
            }
        }
    }
    found
}

/// The command line of `pid` with NULs turned into spaces, if it is still running (zombies count as gone).
pub fn cmdline(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let state = stat.get(stat.rfind(')')? + 2..)?.chars().next()?;
    if state == 'Z' || state == 'X' {
        return None;
    }
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        String::from_utf8_lossy(&raw)
            .replace('\0', " ")
            .trim_end()
            .to_owned(),
    )
}

/// Checks `cond` every 20 ms until it holds; fails after `timeout`. For conditions with no event to wait on
/// (a process appearing in or leaving /proc), never as a stand-in for reading the CLI's output.
pub async fn poll_until(
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tick.tick().await;
        if cond() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting until {what}");
        }
    }
}

/// Writes an executable script at `path` that can be run at once.
///
/// A file written by this (multi-threaded) test process can be "busy" (ETXTBSY) when run: another test thread
/// that forked while it was open for writing holds that descriptor until its child execs. So the file is
/// written by a `sh` child instead, and the only descriptor ever open for writing is gone when it exits.
///
/// # Panics
/// If the script cannot be written.
pub fn write_executable(path: &Path, content: &str) {
    use std::io::Write as _;
    let mut child = std::process::Command::new("/bin/sh")
        .args(["-c", "cat > \"$0\" && chmod 755 \"$0\""])
        .arg(path)
        .stdin(Stdio::piped())
        .spawn()
        .expect("running sh to write the script");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(content.as_bytes())
        .expect("writing the script through sh");
    let status = child.wait().expect("waiting for sh");
    assert!(
        status.success(),
        "writing {} failed: {status}",
        path.display()
    );
}
