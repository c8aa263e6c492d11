//! Large answers written to the socket in a few big writes instead of one per HTTP/2 frame.
//!
//! Why: h2 holds one DATA frame at a time and flushes it before it takes the next, and a
//! DATA frame is at most the size the client accepts (`SETTINGS_MAX_FRAME_SIZE`, 16 KiB for
//! tonic's and most gRPC clients' defaults). Without this, a gigabyte of Flight data is
//! 65,000 `writev` calls, each running the kernel's TCP send path and, on loopback, the
//! reader's receive path and wake-up. A server cannot raise the frame size its peer
//! accepts, but it can hand the kernel many frames at once.
//!
//! How: a write of at least [`BULK`] bytes (a frame's worth) is staged in a buffer instead
//! of reaching the socket; later writes join it while it is not empty, so bytes keep their
//! order. A flush right after staged writes is deferred: the task is woken so that it
//! flushes again on its next poll, and h2 meanwhile stages its next frames. A flush with
//! no write since the last one (h2 has nothing more to send), a full buffer, or a shutdown
//! writes everything staged. Small writes (a lookup's headers, row and trailers) with
//! nothing staged go straight to the socket, as before: a lookup pays no copy and no
//! extra poll.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Writes of at least this many bytes are staged (one 16 KiB DATA frame and its header).
pub const BULK: usize = 16 << 10;
/// Staged bytes written at once, at most: what a flush or a full buffer hands the kernel.
pub const STAGED_MAX: usize = 256 << 10;

/// `inner`, with large writes staged and written together (see the module docs).
pub struct CoalescedWrites<T> {
    inner: T,
    staged: Vec<u8>,
    /// How much of `staged` the socket has taken (a write may take part of it).
    written: usize,
    /// Bytes were staged since the last flush: the next flush may be deferred.
    staged_since_flush: bool,
}

