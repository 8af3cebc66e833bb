//! Framing: every message is a 4-byte big-endian length followed by that many bytes of JSON.
//!
//! The length is checked against [`MAX_FRAME_LEN`] before any payload is buffered, so a peer cannot make us
//! allocate more than one maximum frame. [`check`] and [`decode`] are sans-IO (and fuzzed); [`FrameReader`] and
//! [`FrameWriter`] wrap any async byte stream, which is how the same framing runs over a QUIC stream and over
//! WebSocket binary messages.

use std::io;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest frame either side sends or accepts, payload only. Task output is chunked well below this.
pub const MAX_FRAME_LEN: usize = 1024 * 1024;

/// Bytes in the length prefix.
pub const HEADER_LEN: usize = 4;

/// What went wrong reading or writing a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer announced a frame larger than we accept; the connection cannot be resynchronised.
    #[error("frame of {len} bytes is larger than the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    /// The stream ended in the middle of a frame.
    #[error("connection closed in the middle of a frame ({have} of {want} bytes)")]
    Truncated { have: usize, want: usize },
    /// The payload is not a message we understand.
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    /// Nothing arrived within the allowed time.
    #[error("no message within {0:?}")]
    Timeout(Duration),
    /// The transport failed.
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
}

/// The result of looking at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Check {
    /// More bytes are needed; at least this many in total.
    Incomplete(usize),
    /// A whole frame is present: header plus payload is this many bytes.
    Complete(usize),
}

/// What [`FrameReader`] found at the front of its buffer.
enum Taken<T> {
    Message(T),
    /// Not whole yet: header plus payload will be this many bytes.
    Need(usize),
}

/// Looks at `buf` without consuming it: is a whole frame there, and is its announced size acceptable?
pub fn check(buf: &[u8]) -> Result<Check, FrameError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(Check::Incomplete(HEADER_LEN));
    };
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    let total = HEADER_LEN + len;
    Ok(if buf.len() >= total {
        Check::Complete(total)
    } else {
        Check::Incomplete(total)
    })
}

/// Decodes one frame from the front of `buf`: `Ok(None)` when it is incomplete, otherwise the message and
/// the number of bytes it used.
pub fn decode<T: DeserializeOwned>(buf: &[u8]) -> Result<Option<(T, usize)>, FrameError> {
    match check(buf)? {
        Check::Incomplete(_) => Ok(None),
        Check::Complete(total) => Ok(Some((
            serde_json::from_slice(&buf[HEADER_LEN..total])?,
            total,
        ))),
    }
}

