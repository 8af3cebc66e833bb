//! What the kernel says about a process: resident memory, open descriptors, CPU time, wake-ups. Read from
//! `/proc/PID/{status,stat,fd}`, so the figures are the ones `ps` and `top` would show.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// One reading of a process.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    /// Resident set size now (`VmRSS`).
    pub rss_kib: u64,
    /// The largest resident set so far (`VmHWM`).
    pub peak_kib: u64,
    /// Of the resident set: private memory (`RssAnon`: heap, stacks) and mapped files (`RssFile`: mostly the
    /// program's own code, shared with every other process running it).
    pub anon_kib: u64,
    pub file_kib: u64,
    pub fds: usize,
    pub threads: u64,
    /// User plus system CPU time, in clock ticks (`/proc/PID/stat` fields 14 and 15).
    pub cpu_ticks: u64,
    /// Times any of the process's threads gave up the CPU to wait: each one is a wake-up later.
    pub voluntary_switches: u64,
}

impl Stats {
    pub fn cpu_ms(&self) -> f64 {
        self.cpu_ticks as f64 * 1000.0 / clock_ticks() as f64
    }
}

/// Reads `/proc/PID` now.
pub fn stats(pid: u32) -> Result<Stats> {
    let dir = Path::new("/proc").join(pid.to_string());
    let status = std::fs::read_to_string(dir.join("status"))
        .with_context(|| format!("reading /proc/{pid}/status (has the process exited?)"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(dir.join("stat"))?;
    // The command name may contain spaces and parentheses; the fields after the last ')' are fixed.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(Stats {
        rss_kib: field("VmRSS:"),
        peak_kib: field("VmHWM:"),
        anon_kib: field("RssAnon:"),
        file_kib: field("RssFile:"),
        fds: std::fs::read_dir(dir.join("fd"))?.count(),
        threads: field("Threads:"),
        // After the ')' the state is field 3 of the man page, so utime (14) and stime (15) are 11 and 12.
        cpu_ticks: tick(11) + tick(12),
        voluntary_switches: thread_switches(&dir),
    })
}

/// `voluntary_ctxt_switches` summed over the threads (the process's own line counts its main thread only).
fn thread_switches(dir: &Path) -> u64 {
    let Ok(threads) = std::fs::read_dir(dir.join("task")) else {
        return 0;
    };
    threads
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|n| n.trim().parse::<u64>().ok())
        })
        .sum()
}

/// This process's own figures.
pub fn own() -> Result<Stats> {
    stats(std::process::id())
}

/// `sysconf(_SC_CLK_TCK)`, asked of `getconf` to stay free of `unsafe`; 100 on every Linux in practice.
pub fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    })
}

/// Sends a signal by name (`TERM`, `KILL`) with kill(1), which keeps the crate free of `unsafe`.
pub fn signal(pid: u32, name: &str) -> Result<()> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .context("running kill(1)")?;
    if !status.success() {
        bail!("kill -{name} {pid} failed");
    }
    Ok(())
}

/// The soft limit on open files for this process, from `/proc/self/limits`.
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// The machine, for the report: CPU model and count, memory, kernel.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cores} × {model}, {:.1} GiB memory, Linux {}",
        mem_kib as f64 / 1024.0 / 1024.0,
        kernel.trim()
    )
}

/// Whether a TCP port on loopback is listening, from `/proc/net/tcp` (no connection made, so nothing is
/// triggered on the listener).
pub fn listening_ports() -> Result<std::collections::HashSet<u16>> {
    let table = std::fs::read_to_string("/proc/net/tcp")?;
    Ok(table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            // State 0A is LISTEN; local address is "IP:PORT" in hex.
            if cols.get(3) != Some(&"0A") {
                return None;
            }
            let port = cols.get(1)?.rsplit_once(':')?.1;
            u16::from_str_radix(port, 16).ok()
        })
        .collect())
}

/// The kernel's system-wide counters of connection attempts and datagrams it dropped, from `/proc/net/netstat`
/// and `/proc/net/snmp`. System-wide: read them around a window in which only the relay and the load generator
/// are busy, and take the difference.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NetDrops {
    /// A SYN or final ACK dropped because a listener's accept queue was full (`TcpExt: ListenOverflows`).
    pub listen_overflows: u64,
    /// All SYNs dropped by listeners, overflows included (`TcpExt: ListenDrops`).
    pub listen_drops: u64,
    /// SYNs dropped because the SYN queue was full and cookies could not be used (`TcpExt: TCPReqQFullDrop`).
    pub syn_queue_full: u64,
    /// Datagrams dropped because a UDP socket's receive buffer was full (`Udp: RcvbufErrors`).
    pub udp_rcvbuf_errors: u64,
}

impl NetDrops {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &NetDrops) -> NetDrops {
        NetDrops {
            listen_overflows: self
                .listen_overflows
                .saturating_sub(earlier.listen_overflows),
            listen_drops: self.listen_drops.saturating_sub(earlier.listen_drops),
            syn_queue_full: self.syn_queue_full.saturating_sub(earlier.syn_queue_full),
            udp_rcvbuf_errors: self
                .udp_rcvbuf_errors
                .saturating_sub(earlier.udp_rcvbuf_errors),
        }
    }
}

/// Reads the drop counters now.
pub fn net_drops() -> Result<NetDrops> {
    let netstat =
        std::fs::read_to_string("/proc/net/netstat").context("reading /proc/net/netstat")?;
    let snmp = std::fs::read_to_string("/proc/net/snmp").context("reading /proc/net/snmp")?;
    let tcp = |name| counter(&netstat, "TcpExt:", name);
    Ok(NetDrops {
        listen_overflows: tcp("ListenOverflows"),
        listen_drops: tcp("ListenDrops"),
        syn_queue_full: tcp("TCPReqQFullDrop"),
        udp_rcvbuf_errors: counter(&snmp, "Udp:", "RcvbufErrors"),
    })
}

/// One counter from a `/proc/net/{netstat,snmp}` table: a line of names, then a line of values, both starting
/// with `section`. A counter this kernel does not have reads as 0.
fn counter(table: &str, section: &str, name: &str) -> u64 {
    let mut rows = table.lines().filter(|l| l.starts_with(section));
    while let (Some(names), Some(values)) = (rows.next(), rows.next()) {
        if let Some(i) = names.split_whitespace().position(|n| n == name) {
            return values
                .split_whitespace()
                .nth(i)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_read_by_name_from_their_section() {
        let table = "TcpExt: SyncookiesSent ListenOverflows\nTcpExt: 3 17\nIpExt: ListenOverflows\nIpExt: 99\n";
        assert_eq!(counter(table, "TcpExt:", "ListenOverflows"), 17);
        assert_eq!(counter(table, "TcpExt:", "SyncookiesSent"), 3);
        assert_eq!(counter(table, "IpExt:", "ListenOverflows"), 99);
        assert_eq!(counter(table, "TcpExt:", "NoSuchCounter"), 0);
    }

    #[test]
    fn this_kernel_has_the_counters() {
        let table = std::fs::read_to_string("/proc/net/netstat").unwrap();
        assert!(table.contains(" ListenDrops"), "{table}");
        net_drops().expect("readable on Linux");
    }
}
