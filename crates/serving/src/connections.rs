//! Admission of client connections, shared by every listener of a process: at most
//! `server.max_connections` open at once (one beyond is closed at once and logged), and
//! each connection bounded in time. A connection must send its first bytes within
//! `server.handshake_timeout` (a silent client cannot hold a descriptor), and one that
//! moves no byte either way for `server.idle_timeout` is closed. Without these, 20,000
//! silent TCP connections exhausted the descriptors and every query timed out.
//!
//! Each HTTP request's headers must also arrive within `server.handshake_timeout` (the
//! HTTP loop in `server.rs` sets it as hyper's header-read timeout): a client that trickles
//! them cannot hold a connection either.
//!
//! The first answer is deliberately not part of the handshake: a query may run longer than
//! the handshake timeout before its first byte is written, and must not be cut off.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use strata_core::config::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tracing::warn;

use crate::coalesced_writes::CoalescedWrites;

/// Refused connections are logged at most this often (with the count since the last line).
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// The connection budget and timeouts of one process, with counters for `/metrics`.
pub struct ConnectionGuard {
    permits: Arc<Semaphore>,
    max: usize,
    handshake: Duration,
    idle: Duration,
    refused: AtomicU64,
    timed_out: AtomicU64,
    last_refusal_log: std::sync::Mutex<Option<(Instant, u64)>>,
}

impl ConnectionGuard {
    pub fn new(server: &ServerConfig) -> Arc<Self> {
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(server.max_connections)),
            max: server.max_connections,
            handshake: server.handshake_timeout,
            idle: server.idle_timeout,
            refused: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            last_refusal_log: std::sync::Mutex::new(None),
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.max - self.permits.available_permits()
    }

    /// Connections closed at accept because `server.max_connections` were open.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Connections closed by the handshake or idle timeout.
    pub fn timed_out(&self) -> u64 {
        self.timed_out.load(Ordering::Relaxed)
    }

    fn refuse(&self, peer: SocketAddr) {
        let total = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last_refusal_log.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if last.is_none_or(|(at, _)| now.duration_since(at) >= REFUSAL_LOG_EVERY) {
            let since = total - last.map_or(0, |(_, count)| count);
            warn!(
                %peer,
                open = self.max,
                refused_since_last_report = since,
                "connection refused: server.max_connections ({}) are open",
                self.max
            );
            *last = Some((now, total));
        }
    }
}

/// A listener whose connections are admitted by a [`ConnectionGuard`]; serves both the
/// HTTP loop (through [`GuardedListener::next`]) and tonic (through
/// [`GuardedListener::into_incoming`]).
pub struct GuardedListener {
    listener: TcpListener,
    guard: Arc<ConnectionGuard>,
}

impl GuardedListener {
    pub fn new(listener: TcpListener, guard: Arc<ConnectionGuard>) -> Self {
        Self { listener, guard }
    }

    /// The next admitted connection. Accept errors (out of descriptors) are logged and
    /// retried after a pause rather than ending the server.
    pub async fn next(&mut self) -> (GuardedIo, SocketAddr) {
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    warn!(error = %err, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&self.guard.permits).try_acquire_owned() else {
                self.guard.refuse(peer);
                drop(stream);
                continue;
            };
            // Small responses (point lookups) must not wait for Nagle and delayed ACKs.
            let _ = stream.set_nodelay(true);
            return (GuardedIo::new(stream, permit, Arc::clone(&self.guard)), peer);
        }
    }

    /// The admitted connections as the stream tonic serves.
    pub fn into_incoming(self) -> impl futures::Stream<Item = io::Result<GuardedIo>> + Send + 'static {
        futures::stream::unfold(self, |mut listener| async move {
            let (io, _) = listener.next().await;
            Some((Ok(io), listener))
        })
    }
}

/// One admitted connection: holds its permit until dropped, and fails its reads once the
/// handshake or idle deadline passes (the server then closes it).
pub struct GuardedIo {
    /// Large answers reach the socket in a few big writes (see `coalesced_writes`).
    stream: CoalescedWrites<TcpStream>,
    _permit: OwnedSemaphorePermit,
    guard: Arc<ConnectionGuard>,
    /// When the connection is closed unless it has made progress by then.
    deadline: Pin<Box<Sleep>>,
    last_activity: Instant,
    read_any: bool,
}

impl GuardedIo {
    fn new(stream: TcpStream, permit: OwnedSemaphorePermit, guard: Arc<ConnectionGuard>) -> Self {
        let now = Instant::now();
        let deadline = Box::pin(tokio::time::sleep_until(now + guard.handshake));
        Self {
            stream: CoalescedWrites::new(stream),
            _permit: permit,
            guard,
            deadline,
            last_activity: now,
            read_any: false,
        }
    }

    /// The client's address.
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.stream.get_ref().peer_addr().ok()
    }

    fn handshaken(&self) -> bool {
        self.read_any
    }

    /// Called while a read is pending: an error once the connection is out of time.
    fn check_deadline(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        loop {
            if self.deadline.as_mut().poll(cx).is_pending() {
                return None;
            }
            // The timer fired: a connection past its handshake that moved bytes since gets
            // a new idle deadline; any other is done.
            if self.handshaken() {
                let next = self.last_activity + self.guard.idle;
                if next > Instant::now() {
                    self.deadline.as_mut().reset(next);
                    continue;
                }
            }
            self.guard.timed_out.fetch_add(1, Ordering::Relaxed);
            let what = if self.handshaken() { "server.idle_timeout" } else { "server.handshake_timeout" };
            return Some(io::Error::new(io::ErrorKind::TimedOut, format!("connection closed by {what}")));
        }
    }
}

impl AsyncRead for GuardedIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.read_any = true;
                    this.last_activity = Instant::now();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.check_deadline(cx) {
                Some(err) => Poll::Ready(Err(err)),
                None => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for GuardedIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.stream).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = written
            && n > 0
        {
            this.last_activity = Instant::now();
        }
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = written
            && n > 0
        {
            this.last_activity = Instant::now();
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for GuardedIo {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.get_ref().connect_info()
    }
}
