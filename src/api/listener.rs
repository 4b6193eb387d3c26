//! Accepting connections: within the replica's and each address's
//! limits, Nagle off, never spinning when accepting fails, a pace the
//! client must keep when taking what is sent to it, and a lingering close.
//!
//! Everything the server sends (answers, stream events, socket messages)
//! must be taken by the client at a least pace ([`SendPace`]): a write
//! that cannot go within `SEND_TIMEOUT`, or a client that takes less than
//! `SEND_MIN_RATE` bytes a second on average once it has fallen behind,
//! fails the connection, and with it whatever the server held for it.
//! Otherwise a client that never reads would hold its answers for ever.
//!
//! A server that answers before it has read the whole request (a 413 for a
//! body over the limit, a refused token) and then closes the socket makes
//! the kernel answer the bytes still arriving with a reset, and a reset
//! destroys the response in the client's buffers before the client reads
//! it. Clients that send the whole body before reading (Python's urllib and
//! requests, many mobile HTTP stacks) then see a broken pipe instead of the
//! answer. So, as nginx's lingering close does, every connection is closed
//! by shutting down its sending side and reading and discarding what the
//! client still sends, for a bounded time and number of bytes, before the
//! socket is let go.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::metrics::Metrics;

/// Longest a closed connection is read from (nginx's `lingering_time`).
pub const LINGER_TIME: Duration = Duration::from_secs(30);
/// Longest wait for the client's next bytes or its close (nginx's `lingering_timeout`).
pub const LINGER_IDLE: Duration = Duration::from_secs(5);
/// Most bytes read and discarded after the answer (several bodies' worth).
pub const LINGER_BYTES: usize = 64 * 1024 * 1024;
/// Most connections lingering at once; past it, a connection just closes.
pub const MAX_LINGERING: usize = 1024;
/// Longest pause after accepting failed (out of descriptors, say); the
/// pause doubles from 5 ms up to this while it keeps failing.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// How many connections a replica holds at once, and the pace their
/// clients must keep.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// In all (`MAX_CONNECTIONS`).
    pub total: usize,
    /// From one IP address (`MAX_CONNECTIONS_PER_ADDRESS`; 0: no limit).
    pub per_address: usize,
    /// Longest a write may wait (`SEND_TIMEOUT`), and the grace before
    /// `min_rate` applies.
    pub send_timeout: Duration,
    /// Least average rate a client that fell behind must take bytes at
    /// (`SEND_MIN_RATE`, bytes a second).
    pub send_min_rate: u64,
}

/// The open connections, in all and by address.
#[derive(Default)]
struct Open {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// A connection's place among the open ones, given back when dropped.
struct Slot {
    open: Arc<Mutex<Open>>,
    address: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.total -= 1;
        if let Some(n) = open.by_address.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                open.by_address.remove(&self.address);
            }
        }
    }
}

/// Accepts TCP connections within [`ConnectionLimits`], with Nagle's
/// algorithm off (a response written in several pieces would otherwise
/// wait for the client's delayed ACK, tens of milliseconds, between
/// them), each closed lingering.
pub struct Listener {
    tcp: TcpListener,
    limits: ConnectionLimits,
    open: Arc<Mutex<Open>>,
    lingering: Arc<Semaphore>,
    metrics: Metrics,
    refused: AtomicU64,
}

