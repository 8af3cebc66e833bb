//! [`UdpProxy`]: a loopback UDP forwarder between QUIC clients and one server that a test can make drop
//! every datagram, both ways, while the server behind it stays up. That is what a SIGKILLed machine or a cut
//! network looks like to a QUIC client: no reset, no CONNECTION_CLOSE, just nothing more arriving.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio_util::sync::{CancellationToken, DropGuard};

/// Largest datagram forwarded (the largest UDP payload); QUIC's are far smaller.
const MAX_DATAGRAM: usize = 65_535;

/// Forwards datagrams between clients and `upstream`, each client through an upstream socket of its own (as a
/// NAT would, so the server sees one address per client), until [`UdpProxy::black_hole`]. Stops when
/// dropped.
#[derive(Debug)]
pub struct UdpProxy {
    addr: SocketAddr,
    forwarding: Arc<AtomicBool>,
    _stop: DropGuard,
}

impl UdpProxy {
    /// Starts forwarding to `upstream` from a fresh port on 127.0.0.1.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let forwarding = Arc::new(AtomicBool::new(true));
        let stop = CancellationToken::new();
        tokio::spawn(forward_front(
            front,
            upstream,
            forwarding.clone(),
            stop.clone(),
        ));
        Ok(Self {
            addr,
            forwarding,
            _stop: stop.drop_guard(),
        })
    }

    /// Where clients send.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// From now on every datagram, either way, is dropped (the server behind stays up and never knows).
    pub fn black_hole(&self) {
        self.forwarding.store(false, Ordering::SeqCst);
    }
}

/// Client → server: reads the front socket and sends each datagram on that client's upstream socket, which a
/// task of its own reads for the way back.
async fn forward_front(
    front: Arc<UdpSocket>,
    upstream: SocketAddr,
    forwarding: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let mut clients: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, from) = tokio::select! {
            () = stop.cancelled() => return,
            r = front.recv_from(&mut buf) => match r {
                Ok(r) => r,
                // ICMP errors from an earlier send surface here on Linux; they say nothing about this socket.
                Err(_) => continue,
            },
        };
        if !forwarding.load(Ordering::SeqCst) {
            continue;
        }
        let back = match clients.get(&from) {
            Some(s) => s.clone(),
            None => {
                let Ok(s) = open_upstream(upstream).await else {
                    continue;
                };
                clients.insert(from, s.clone());
                tokio::spawn(forward_back(
                    s.clone(),
                    front.clone(),
                    from,
                    forwarding.clone(),
                    stop.clone(),
                ));
                s
            }
        };
        let _ = back.send(&buf[..n]).await;
    }
}

async fn open_upstream(upstream: SocketAddr) -> std::io::Result<Arc<UdpSocket>> {
    let s = UdpSocket::bind("127.0.0.1:0").await?;
    s.connect(upstream).await?;
    Ok(Arc::new(s))
}

/// Server → client, for one client.
async fn forward_back(
    upstream: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    client: SocketAddr,
    forwarding: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let n = tokio::select! {
            () = stop.cancelled() => return,
            r = upstream.recv(&mut buf) => match r {
                Ok(n) => n,
                Err(_) => continue,
            },
        };
        if forwarding.load(Ordering::SeqCst) {
            let _ = front.send_to(&buf[..n], client).await;
        }
    }
}
