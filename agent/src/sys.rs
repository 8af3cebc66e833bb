//! The agent's libc calls: this machine's name, whether a process id is alive, signals to process groups
//! (cancelling Claude Code), and handing a descriptor to one child (the sandbox's project folder). Kept in one file so the only `unsafe` in the crate is in one place.

#![allow(unsafe_code)]

/// The machine's host name, the default name of a newly paired agent.
pub fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for writes of its whole length, which is what we pass; gethostname
    // writes at most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    // POSIX leaves termination unspecified on truncation; take up to the first NUL or the whole buffer.
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).trim().to_string();
    (!name.is_empty()).then_some(name)
}

/// Whether a process with this id exists (`kill(pid, 0)`). A process owned by another user counts as alive.
pub fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // pid 0 and negative ids address process groups, not one process.
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 sends nothing; it only checks that the process exists and may be signalled.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

// Process signalling for cancelling Claude Code (used by claude::process).
pub const SIGKILL: i32 = libc::SIGKILL;
pub const SIGINT: i32 = libc::SIGINT;

/// `kill(pid, sig)`; errors (already gone) are ignored. pid 0 and ids that do not fit are refused: they
/// would address groups rather than one process.
pub fn kill(pid: u32, sig: i32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    if pid <= 0 {
        return;
    }
    // SAFETY: kill takes plain integers and touches no memory of ours; a positive pid names one process.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// `kill(-pgid, sig)`: every process in the group.
pub fn kill_group(pgid: u32, sig: i32) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return;
    };
    if pgid <= 1 {
        return;
    }
    // SAFETY: as above; a negative pid names the process group |pid|, which the caller checked is not ours.
    unsafe {
        libc::kill(-pgid, sig);
    }
}

/// This process's group, which must never be signalled.
pub fn own_process_group() -> Option<u32> {
    // SAFETY: getpgrp takes no arguments and cannot fail.
    let g = unsafe { libc::getpgrp() };
    u32::try_from(g).ok()
}

/// Lets the child of `cmd` inherit `fds` across exec. They stay close-on-exec in the agent, so no other
/// child (a concurrent spawn) gets them; only this one clears the flag, after its fork.
pub fn inherit_fds(cmd: &mut tokio::process::Command, fds: Vec<std::os::fd::RawFd>) {
    if fds.is_empty() {
        return;
    }
    // SAFETY: the closure runs in the forked child before exec and only calls fcntl, which is
    // async-signal-safe, on descriptor numbers; it allocates nothing. The caller keeps the descriptors open
    // until the spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_reaped_child_is_not() {
        assert!(process_alive(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!process_alive(pid));
        assert!(!process_alive(0));
    }

    #[test]
    fn hostname_is_something() {
        assert!(hostname().is_some_and(|h| !h.is_empty()));
    }
}