impl Listener {
    pub fn new(tcp: TcpListener, limits: ConnectionLimits, metrics: Metrics) -> Listener {
        Listener {
            tcp,
            limits,
            open: Arc::default(),
            lingering: Arc::new(Semaphore::new(MAX_LINGERING)),
            metrics,
            refused: AtomicU64::new(0),
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// The next connection within the limits, and its peer. A connection
    /// over a limit is closed at once, so the backlog keeps moving and
    /// other addresses still get in. Never fails: when accepting fails
    /// (out of file descriptors, say) it logs, waits and tries again,
    /// backing off, rather than spinning.
    pub async fn accept(&self) -> (Lingering, SocketAddr) {
        let mut backoff = Duration::ZERO;
        loop {
            match self.tcp.accept().await {
                Ok((stream, peer)) => {
                    backoff = Duration::ZERO;
                    let Some(slot) = self.take_slot(peer.ip()) else {
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let connection = Lingering {
                        stream: Some(stream),
                        lingering: self.lingering.clone(),
                        slot: Some(slot),
                        pace: SendPace::new(self.limits.send_timeout, self.limits.send_min_rate),
                    };
                    return (connection, peer);
                }
                // The peer gave up before it was accepted: nothing to wait for.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    backoff = (backoff * 2).clamp(Duration::from_millis(5), MAX_ACCEPT_BACKOFF);
                    tracing::warn!(error = %e, retry_in = ?backoff, "accepting a connection failed");
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    }

    /// A slot for a connection from `address`, if both limits allow one.
    fn take_slot(&self, address: IpAddr) -> Option<Slot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let from_address = open.by_address.get(&address).copied().unwrap_or(0);
        let limit = if open.total >= self.limits.total {
            Some("replica")
        } else if self.limits.per_address > 0 && from_address >= self.limits.per_address {
            Some("address")
        } else {
            None
        };
        if let Some(limit) = limit {
            drop(open);
            self.metrics.connection_refused(limit);
            // The first refusal, then one in a thousand: an attack must not flood the log.
            if self.refused.fetch_add(1, Ordering::Relaxed).is_multiple_of(1000) {
                tracing::warn!(limit, %address, "connection refused: too many open connections");
            }
            return None;
        }
        open.total += 1;
        *open.by_address.entry(address).or_default() += 1;
        Some(Slot {
            open: self.open.clone(),
            address,
        })
    }
}

/// A connection that, when dropped, is closed lingering (see the module
/// docs), while fewer than [`MAX_LINGERING`] others are; its writes keep
/// to a [`SendPace`].
pub struct Lingering {
    /// `None` only once dropped.
    stream: Option<TcpStream>,
    lingering: Arc<Semaphore>,
    /// Held until the socket is let go, lingering included.
    slot: Option<Slot>,
    pace: SendPace,
}

/// The pace at which a client takes what is sent to it. A write that
/// cannot go at once starts a spell of falling behind, which ends when
/// everything written has gone (a flush completes); within a spell,
/// writes must keep going: each within `timeout` of the last, and on
/// average at `min_rate` after the first `timeout`. Else the write fails
/// ([`io::ErrorKind::TimedOut`]), and with it the connection.
struct SendPace {
    timeout: Duration,
    min_rate: u64,
    behind: Option<Behind>,
    /// Set once the pace was not kept: the connection is not lingered over.
    broken: bool,
}

/// A spell of falling behind.
struct Behind {
    since: tokio::time::Instant,
    last: tokio::time::Instant,
    written: u64,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl SendPace {
    fn new(timeout: Duration, min_rate: u64) -> SendPace {
        SendPace {
            timeout,
            min_rate: min_rate.max(1),
            behind: None,
            broken: false,
        }
    }

    /// Passes on what a write or flush of the socket gave, counting its
    /// bytes; a `Pending` one is failed once the client is too slow.
    fn keep<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
        written: impl Fn(&T) -> usize,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Ready(Ok(done)) => {
                if let Some(behind) = &mut self.behind {
                    behind.written += written(&done) as u64;
                    behind.last = tokio::time::Instant::now();
                }
                Poll::Ready(Ok(done))
            }
            Poll::Pending => {
                let now = tokio::time::Instant::now();
                let timeout = self.timeout;
                let behind = self.behind.get_or_insert_with(|| Behind {
                    since: now,
                    last: now,
                    written: 0,
                    timer: Box::pin(tokio::time::sleep(timeout)),
                });
                let on_pace =
                    behind.since + self.timeout + Duration::from_secs_f64(behind.written as f64 / self.min_rate as f64);
                let deadline = on_pace.min(behind.last + self.timeout);
                behind.timer.as_mut().reset(deadline);
                if behind.timer.as_mut().poll(cx).is_ready() {
                    self.broken = true;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client does not take what is sent to it",
                    )));
                }
                Poll::Pending
            }
            failed => failed,
        }
    }

    /// Everything written has gone: the client keeps up again.
    fn caught_up(&mut self) {
        self.behind = None;
    }
}

impl Lingering {
    fn parts(self: Pin<&mut Self>) -> (Pin<&mut TcpStream>, &mut SendPace) {
        let this = self.get_mut();
        let stream = this.stream.as_mut().expect("a connection is open until dropped");
        (Pin::new(stream), &mut this.pace)
    }

    fn stream(self: Pin<&mut Self>) -> Pin<&mut TcpStream> {
        self.parts().0
    }
}

impl AsyncRead for Lingering {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let (stream, pace) = self.parts();
        let polled = stream.poll_write(cx, buf);
        pace.keep(cx, polled, |n| *n)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (stream, pace) = self.parts();
        let polled = stream.poll_flush(cx);
        if let Poll::Ready(Ok(())) = polled {
            pace.caught_up();
        }
        pace.keep(cx, polled, |_| 0)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let (stream, pace) = self.parts();
        let polled = stream.poll_write_vectored(cx, bufs);
        pace.keep(cx, polled, |n| *n)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.is_write_vectored())
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        // Dropping happens inside the connection's task, on the runtime;
        // without one (the runtime is going away), with too many
        // connections lingering already, or for a client that stopped
        // taking what was sent (lingering is for clients still sending),
        // the socket just closes.
        let (Some(stream), Ok(runtime)) = (self.stream.take(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        if self.pace.broken {
            // Reset rather than closed: a plain close would leave what the
            // kernel still holds for the client (megabytes of an answer)
            // trickling out to it for as long as it keeps reading slowly.
            let _ = stream.set_zero_linger();
            return;
        }
        if let Ok(permit) = self.lingering.clone().try_acquire_owned() {
            let slot = self.slot.take();
            runtime.spawn(async move {
                linger(stream).await;
                drop((permit, slot));
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
