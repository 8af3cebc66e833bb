//! Carries the framed byte stream over WebSocket binary messages.
//!
//! [`WsIo`] turns any WebSocket (a `Stream` + `Sink` of messages, from tokio-tungstenite on the agent or axum on
//! the relay) into `AsyncRead + AsyncWrite`, so the framing and the handshake run unchanged over it. Each
//! write becomes one binary message; the caller converts its library's message type with two plain
//! functions, which keeps this crate free of any WebSocket library.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What an incoming WebSocket message means for the byte stream.
#[derive(Debug)]
pub enum WsFrame {
    /// Payload bytes.
    Data(Bytes),
    /// Control traffic the library handles itself (ping, pong): nothing to read.
    Skip,
    /// The peer closed the WebSocket.
    Close,
}

/// A WebSocket seen as a byte stream.
pub struct WsIo<S, M> {
    inner: S,
    pending: Bytes,
    eof: bool,
    to_msg: fn(Bytes) -> M,
    from_msg: fn(M) -> WsFrame,
}

impl<S, M> std::fmt::Debug for WsIo<S, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsIo")
            .field("pending", &self.pending.len())
            .field("eof", &self.eof)
            .finish()
    }
}

impl<S, M> WsIo<S, M> {
    pub fn new(inner: S, to_msg: fn(Bytes) -> M, from_msg: fn(M) -> WsFrame) -> Self {
        Self {
            inner,
            pending: Bytes::new(),
            eof: false,
            to_msg,
            from_msg,
        }
    }
}

fn io_err<E: std::error::Error + Send + Sync + 'static>(e: E) -> io::Error {
    io::Error::other(e)
}

impl<S, M, E> AsyncRead for WsIo<S, M>
where
    S: Stream<Item = Result<M, E>> + Unpin,
    E: std::error::Error + Send + Sync + 'static,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.inner).poll_next(cx)) {
                Some(Ok(msg)) => match (this.from_msg)(msg) {
                    WsFrame::Data(b) => this.pending = b,
                    WsFrame::Skip => {}
                    WsFrame::Close => this.eof = true,
                },
                Some(Err(e)) => return Poll::Ready(Err(io_err(e))),
                None => this.eof = true,
            }
        }
    }
}

impl<S, M, E> AsyncWrite for WsIo<S, M>
where
    S: Sink<M, Error = E> + Unpin,
    E: std::error::Error + Send + Sync + 'static,
{
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(Pin::new(&mut this.inner).poll_ready(cx)).map_err(io_err)?;
        let msg = (this.to_msg)(Bytes::copy_from_slice(buf));
        Pin::new(&mut this.inner).start_send(msg).map_err(io_err)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx).map_err(io_err)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx).map_err(io_err)
    }
}