/// Encodes one message as a frame, refusing to produce one the peer would reject.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0; HEADER_LEN];
    serde_json::to_writer(&mut out, msg)?;
    let len = out.len() - HEADER_LEN;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    out[..HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// The receiving half of a framed connection.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            buf: BytesMut::with_capacity(4096),
        }
    }

    /// Reads the next message. `Ok(None)` means the peer closed the stream cleanly between frames.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        loop {
            let want = match self.take()? {
                Taken::Message(msg) => return Ok(Some(msg)),
                Taken::Need(want) => want,
            };
            self.buf
                .reserve(want.saturating_sub(self.buf.len()).min(64 * 1024));
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return match self.buf.len() {
                    0 => Ok(None),
                    have => Err(FrameError::Truncated { have, want }),
                };
            }
        }
    }

    /// The next message if it has already arrived whole, without reading from the connection: a caller takes
    /// a burst in one go this way, bounded by what one read brought. `Ok(None)` when no whole frame is here.
    pub fn recv_buffered<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        Ok(match self.take()? {
            Taken::Message(msg) => Some(msg),
            Taken::Need(_) => None,
        })
    }

    /// Takes the frame at the front of the buffer if it is whole, or says how many bytes in all it needs.
    fn take<T: DeserializeOwned>(&mut self) -> Result<Taken<T>, FrameError> {
        match check(&self.buf)? {
            Check::Complete(total) => {
                let msg = serde_json::from_slice(&self.buf[HEADER_LEN..total]);
                // Consume the frame even when it is malformed, so the caller may choose to carry on.
                self.buf.advance(total);
                Ok(Taken::Message(msg?))
            }
            Check::Incomplete(want) => Ok(Taken::Need(want)),
        }
    }

    /// Like [`recv`](Self::recv), but gives up after `limit`. A clean close becomes an error here, because
    /// callers that wait with a deadline expect a message.
    pub async fn recv_timeout<T: DeserializeOwned>(
        &mut self,
        limit: Duration,
    ) -> Result<T, FrameError> {
        match tokio::time::timeout(limit, self.recv()).await {
            Ok(Ok(Some(msg))) => Ok(msg),
            Ok(Ok(None)) => Err(FrameError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(FrameError::Timeout(limit)),
        }
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

/// The sending half of a framed connection.
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        Self { inner }
    }

    /// Writes one message and flushes it.
    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), FrameError> {
        let frame = encode(msg)?;
        self.inner.write_all(&frame).await?;
        self.inner.flush().await?;
        Ok(())
    }

    /// Shuts down the sending direction, telling the peer no more frames follow.
    pub async fn shutdown(&mut self) -> Result<(), FrameError> {
        Ok(self.inner.shutdown().await?)
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[tokio::test]
    async fn round_trip_over_a_tiny_duplex() {
        let (a, b) = tokio::io::duplex(8);
        let mut w = FrameWriter::new(a);
        let mut r = FrameReader::new(b);
        let sent = json!({"type": "hello", "text": "x".repeat(10_000)});
        let expect = sent.clone();
        let writer = tokio::spawn(async move { w.send(&sent).await });
        assert_eq!(r.recv::<Value>().await.unwrap(), Some(expect));
        writer.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn oversized_length_is_refused_before_buffering() {
        let (mut a, b) = tokio::io::duplex(64);
        let mut r = FrameReader::new(b);
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let err = r.recv::<Value>().await.unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { len, .. } if len == u32::MAX as usize),
            "{err}"
        );
        assert!(
            r.buf.capacity() < 64 * 1024,
            "reader buffered {} bytes",
            r.buf.capacity()
        );
    }

    #[tokio::test]
    async fn truncated_frame_is_an_error_not_a_clean_close() {
        let (mut a, b) = tokio::io::duplex(64);
        let mut r = FrameReader::new(b);
        a.write_all(&[0, 0, 0, 10, b'{']).await.unwrap();
        drop(a);
        let err = r.recv::<Value>().await.unwrap_err();
        assert!(
            matches!(err, FrameError::Truncated { have: 5, want: 14 }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn clean_close_between_frames() {
        let (a, b) = tokio::io::duplex(64);
        drop(a);
        assert!(FrameReader::new(b).recv::<Value>().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn garbage_payload_is_malformed_and_the_stream_stays_in_sync() {
        let (mut a, b) = tokio::io::duplex(64);
        let mut r = FrameReader::new(b);
        a.write_all(&[0, 0, 0, 3, 0xff, 0xfe, 0x00]).await.unwrap();
        a.write_all(&encode(&json!(7)).unwrap()).await.unwrap();
        assert!(matches!(
            r.recv::<Value>().await,
            Err(FrameError::Malformed(_))
        ));
        assert_eq!(r.recv::<Value>().await.unwrap(), Some(json!(7)));
    }

    #[tokio::test(start_paused = true)]
    async fn recv_timeout_gives_up() {
        let (_a, b) = tokio::io::duplex(64);
        let mut r = FrameReader::new(b);
        let err = r
            .recv_timeout::<Value>(Duration::from_secs(3))
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::Timeout(_)));
    }

    #[test]
    fn encode_refuses_what_the_peer_would_refuse() {
        let big = "x".repeat(MAX_FRAME_LEN);
        assert!(matches!(encode(&big), Err(FrameError::TooLarge { .. })));
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = decode::<crate::AgentMessage>(&bytes);
            let _ = decode::<crate::RelayMessage>(&bytes);
        }

        #[test]
        fn every_split_point_decodes_the_same(text in ".{0,200}", split in 0usize..300) {
            let frame = encode(&text).unwrap();
            let split = split.min(frame.len());
            if split < frame.len() {
                proptest::prop_assert!(decode::<String>(&frame[..split]).unwrap().is_none());
            }
            proptest::prop_assert_eq!(decode::<String>(&frame).unwrap(), Some((text, frame.len())));
        }
    }
}
