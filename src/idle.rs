//! Closes connections that carry no call: a client cannot hold a socket (and
//! one of the server's file descriptors) by connecting and saying nothing,
//! by sending half a request, or by keeping an HTTP/2 connection open with
//! no stream on it.
//!
//! A connection's reads are watched: while no call is in flight on it, a
//! read that would wait past the deadline fails instead, and the connection
//! closes. The deadline is short until the first call arrives and longer
//! between calls, so that clients between builds keep their connections for a
//! while. While calls are in flight, a reply that waits on its client (which
//! grants it no HTTP/2 window, say) for that longer time closes the
//! connection too: a client that stops reading cannot pin what the reply
//! holds.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// How long a connection may go without a call in flight.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// Before its first call.
    pub first_call: Duration,
    /// After a call.
    pub between_calls: Duration,
}

/// The calls in flight on one connection.
#[derive(Debug)]
pub struct Calls {
    active: AtomicUsize,
    /// A call has started on this connection.
    started: AtomicBool,
    /// When the last call ended (or the connection was accepted).
    idle_since: Mutex<Instant>,
    /// The connection's reader, woken when its last call ends, and when a
    /// reply starts to wait on the client.
    reader: AtomicWaker,
    /// Replies waiting on the client to take what they handed over, by id,
    /// since when.
    waiting: Mutex<HashMap<u64, Instant>>,
    next_reply: AtomicU64,
}

impl Calls {
    pub fn new() -> Arc<Calls> {
        Arc::new(Calls {
            active: AtomicUsize::new(0),
            started: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
            reader: AtomicWaker::new(),
            waiting: Mutex::new(HashMap::new()),
            next_reply: AtomicU64::new(0),
        })
    }

    /// Counts a call as in flight until the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.started.store(true, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(self))
    }

    /// When the connection closes if nothing happens; `None` while a call is
    /// in flight.
    fn deadline(&self, timeouts: Timeouts) -> Option<Instant> {
        if self.active.load(Ordering::Acquire) > 0 {
            let waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            return waiting.values().min().map(|since| *since + timeouts.between_calls);
        }
        let limit = match self.started.load(Ordering::Relaxed) {
            true => timeouts.between_calls,
            false => timeouts.first_call,
        };
        Some(*self.idle_since.lock().unwrap_or_else(|e| e.into_inner()) + limit)
    }
}

/// A reply body whose waits on the client the connection watches (see
/// the module's comment). `held` is kept until the reply ends.
pub struct Sending<T> {
    body: tonic::body::Body,
    calls: Option<Arc<Calls>>,
    id: u64,
    _held: T,
}

impl<T> Sending<T> {
    pub fn new(body: tonic::body::Body, calls: Option<Arc<Calls>>, held: T) -> Sending<T> {
        let id = calls.as_ref().map_or(0, |c| c.next_reply.fetch_add(1, Ordering::Relaxed));
        Sending { body, calls, id, _held: held }
    }

    fn stop_waiting(&self) {
        if let Some(calls) = &self.calls {
            calls.waiting.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
        }
    }
}

