//! An iperf-like TCP pair for tunnel throughput: a sink that counts what arrives and, at end of stream,
//! answers with the count; and a pusher that sends a given number of bytes and waits for that answer, so the
//! time covers every byte reaching the far end, not just leaving this one.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const CHUNK: usize = 64 * 1024;

/// A counting sink on loopback. Dropping it stops the accept loop; [`Sink::stop`] also waits for it.
#[derive(Debug)]
pub struct Sink {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Sink {
    pub async fn bind() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (shutdown, tasks) = (CancellationToken::new(), TaskTracker::new());
        let (stop, owned) = (shutdown.clone(), tasks.clone());
        tasks.spawn(async move {
            loop {
                let stream = tokio::select! {
                    () = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((s, _)) => s,
                        Err(_) => continue,
                    },
                };
                let stop = stop.clone();
                owned.spawn(async move {
                    tokio::select! {
                        () = stop.cancelled() => {}
                        r = drain(stream) => if let Err(e) = r {
                            tracing::debug!(error = %e, "sink connection failed");
                        },
                    }
                });
            }
        });
        Ok(Self {
            addr,
            shutdown,
            tasks,
        })
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Reads to end of stream, then writes the byte count.
async fn drain(mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut total: u64 = 0;
    loop {
        match stream.read(&mut buf).await? {
            0 => break,
            n => total += n as u64,
        }
    }
    stream.write_all(&total.to_be_bytes()).await?;
    stream.shutdown().await
}

/// Sends `bytes` to `addr` and returns how long until the far end confirmed it had them all.
pub async fn push(addr: SocketAddr, bytes: u64) -> Result<Duration> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let chunk = vec![b'x'; CHUNK];
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        stream.write_all(&chunk[..n]).await?;
        left -= n as u64;
    }
    stream.shutdown().await?;
    let mut count = [0u8; 8];
    stream.read_exact(&mut count).await?;
    let elapsed = start.elapsed();
    let got = u64::from_be_bytes(count);
    ensure!(got == bytes, "the sink received {got} of {bytes} bytes");
    Ok(elapsed)
}
