//! The CLI as an operating-system process: spawning it in its own process group, reading its stdout in
//! bounded lines, keeping the tail of its stderr, and killing it together with everything it started.
//!
//! Killing the CLI alone is not enough: the Bash tool puts each command in a process group of its own, so a
//! `sleep` started through it outlives a killed CLI (testkit/CLAUDE-NOTES.md). [`kill_tree`] therefore signals
//! the CLI's group, every descendant found in the process table, and each descendant's group.

use std::collections::{HashSet, VecDeque};
use std::io;
use std::sync::{Arc, Mutex};

use crate::sys as os;
use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _};

/// Longest stdout line the runner reads; a longer one is skipped and reported, never buffered whole.
pub const MAX_LINE: usize = 8 * 1024 * 1024;
/// How much of stderr is kept (the end of it) for failure messages.
pub const STDERR_TAIL: usize = 16 * 1024;

/// One read from a line-oriented stream.
#[derive(Debug, PartialEq, Eq)]
pub enum BoundedLine {
    /// A complete line, without its `\n`.
    Line(Vec<u8>),
    /// A line longer than the limit was skipped; this many bytes were dropped.
    TooLong(usize),
}

/// Reads the next line, holding at most `max` bytes of it in memory. `Ok(None)` at end of stream.
pub async fn read_line_bounded<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> io::Result<Option<BoundedLine>> {
    let mut buf = Vec::new();
    let mut dropped: Option<usize> = None;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(match dropped {
                Some(n) => Some(BoundedLine::TooLong(n)),
                None if buf.is_empty() => None,
                None => Some(BoundedLine::Line(buf)),
            });
        }
        let newline = available.iter().position(|&b| b == b'\n');
        let chunk = &available[..newline.unwrap_or(available.len())];
        match &mut dropped {
            Some(n) => *n += chunk.len(),
            None if buf.len() + chunk.len() > max => {
                dropped = Some(buf.len() + chunk.len());
                buf = Vec::new();
            }
            None => buf.extend_from_slice(chunk),
        }
        let consumed = newline.map_or(available.len(), |i| i + 1);
        reader.consume(consumed);
        if newline.is_some() {
            return Ok(Some(match dropped {
                Some(n) => BoundedLine::TooLong(n),
                None => BoundedLine::Line(buf),
            }));
        }
    }
}

/// The last [`STDERR_TAIL`] bytes a process wrote to stderr, filled by [`StderrTail::collect`].
#[derive(Debug, Clone, Default)]
pub struct StderrTail(Arc<Mutex<VecDeque<u8>>>);

impl StderrTail {
    /// Reads `stderr` to its end, keeping only the tail.
    pub async fn collect(self, mut stderr: impl AsyncRead + Unpin) {
        let mut chunk = [0u8; 4096];
        loop {
            match stderr.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let mut tail = self.0.lock().unwrap_or_else(|e| e.into_inner());
                    tail.extend(&chunk[..n]);
                    let excess = tail.len().saturating_sub(STDERR_TAIL);
                    tail.drain(..excess);
                }
            }
        }
    }

    /// The tail as text.
    pub fn text(&self) -> String {
        let tail = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (a, b) = tail.as_slices();
        let mut bytes = a.to_vec();
        bytes.extend_from_slice(b);
        String::from_utf8_lossy(&bytes).trim().to_owned()
    }
}

/// A process as seen in the process table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcInfo {
    pub pid: u32,
    pub ppid: u32,
    pub pgrp: u32,
    /// Start time (clock ticks after boot), to tell a process from a later one that reuses its pid.
    pub start: u64,
}

/// One process from `/proc/<pid>/stat`; `None` if it is gone (zombies count as gone).
pub fn proc_info(pid: u32) -> Option<ProcInfo> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name in parentheses may contain spaces or ')'; the fields resume after the last ')'.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
    if matches!(fields.first(), Some(&"Z") | Some(&"X")) {
        return None;
    }
    Some(ProcInfo {
        pid,
        ppid: fields.get(1)?.parse().ok()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start: fields.get(19)?.parse().ok()?,
    })
}

fn process_table() -> Vec<ProcInfo> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| proc_info(e.ok()?.file_name().to_str()?.parse().ok()?))
        .collect()
}

/// Every live process below `root` (children, grandchildren, ...), from `/proc`. Empty where there is no
/// `/proc` (macOS); there the process-group kill is what remains.
pub fn descendants(root: u32) -> Vec<ProcInfo> {
    let table = process_table();
    let mut found = Vec::new();
    let mut seen: HashSet<u32> = HashSet::from([root]);
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for p in &table {
            if p.ppid == parent && seen.insert(p.pid) {
                found.push(*p);
                frontier.push(p.pid);
            }
        }
    }
    found
}

/// SIGKILLs the CLI (`cli`, its process group and every current descendant, when it has not been reaped
/// yet), the processes in `known` that are still the same processes, and the process groups of all of those.
/// Never signals the agent's own group.
pub fn kill_tree(cli: Option<u32>, known: &[ProcInfo]) {
    let mut procs: Vec<ProcInfo> = cli.map(descendants).unwrap_or_default();
    for p in known {
        if proc_info(p.pid).is_some_and(|now| now.start == p.start) && !procs.contains(p) {
            procs.push(*p);
        }
    }
    let own_group = os::own_process_group();
    let mut groups: HashSet<u32> = procs.iter().map(|p| p.pgrp).collect();
    groups.extend(cli);
    for g in groups {
        if g > 1 && Some(g) != own_group {
            os::kill_group(g, os::SIGKILL);
        }
    }
    if let Some(pid) = cli {
        os::kill(pid, os::SIGKILL);
    }
    for p in procs {
        os::kill(p.pid, os::SIGKILL);
    }
}

/// Sends SIGINT to one process (the CLI ends its turn with an `error_during_execution` result on it).
pub fn interrupt(pid: u32) {
    os::kill(pid, os::SIGINT);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::BufReader;

    #[tokio::test]
    async fn long_lines_are_skipped_not_buffered() {
        let mut data = b"short\n".to_vec();
        data.extend(vec![b'x'; 100]);
        data.extend(b"\nafter\nlast-without-newline");
        // A tiny buffer so the long line arrives in many pieces.
        let mut r = BufReader::with_capacity(7, &data[..]);
        assert_eq!(
            read_line_bounded(&mut r, 10).await.unwrap(),
            Some(BoundedLine::Line(b"short".to_vec()))
        );
        assert_eq!(
            read_line_bounded(&mut r, 10).await.unwrap(),
            Some(BoundedLine::TooLong(100))
        );
        assert_eq!(
            read_line_bounded(&mut r, 10).await.unwrap(),
            Some(BoundedLine::Line(b"after".to_vec()))
        );
        assert_eq!(
            read_line_bounded(&mut r, 100).await.unwrap(),
            Some(BoundedLine::Line(b"last-without-newline".to_vec()))
        );
        assert_eq!(read_line_bounded(&mut r, 10).await.unwrap(), None);
    }

    #[tokio::test]
    async fn stderr_keeps_only_the_tail() {
        let tail = StderrTail::default();
        let mut data = vec![b'a'; STDERR_TAIL];
        data.extend(b"the end");
        tail.clone().collect(&data[..]).await;
        let text = tail.text();
        assert_eq!(text.len(), STDERR_TAIL);
        assert!(text.ends_with("the end"));
    }

    #[test]
    fn this_process_is_in_the_table() {
        let me = proc_info(std::process::id()).expect("own /proc entry");
        assert_eq!(Some(me.pgrp), os::own_process_group());
    }
}