impl<T: Send + Unpin + 'static> http_body::Body for Sending<T> {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
        // Asked for more: the client took what was handed over.
        self.stop_waiting();
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let (Poll::Ready(Some(Ok(_))), Some(calls)) = (&polled, &self.calls) {
            // Handed over: until asked for more, this waits on the client.
            let mut waiting = calls.waiting.lock().unwrap_or_else(|e| e.into_inner());
            waiting.insert(self.id, Instant::now());
            // The reader's clock need only start for the first waiting reply:
            // a later one's deadline is later.
            if waiting.len() == 1 {
                calls.reader.wake();
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl<T> Drop for Sending<T> {
    fn drop(&mut self) {
        self.stop_waiting();
    }
}

/// A call in flight (see [`Calls::begin`]).
pub struct InFlight(Arc<Calls>);

impl Drop for InFlight {
    fn drop(&mut self) {
        // The clock is set before the count can reach zero: a reader that
        // sees no call in flight never sees the time of an older idle spell.
        *self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.reader.wake();
        }
    }
}

/// A connection's stream, whose reads fail once it has carried no call for
/// too long.
pub struct Watched<S> {
    inner: S,
    calls: Arc<Calls>,
    timeouts: Timeouts,
    timer: Pin<Box<Sleep>>,
    /// Running while a write waits on the client (its socket buffer full):
    /// HTTP/1.1 stops reading while it writes a reply, so only the write
    /// side sees a client that takes nothing.
    write_timer: Option<Pin<Box<Sleep>>>,
}

impl<S> Watched<S> {
    pub fn new(inner: S, calls: Arc<Calls>, timeouts: Timeouts) -> Watched<S> {
        let timer = Box::pin(tokio::time::sleep(timeouts.first_call));
        Watched { inner, calls, timeouts, timer, write_timer: None }
    }

    /// A write's outcome, failed once it has waited on the client for
    /// `between_calls`.
    fn within_time<T>(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.write_timer = None;
            return polled;
        }
        let limit = self.timeouts.between_calls;
        let timer = self.write_timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took nothing for too long: closed",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if polled.is_ready() {
            return polled;
        }
        // Woken when the last call ends, or a reply starts to wait, to start
        // the clock.
        this.calls.reader.register(cx.waker());
        let Some(deadline) = this.calls.deadline(this.timeouts) else {
            return Poll::Pending;
        };
        if this.timer.deadline() != deadline {
            this.timer.as_mut().reset(deadline);
        }
        match this.timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the connection carried no call, or its client took nothing, for too long: closed",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.within_time(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.within_time(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.within_time(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A request body that fails once its client sends less than
/// [`MIN_BYTES_PER_WINDOW`] in `limit` of the server waiting for it: a
/// stalled upload ends (and what it sent is kept, to be resumed or to
/// expire) instead of holding its call forever, and so does one that sends a
/// byte now and then to look alive. Only time spent waiting on the client
/// counts, not time the server spends storing what arrived.
pub struct Timed<B> {
    body: B,
    limit: Duration,
    /// Time waited on the client in this window, besides the current wait.
    waited: Duration,
    /// Bytes received in this window.
    received: u64,
    /// The current wait: since when, and its timer (to the window's end).
    waiting: Option<(Instant, Pin<Box<Sleep>>)>,
}

/// What a client must send in each window of `idle_timeout` the server
/// waits on it: 64 KiB (about 1 KiB/s at the default 60s).
pub const MIN_BYTES_PER_WINDOW: u64 = 64 << 10;

impl<B> Timed<B> {
    pub fn new(body: B, limit: Duration) -> Timed<B> {
        Timed { body, limit, waited: Duration::ZERO, received: 0, waiting: None }
    }

    /// Ends the current wait; at the window's end, the client must have
    /// sent enough, and a new window starts.
    fn check_window(&mut self, now: Instant) -> Result<(), tonic::Status> {
        if let Some((since, _)) = self.waiting.take() {
            self.waited += now - since;
        }
        if self.waited < self.limit {
            return Ok(());
        }
        if self.received < MIN_BYTES_PER_WINDOW {
            let (limit, received) = (self.limit, self.received);
            return Err(tonic::Status::deadline_exceeded(format!(
                "the client sent {received} bytes in {limit:?} (idle_timeout) of the server waiting for it, under {MIN_BYTES_PER_WINDOW}: the call is ended; an upload keeps what arrived, to resume"
            )));
        }
        (self.waited, self.received) = (Duration::ZERO, 0);
        Ok(())
    }
}

impl<B> http_body::Body for Timed<B>
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
        let this = &mut *self;
        loop {
            match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Ready(frame) => {
                    if let Some(Ok(data)) = frame.as_ref().map(|f| f.as_ref().map(|f| f.data_ref())) {
                        this.received += data.map_or(0, |d| d.len() as u64);
                    }
                    if frame.is_some()
                        && let Err(status) = this.check_window(Instant::now())
                    {
                        return Poll::Ready(Some(Err(status)));
                    }
                    let broke =
                        |e: B::Error| tonic::Status::cancelled(format!("the request body broke off: {e}"));
                    return Poll::Ready(frame.map(|f| f.map_err(broke)));
                }
                Poll::Pending => {
                    let (waited, limit) = (this.waited, this.limit);
                    let (_, timer) = this.waiting.get_or_insert_with(|| {
                        (Instant::now(), Box::pin(tokio::time::sleep(limit.saturating_sub(waited))))
                    });
                    if timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    // The window is over while waiting: refused, or a new one.
                    if let Err(status) = this.check_window(Instant::now()) {
                        return Poll::Ready(Some(Err(status)));
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test(start_paused = true)]
    async fn a_body_that_drips_is_ended_and_a_slow_one_is_not() {
        use http_body_util::BodyExt;
        let limit = Duration::from_secs(60);
        // A frame every `every`, of `size` bytes, for `frames` frames.
        let body = |every: u64, size: usize, frames: usize| {
            let stream = futures::stream::unfold(0, move |n| async move {
                if n == frames {
                    return None;
                }
                tokio::time::sleep(Duration::from_secs(every)).await;
                let frame = http_body::Frame::data(bytes::Bytes::from(vec![0u8; size]));
                Some((Ok::<_, std::convert::Infallible>(frame), n + 1))
            });
            Timed::new(http_body_util::StreamBody::new(Box::pin(stream)), limit)
        };
        // A byte every 59 s: each wait is short, the rate is not enough.
        let started = Instant::now();
        let error = body(59, 1, 10).collect().await.unwrap_err();
        assert_eq!(error.code(), tonic::Code::DeadlineExceeded);
        assert!(started.elapsed() <= Duration::from_secs(120), "{:?}", started.elapsed());
        // Silence ends a body at the limit.
        let started = Instant::now();
        assert!(body(3600, 1, 1).collect().await.is_err());
        assert_eq!(started.elapsed(), limit);
        // 16 KiB every 10 s (1.6 KB/s) goes on for as long as it takes.
        assert!(body(10, 16 << 10, 30).collect().await.is_ok());
    }

    const TIMEOUTS: Timeouts =
        Timeouts { first_call: Duration::from_millis(200), between_calls: Duration::from_millis(400) };

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_closes_and_a_busy_one_does_not() {
        let (client, server) = tokio::io::duplex(64);
        let calls = Calls::new();
        let mut watched = Watched::new(server, Arc::clone(&calls), TIMEOUTS);
        let started = Instant::now();
        let mut buf = [0u8; 8];
        let error = watched.read(&mut buf).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), TIMEOUTS.first_call);

        // A call in flight holds the connection open however long it takes;
        // its end starts the longer clock.
        let (_peer, end) = tokio::io::duplex(64);
        let mut watched = Watched::new(end, Arc::clone(&calls), TIMEOUTS);
        let call = calls.begin();
        let read = tokio::spawn(async move {
            let started = Instant::now();
            let _ = watched.read(&mut [0u8; 8]).await;
            started.elapsed()
        });
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(call);
        let waited = read.await.unwrap();
        assert_eq!(waited, Duration::from_secs(3600) + TIMEOUTS.between_calls);
        drop(client);
    }
}
