//! Calls into the operating system that need `unsafe`, kept in one file so the crate's only `unsafe` is here.
#![allow(unsafe_code)]

/// Raises the soft descriptor limit to the hard one (a relay serving many agents needs them, and systemd's
/// default soft limit is 1024), and returns the limit now in force, or `None` where it cannot be read.
pub fn raise_descriptor_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is u64 on Linux and macOS, but not by definition
    Some(lim.rlim_cur as u64)
}

/// Makes everything this process creates from now on private to its user (files 0600, directories 0700),
/// including the files sled creates inside the store, which it opens with the default mode. Returns the
/// previous mask.
pub fn private_umask() -> u32 {
    // SAFETY: umask only swaps the process's file mode creation mask.
    #[allow(clippy::unnecessary_cast)] // mode_t is u32 on Linux, u16 on macOS
    let old = unsafe { libc::umask(0o077) } as u32;
    old
}

/// This machine's host name (a cluster node's default id), or "relay" where it cannot be read.
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into the buffer we own.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let name = if ok {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    if name.is_empty() {
        "relay".into()
    } else {
        name
    }
}
