//! Accepting connections: Nagle off, and a lingering close.
//!
//! A server that answers before it has read the whole request (a 413 for a
//! body over the limit, a CORS refusal) and then closes the socket makes
//! the kernel answer the bytes still arriving with a reset, and a reset
//! destroys the response in the client's buffers before the client reads
//! it. Clients that send the whole body before reading (Python's urllib and
//! requests, many mobile HTTP stacks) then see a broken pipe instead of the
//! answer. So, as nginx's lingering close does, every connection is closed
//! by shutting down its sending side and reading and discarding what the
//! client still sends, for a bounded time and number of bytes, before the
//! socket is let go.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use poem::listener::{Acceptor, TcpAcceptor};
use poem::web::{LocalAddr, RemoteAddr};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

/// Longest a closed connection is read from (nginx's `lingering_time`).
pub const LINGER_TIME: Duration = Duration::from_secs(30);
/// Longest wait for the client's next bytes or its close (nginx's `lingering_timeout`).
pub const LINGER_IDLE: Duration = Duration::from_secs(5);
/// Most bytes read and discarded after the answer (several bodies' worth).
pub const LINGER_BYTES: usize = 64 * 1024 * 1024;
/// Most connections lingering at once; past it, a connection just closes.
pub const MAX_LINGERING: usize = 1024;

/// Accepts TCP connections with Nagle's algorithm off (a response written
/// in several pieces would otherwise wait for the client's delayed ACK,
/// tens of milliseconds, between them), each closed lingering.
pub struct Listener {
    acceptor: TcpAcceptor,
    lingering: Arc<Semaphore>,
}

impl Listener {
    pub fn new(acceptor: TcpAcceptor) -> Listener {
        Listener {
            acceptor,
            lingering: Arc::new(Semaphore::new(MAX_LINGERING)),
        }
    }
}

impl Acceptor for Listener {
    type Io = Lingering;

    fn local_addr(&self) -> Vec<LocalAddr> {
        self.acceptor.local_addr()
    }

    async fn accept(&mut self) -> io::Result<(Self::Io, LocalAddr, RemoteAddr, poem::http::uri::Scheme)> {
        let (stream, local, remote, scheme) = self.acceptor.accept().await?;
        stream.set_nodelay(true)?;
        let connection = Lingering {
            stream: Some(stream),
            lingering: self.lingering.clone(),
        };
        Ok((connection, local, remote, scheme))
    }
}

/// A connection that, when dropped, is closed lingering (see the module
/// docs), while fewer than [`MAX_LINGERING`] others are.
pub struct Lingering {
    /// `None` only once dropped.
    stream: Option<TcpStream>,
    lingering: Arc<Semaphore>,
}

impl Lingering {
    fn stream(self: Pin<&mut Self>) -> Pin<&mut TcpStream> {
        Pin::new(
            self.get_mut()
                .stream
                .as_mut()
                .expect("a connection is open until dropped"),
        )
    }
}

impl AsyncRead for Lingering {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.stream().poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.stream().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.is_write_vectored())
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        // Dropping happens inside the connection's task, on the runtime;
        // without one (the runtime is going away), or with too many
        // connections lingering already, the socket just closes.
        let (Some(stream), Ok(runtime)) = (self.stream.take(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        if let Ok(permit) = self.lingering.clone().try_acquire_owned() {
            runtime.spawn(async move {
                linger(stream).await;
                drop(permit);
            });
        }
    }
}

/// Sends FIN (the answer is complete), then reads and discards until the
/// client closes, goes quiet for [`LINGER_IDLE`], or [`LINGER_TIME`] or
/// [`LINGER_BYTES`] run out. A client that had already closed costs one read.
async fn linger(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let deadline = tokio::time::Instant::now() + LINGER_TIME;
    let mut buf = [0u8; 8192];
    let mut discarded = 0;
    while discarded < LINGER_BYTES {
        let wait = deadline.min(tokio::time::Instant::now() + LINGER_IDLE);
        match tokio::time::timeout_at(wait, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => discarded += n,
            _ => return, // closed, failed, quiet or out of time
        }
    }
}
