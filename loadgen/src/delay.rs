//! A TCP proxy on loopback that holds every byte for a fixed time each way: PostgreSQL "on another host" for
//! the cluster scenario (`--pg-rtt-ms`). On one machine a round trip to PostgreSQL costs tens of
//! microseconds, so what a statement fewer on a submission's way is worth in a real deployment, where the
//! database is a network hop away, does not show; behind this proxy it does.
//!
//! Each direction of each connection is a reader and a writer joined by a channel: the reader stamps each
//! chunk with when it arrived, the writer sends it once half the round trip has passed since. Order is kept,
//! and a burst is delayed as a whole, not chunk after chunk.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Chunks in flight per direction before the reader waits: bounds the memory a fast sender can take.
const IN_FLIGHT: usize = 1024;

/// A delaying proxy to `upstream`. Dropping it stops it and every connection through it.
#[derive(Debug)]
pub struct DelayProxy {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    _tasks: TaskTracker,
}

impl DelayProxy {
    /// Listens on 127.0.0.1:0 and forwards to `upstream`, each way after `rtt / 2`.
    pub async fn start(upstream: SocketAddr, rtt: Duration) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (shutdown, tasks) = (CancellationToken::new(), TaskTracker::new());
        let (stop, owned) = (shutdown.clone(), tasks.clone());
        let one_way = rtt / 2;
        tasks.spawn(async move {
            loop {
                let client = tokio::select! {
                    () = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((client, _)) => client,
                        // Out of descriptors, say: wait a moment rather than spin on the same error.
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    },
                };
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let (client_in, client_out) = client.into_split();
                let (server_in, server_out) = server.into_split();
                for (from, to) in [(client_in, server_out), (server_in, client_out)] {
                    let (tx, rx) = mpsc::channel(IN_FLIGHT);
                    let (reading, writing) = (stop.clone(), stop.clone());
                    owned.spawn(async move {
                        tokio::select! {
                            () = reading.cancelled() => {}
                            () = read_stamped(from, tx) => {}
                        }
                    });
                    owned.spawn(async move {
                        tokio::select! {
                            () = writing.cancelled() => {}
                            () = write_after(to, rx, one_way) => {}
                        }
                    });
                }
            }
        });
        Ok(Self {
            addr,
            shutdown,
            _tasks: tasks,
        })
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn read_stamped(mut from: OwnedReadHalf, to: mpsc::Sender<(Instant, Vec<u8>)>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.send((Instant::now(), buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn write_after(
    mut to: OwnedWriteHalf,
    mut from: mpsc::Receiver<(Instant, Vec<u8>)>,
    delay: Duration,
) {
    while let Some((arrived, bytes)) = from.recv().await {
        tokio::time::sleep_until(arrived + delay).await;
        if to.write_all(&bytes).await.is_err() {
            return;
        }
    }
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server behind the proxy: every byte comes back, in order, and no sooner than the round trip
    /// (a lower bound: a busy machine can only add to it).
    #[tokio::test]
    async fn bytes_come_back_in_order_after_the_round_trip() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (conn, _) = echo.accept().await.unwrap();
            let (mut from, mut to) = conn.into_split();
            tokio::io::copy(&mut from, &mut to).await.unwrap();
        });
        let rtt = Duration::from_millis(40);
        let proxy = DelayProxy::start(upstream, rtt).await.unwrap();
        let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
        for round in 0..3u8 {
            let sent: Vec<u8> = (0..1000u32)
                .map(|i| (i as u8).wrapping_add(round))
                .collect();
            let began = Instant::now();
            conn.write_all(&sent).await.unwrap();
            let mut back = vec![0u8; sent.len()];
            conn.read_exact(&mut back).await.unwrap();
            assert!(began.elapsed() >= rtt, "{:?}", began.elapsed());
            assert_eq!(back, sent);
        }
    }
}