impl<T> CoalescedWrites<T> {
    pub fn new(inner: T) -> Self {
        Self { inner, staged: Vec::new(), written: 0, staged_since_flush: false }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    fn pending(&self) -> usize {
        self.staged.len() - self.written
    }

    /// Copies `bufs` into the staging buffer (the caller checked that they fit).
    fn stage(&mut self, bufs: &[io::IoSlice<'_>]) -> usize {
        if self.staged.capacity() == 0 {
            self.staged.reserve_exact(STAGED_MAX);
        }
        let before = self.staged.len();
        for buf in bufs {
            self.staged.extend_from_slice(buf);
        }
        self.staged_since_flush = true;
        self.staged.len() - before
    }
}

impl<T: AsyncWrite + Unpin> CoalescedWrites<T> {
    /// Writes everything staged to `inner`, resuming where an earlier call stopped.
    fn poll_write_staged(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.pending() > 0 {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.staged[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.staged.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    fn poll_write_slices(&mut self, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if self.pending() == 0 && len < BULK {
            return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        }
        // The buffer's length, not what is left of it, is bounded: it never grows past its
        // first allocation.
        if self.staged.len() + len > STAGED_MAX {
            ready!(self.poll_write_staged(cx))?;
            if len >= STAGED_MAX {
                return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
            }
        }
        Poll::Ready(Ok(self.stage(bufs)))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CoalescedWrites<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_slices(cx, &[io::IoSlice::new(data)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_slices(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.staged_since_flush && this.pending() > 0 {
            // The writer may have more frames: let it stage them first, and make sure it
            // comes back to flush (the flush after no new write writes everything).
            this.staged_since_flush = false;
            cx.waker().wake_by_ref();
            return Poll::Ready(Ok(()));
        }
        this.staged_since_flush = false;
        ready!(this.poll_write_staged(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.staged_since_flush = false;
        ready!(this.poll_write_staged(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CoalescedWrites<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};

    use super::*;

    /// A socket that records each write it takes, and takes at most `accept` bytes per
    /// write, or none (pending) while `blocked`.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        accept: Option<usize>,
        blocked: bool,
        flushes: usize,
        shut: bool,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            if this.blocked {
                return Poll::Pending;
            }
            let n = this.accept.map_or(data.len(), |max| max.min(data.len()));
            this.writes.push(data[..n].to_vec());
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().flushes += 1;
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().shut = true;
            Poll::Ready(Ok(()))
        }
    }

    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn context() -> (Arc<CountingWaker>, Waker) {
        let counter = Arc::new(CountingWaker::default());
        let waker = Waker::from(Arc::clone(&counter));
        (counter, waker)
    }

    fn write(io: &mut CoalescedWrites<Recorder>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(io).poll_write(cx, data)
    }

    fn flush(io: &mut CoalescedWrites<Recorder>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(io).poll_flush(cx)
    }

    /// A frame-sized write: its bytes tell where in the stream they belong.
    fn frame(i: usize) -> Vec<u8> {
        (0..BULK + 9).map(|j| (i * 31 + j) as u8).collect()
    }

    fn received(io: &CoalescedWrites<Recorder>) -> Vec<u8> {
        io.get_ref().writes.concat()
    }

    #[test]
    fn small_writes_with_nothing_staged_reach_the_socket_at_once() {
        let (wakes, waker) = context();
        let mut cx = Context::from_waker(&waker);
        let mut io = CoalescedWrites::new(Recorder::default());
        assert!(matches!(write(&mut io, &mut cx, b"headers and one row"), Poll::Ready(Ok(19))));
        assert_eq!(io.get_ref().writes, vec![b"headers and one row".to_vec()]);
        assert!(matches!(flush(&mut io, &mut cx), Poll::Ready(Ok(()))));
        assert_eq!(io.get_ref().flushes, 1);
        assert_eq!(wakes.0.load(Ordering::Relaxed), 0, "a small answer costs no extra poll");
    }

    #[test]
    fn frames_flushed_one_by_one_reach_the_socket_in_a_few_writes_in_order() {
        let (wakes, waker) = context();
        let mut cx = Context::from_waker(&waker);
        let mut io = CoalescedWrites::new(Recorder::default());
        let frames: Vec<Vec<u8>> = (0..64).map(frame).collect();
        // As h2 does: each frame written and flushed before the next is taken.
        for f in &frames {
            assert!(matches!(write(&mut io, &mut cx, f), Poll::Ready(Ok(n)) if n == f.len()));
            assert!(matches!(flush(&mut io, &mut cx), Poll::Ready(Ok(()))));
        }
        // Trailers, then the flush that ends a poll of the connection.
        assert!(matches!(write(&mut io, &mut cx, b"trailers"), Poll::Ready(Ok(8))));
        assert!(matches!(flush(&mut io, &mut cx), Poll::Ready(Ok(()))));
        assert!(wakes.0.load(Ordering::Relaxed) > 0, "a deferred flush wakes its task");
        // The poll the wake-up causes: no new write, so everything goes out.
        assert!(matches!(flush(&mut io, &mut cx), Poll::Ready(Ok(()))));
        let mut expected = frames.concat();
        expected.extend_from_slice(b"trailers");
        assert_eq!(received(&io), expected);
        let writes = io.get_ref().writes.len();
        assert!(writes <= expected.len().div_ceil(STAGED_MAX) + 1, "{writes} writes for {} bytes", expected.len());
        assert!(io.get_ref().writes.iter().all(|w| w.len() <= STAGED_MAX));
    }

    #[test]
    fn a_flush_after_no_new_write_writes_everything_staged() {
        let (_, waker) = context();
        let mut cx = Context::from_waker(&waker);
        let mut io = CoalescedWrites::new(Recorder::default());
        let one = frame(7);
        assert!(matches!(write(&mut io, &mut cx, &one), Poll::Ready(Ok(_))));
        assert!(matches!(flush(&mut io, &mut cx), Poll::Ready(Ok(()))));
        assert!(io.get_ref().writes.is_empty(), "deferred while the writer may stage more");
        assert!(matches!(flush(&mut io, &mut cx), Poll::Ready(Ok(()))));
        assert_eq!(received(&io), one);
        assert_eq!(io.get_ref().flushes, 1);
    }

    #[test]
    fn a_socket_that_takes_part_or_nothing_gets_every_byte_once() {
        let (_, waker) = context();
        let mut cx = Context::from_waker(&waker);
        let mut io = CoalescedWrites::new(Recorder { accept: Some(5_000), blocked: true, ..Default::default() });
        let frames: Vec<Vec<u8>> = (0..40).map(frame).collect();
        let mut sent = 0;
        for f in &frames {
            // A full buffer waits for the socket: pending, nothing taken, the same frame again.
            loop {
                match write(&mut io, &mut cx, f) {
                    Poll::Ready(Ok(n)) => {
                        assert_eq!(n, f.len());
                        break;
                    }
                    Poll::Pending => io.inner.blocked = false,
                    Poll::Ready(Err(e)) => panic!("{e}"),
                }
            }
            sent += 1;
            io.inner.blocked = sent % 3 == 0;
            let _ = flush(&mut io, &mut cx);
        }
        io.inner.blocked = false;
        assert!(matches!(Pin::new(&mut io).poll_shutdown(&mut cx), Poll::Ready(Ok(()))));
        assert!(io.get_ref().shut);
        assert_eq!(received(&io), frames.concat());
    }

    #[test]
    fn shutdown_writes_what_is_staged_first() {
        let (_, waker) = context();
        let mut cx = Context::from_waker(&waker);
        let mut io = CoalescedWrites::new(Recorder::default());
        let one = frame(3);
        assert!(matches!(write(&mut io, &mut cx, &one), Poll::Ready(Ok(_))));
        assert!(matches!(Pin::new(&mut io).poll_shutdown(&mut cx), Poll::Ready(Ok(()))));
        assert_eq!(received(&io), one);
        assert!(io.get_ref().shut);
    }

    #[test]
    fn a_socket_that_takes_nothing_is_an_error_not_a_loop() {
        let (_, waker) = context();
        let mut cx = Context::from_waker(&waker);
        let mut io = CoalescedWrites::new(Recorder { accept: Some(0), ..Default::default() });
        assert!(matches!(write(&mut io, &mut cx, &frame(1)), Poll::Ready(Ok(_))));
        let _ = flush(&mut io, &mut cx);
        assert!(matches!(flush(&mut io, &mut cx), Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::WriteZero));
    }

    /// Through a real socket, tonic's server and a client with tonic's default settings
    /// (16 KiB frames): a streamed answer's message reaches the client while the stream is
    /// still open (nothing waits in the staging buffer for the stream's end), and a large
    /// answer arrives whole and in order.
    mod over_grpc {
        use std::pin::Pin;
        use std::sync::Arc;
        use std::time::Duration;

        use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
        use arrow_flight::{
            Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo, HandshakeRequest,
            HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
        };
        use futures::{Stream, StreamExt};
        use strata_core::config::ServerConfig;
        use tokio::sync::Notify;
        use tonic::{Request, Response, Status, Streaming};

        use crate::connections::{ConnectionGuard, GuardedListener};

        type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

        /// DoGet of ticket `n` sends n messages of 200 KiB each (byte `i` of message `m` is
        /// `(m * 7 + i) % 251`); ticket `hold` sends one, then waits for `release` before
        /// the second and the end.
        struct Streamer {
            release: Arc<Notify>,
        }

        fn message(m: usize) -> FlightData {
            let body: Vec<u8> = (0..200 << 10).map(|i| ((m * 7 + i) % 251) as u8).collect();
            FlightData { data_body: body.into(), ..Default::default() }
        }

        #[tonic::async_trait]
        impl FlightService for Streamer {
            type HandshakeStream = Boxed<HandshakeResponse>;
            type ListFlightsStream = Boxed<FlightInfo>;
            type DoGetStream = Boxed<FlightData>;
            type DoPutStream = Boxed<PutResult>;
            type DoActionStream = Boxed<arrow_flight::Result>;
            type ListActionsStream = Boxed<ActionType>;
            type DoExchangeStream = Boxed<FlightData>;

            async fn do_get(&self, request: Request<Ticket>) -> Result<Response<Self::DoGetStream>, Status> {
                let ticket = String::from_utf8_lossy(&request.get_ref().ticket).into_owned();
                if ticket == "hold" {
                    let release = Arc::clone(&self.release);
                    let stream = futures::stream::iter([0, 1]).then(move |m| {
                        let release = Arc::clone(&release);
                        async move {
                            if m == 1 {
                                release.notified().await;
                            }
                            Ok(message(m))
                        }
                    });
                    return Ok(Response::new(Box::pin(stream)));
                }
                let n: usize = ticket.parse().map_err(|_| Status::invalid_argument("ticket"))?;
                Ok(Response::new(Box::pin(futures::stream::iter((0..n).map(|m| Ok(message(m)))))))
            }
            async fn handshake(
                &self,
                _: Request<Streaming<HandshakeRequest>>,
            ) -> Result<Response<Self::HandshakeStream>, Status> {
                Err(Status::unimplemented("handshake"))
            }
            async fn list_flights(&self, _: Request<Criteria>) -> Result<Response<Self::ListFlightsStream>, Status> {
                Err(Status::unimplemented("list_flights"))
            }
            async fn get_flight_info(&self, _: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
                Err(Status::unimplemented("get_flight_info"))
            }
            async fn poll_flight_info(&self, _: Request<FlightDescriptor>) -> Result<Response<PollInfo>, Status> {
                Err(Status::unimplemented("poll_flight_info"))
            }
            async fn get_schema(&self, _: Request<FlightDescriptor>) -> Result<Response<SchemaResult>, Status> {
                Err(Status::unimplemented("get_schema"))
            }
            async fn do_put(&self, _: Request<Streaming<FlightData>>) -> Result<Response<Self::DoPutStream>, Status> {
                Err(Status::unimplemented("do_put"))
            }
            async fn do_exchange(
                &self,
                _: Request<Streaming<FlightData>>,
            ) -> Result<Response<Self::DoExchangeStream>, Status> {
                Err(Status::unimplemented("do_exchange"))
            }
            async fn do_action(&self, _: Request<Action>) -> Result<Response<Self::DoActionStream>, Status> {
                Err(Status::unimplemented("do_action"))
            }
            async fn list_actions(&self, _: Request<Empty>) -> Result<Response<Self::ListActionsStream>, Status> {
                Err(Status::unimplemented("list_actions"))
            }
        }

        async fn serve(release: Arc<Notify>) -> std::net::SocketAddr {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("address");
            let guarded = GuardedListener::new(listener, ConnectionGuard::new(&ServerConfig::default()));
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(FlightServiceServer::new(Streamer { release }))
                    .serve_with_incoming(guarded.into_incoming()),
            );
            addr
        }

        async fn client(
            addr: std::net::SocketAddr,
        ) -> arrow_flight::flight_service_client::FlightServiceClient<tonic::transport::Channel> {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .expect("endpoint")
                .connect()
                .await
                .expect("connect");
            arrow_flight::flight_service_client::FlightServiceClient::new(channel)
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_message_goes_out_while_its_stream_is_still_open() {
            let release = Arc::new(Notify::new());
            let mut client = client(serve(Arc::clone(&release)).await).await;
            let mut stream = client.do_get(Ticket::new("hold")).await.expect("do_get").into_inner();
            let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
                .await
                .expect("the first message arrives before the stream ends")
                .expect("a message")
                .expect("no error");
            assert_eq!(first.data_body, message(0).data_body);
            release.notify_one();
            let second = stream.next().await.expect("a second message").expect("no error");
            assert_eq!(second.data_body, message(1).data_body);
            assert!(stream.next().await.is_none());
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_large_answer_arrives_whole_and_in_order() {
            let mut client = client(serve(Arc::new(Notify::new())).await).await;
            // 200 messages of 200 KiB: 40 MiB in 16 KiB frames.
            let mut stream = client.do_get(Ticket::new("200")).await.expect("do_get").into_inner();
            let mut m = 0;
            while let Some(data) = stream.next().await {
                let data = data.expect("no error");
                assert!(data.data_body == message(m).data_body, "message {m} differs");
                m += 1;
            }
            assert_eq!(m, 200);
        }
    }
}
