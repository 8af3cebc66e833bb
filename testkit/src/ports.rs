//! Ports for servers a test stops and starts again on the same address.
//!
//! A port from binding `127.0.0.1:0` is only free while the server holds it: between a stop and a restart,
//! the kernel may hand it to any other socket bound to port 0 — another test's server, or the local end of an
//! outgoing connection — and the restart fails with "address in use". Ports below the kernel's ephemeral
//! range are never handed out that way, so only a test that names one explicitly can take it.

use std::net::{Ipv4Addr, TcpListener, UdpSocket};

/// Where the ephemeral range starts when the system does not say.
const DEFAULT_EPHEMERAL_LOW: u16 = 32768;
/// How many ports below the ephemeral range are drawn from.
const SPAN: u16 = 12_000;

/// A loopback port below the ephemeral range, free for both TCP and UDP when returned (the relay binds both).
pub fn restartable() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(DEFAULT_EPHEMERAL_LOW);
    let first = low.saturating_sub(SPAN).max(1024);
    loop {
        let port = first + (rand::random::<u16>() % low.saturating_sub(first).max(1));
        let free = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
            && UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).is_ok();
        if free {
            return port;
        }
    }
}
