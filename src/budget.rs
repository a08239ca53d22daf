//! The bytes the server holds for calls in flight, under one limit
//! (`max_inflight_bytes`): request bodies as they arrive, and what each read
//! may hold while its client takes it. A call that finds no room waits for
//! some (`idle_timeout` at most), then gets RESOURCE_EXHAUSTED: however many
//! clients call at once, and however they stall, memory stays bounded.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;

/// Permits count KiB: a semaphore holds at most `usize::MAX >> 3` permits.
const UNIT: u64 = 1 << 10;

#[derive(Debug)]
pub struct Budget {
    permits: Arc<Semaphore>,
    limit: u64,
    wait: Duration,
}

/// Bytes held for a call, given back when dropped (`default()`: none).
#[derive(Debug, Default)]
pub struct Held {
    /// Given back to the semaphore when dropped.
    _permit: Option<OwnedSemaphorePermit>,
}

impl Budget {
    pub fn new(limit: u64, wait: Duration) -> Arc<Budget> {
        let units = (limit / UNIT).max(1) as usize;
        Arc::new(Budget { permits: Arc::new(Semaphore::new(units)), limit, wait })
    }

    fn units(&self, bytes: u64) -> u32 {
        // A call larger than the whole budget may still run, alone.
        bytes.div_ceil(UNIT).min(self.limit / UNIT).max(1).min(u32::MAX as u64) as u32
    }

    /// Holds `bytes` for a call, waiting for room at most the budget's wait.
    pub async fn hold(self: &Arc<Self>, bytes: u64) -> Result<Held, Refused> {
        if bytes == 0 {
            return Ok(Held::default());
        }
        let units = self.units(bytes);
        match tokio::time::timeout(self.wait, Arc::clone(&self.permits).acquire_many_owned(units)).await {
            Ok(Ok(permit)) => Ok(Held { _permit: Some(permit) }),
            Ok(Err(_)) => Err(Refused::ShuttingDown),
            Err(_) => Err(Refused::Exhausted { limit: self.limit, wait: self.wait }),
        }
    }
}

/// Why a hold was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error(
        "the server holds its whole budget of {limit} bytes for calls in flight (max_inflight_bytes), and none was freed for {wait:?}: retry"
    )]
    Exhausted { limit: u64, wait: Duration },
    #[error("shutting down")]
    ShuttingDown,
}

impl Budget {
    /// Holds `bytes` at once if there is room.
    fn try_hold(&self, bytes: u64) -> Option<Held> {
        let permit = Arc::clone(&self.permits).try_acquire_many_owned(self.units(bytes)).ok()?;
        Some(Held { _permit: Some(permit) })
    }
}

/// What a request body holds: every frame until the call ends (a unary
/// call's message is decoded whole), only the frame the server is taking (a
/// stream of HTTP body frames, each an upload message), or the message being
/// received (a gRPC stream of upload messages: tonic gathers each whole
/// before the server takes it; the upload holds its own buffers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    Everything,
    LastFrame,
    Messages,
}

/// Where a gRPC stream is in its length-prefixed messages (a flag byte and
/// a 4-byte length before each).
#[derive(Debug, Default)]
struct Framing {
    header: [u8; 5],
    filled: usize,
    /// Bytes of the current message still to come.
    remaining: u64,
    /// Bytes received of the message not complete yet, header included.
    partial: u64,
}

impl Framing {
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = data.len().min(self.remaining as usize);
                (self.remaining, self.partial, data) =
                    (self.remaining - n as u64, self.partial + n as u64, &data[n..]);
                if self.remaining == 0 {
                    self.partial = 0;
                }
                continue;
            }
            let n = data.len().min(5 - self.filled);
            self.header[self.filled..self.filled + n].copy_from_slice(&data[..n]);
            (self.filled, self.partial, data) = (self.filled + n, self.partial + n as u64, &data[n..]);
            if self.filled == 5 {
                self.filled = 0;
                self.remaining = u64::from(u32::from_be_bytes(self.header[1..].try_into().expect("4 bytes")));
                if self.remaining == 0 {
                    self.partial = 0;
                }
            }
        }
    }
}

/// Keeps `units` of what `holding` holds, and gives back the rest.
fn retain(holding: &mut Vec<Held>, units: usize) {
    let mut all: Option<OwnedSemaphorePermit> = None;
    for permit in holding.drain(..).filter_map(|h| h._permit) {
        match &mut all {
            Some(all) => all.merge(permit),
            None => all = Some(permit),
        }
    }
    let Some(mut all) = all else { return };
    let kept = if all.num_permits() > units { all.split(units) } else { Some(all) };
    holding.extend(kept.map(|permit| Held { _permit: Some(permit) }));
}

/// The bytes one call holds, shared by its request body (which adds to them)
/// and its reply (which gives them back when it ends).
pub type Holding = Arc<Mutex<Vec<Held>>>;

type Waiting = Pin<Box<dyn Future<Output = Result<Held, Status>> + Send>>;

/// A request body whose frames are held in the budget as they arrive: a
/// frame that finds no room waits for it, and so does the client (HTTP/2
/// flow control), up to the budget's wait.
pub struct Charged<B> {
    body: B,
    budget: Arc<Budget>,
    keep: Keep,
    holding: Holding,
    waiting: Option<(http_body::Frame<Bytes>, Waiting)>,
    /// Bytes received and not held yet: holds are whole KiB, so that tiny
    /// frames cannot take a KiB each.
    owed: u64,
    /// For [`Keep::Messages`].
    framing: Framing,
}

impl<B> Charged<B> {
    pub fn new(body: B, budget: Arc<Budget>, keep: Keep, holding: Holding) -> Charged<B> {
        Charged { body, budget, keep, holding, waiting: None, owed: 0, framing: Framing::default() }
    }

    fn keep(&self, held: Held) {
        let mut holding = self.holding.lock().unwrap_or_else(|e| e.into_inner());
        if self.keep == Keep::LastFrame {
            holding.clear();
        }
        holding.push(held);
    }
}

impl<B> http_body::Body for Charged<B>
where
    B: http_body::Body<Data = Bytes, Error = Status> + Unpin,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if let Some((_, waiting)) = &mut this.waiting {
            let held = match waiting.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(held) => held,
            };
            let (frame, _) = this.waiting.take().expect("waiting");
            return Poll::Ready(Some(held.map(|held| {
                this.keep(held);
                frame
            })));
        }
        // The server asks for the next frame: it has taken the last one, or
        // every message complete so far.
        match this.keep {
            Keep::Everything => {}
            Keep::LastFrame => this.holding.lock().unwrap_or_else(|e| e.into_inner()).clear(),
            Keep::Messages => {
                let units = this.framing.partial.div_ceil(UNIT) as usize;
                retain(&mut this.holding.lock().unwrap_or_else(|e| e.into_inner()), units);
            }
        }
        let frame = match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        if let (Keep::Messages, Some(data)) = (this.keep, frame.data_ref()) {
            this.framing.feed(data);
        }
        this.owed += frame.data_ref().map_or(0, |d| d.len() as u64);
        let bytes = this.owed / UNIT * UNIT;
        if bytes == 0 {
            return Poll::Ready(Some(Ok(frame)));
        }
        this.owed -= bytes;
        if let Some(held) = this.budget.try_hold(bytes) {
            this.keep(held);
            return Poll::Ready(Some(Ok(frame)));
        }
        let budget = Arc::clone(&this.budget);
        let held =
            async move { budget.hold(bytes).await.map_err(|e| Status::from(crate::cache::Error::from(e))) };
        this.waiting = Some((frame, Box::pin(held)));
        // Polled at once, so that it registers for a wake-up.
        self.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.waiting.is_none() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn holds_wait_for_room_and_then_give_up() {
        let budget = Budget::new(10 << 10, Duration::from_secs(5));
        let first = budget.hold(8 << 10).await.unwrap();
        // No room: waits, and gets it once the first is given back.
        let waiting = tokio::spawn({
            let budget = Arc::clone(&budget);
            async move { budget.hold(4 << 10).await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(first);
        waiting.await.unwrap().unwrap();
        // Still no room after the wait: RESOURCE_EXHAUSTED, naming the limit.
        let _all = budget.hold(10 << 10).await.unwrap();
        let refused = Status::from(crate::cache::Error::from(budget.hold(1).await.unwrap_err()));
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("max_inflight_bytes"), "{}", refused.message());
        // A call larger than the whole budget runs alone.
        drop(_all);
        budget.hold(1 << 30).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_holds_its_frames_as_it_is_told() {
        use http_body_util::BodyExt;
        let frames = |n: usize| {
            let chunks: Vec<Result<http_body::Frame<Bytes>, Status>> =
                (0..n).map(|_| Ok(http_body::Frame::data(Bytes::from(vec![0u8; 4 << 10])))).collect();
            http_body_util::StreamBody::new(futures::stream::iter(chunks))
        };
        let budget = Budget::new(64 << 10, Duration::from_secs(1));
        let everything = Holding::default();
        let body = Charged::new(frames(8), Arc::clone(&budget), Keep::Everything, Arc::clone(&everything));
        body.collect().await.unwrap();
        assert_eq!(budget.permits.available_permits(), 64 - 32, "a unary body holds all it received");
        drop(everything);
        assert_eq!(budget.permits.available_permits(), 64);
        let last = Holding::default();
        let mut body = Charged::new(frames(32), Arc::clone(&budget), Keep::LastFrame, Arc::clone(&last));
        for _ in 0..20 {
            body.frame().await.unwrap().unwrap();
            assert_eq!(budget.permits.available_permits(), 60, "a stream holds the frame taken last");
        }
        body.collect().await.unwrap();
        assert_eq!(budget.permits.available_permits(), 64, "and nothing once it has ended");
        // A gRPC stream holds the message it is receiving, whatever its
        // frames: here 3 messages of 12 KiB, in 4 KiB frames that straddle
        // their boundaries.
        let mut wire = Vec::new();
        for _ in 0..3 {
            wire.extend_from_slice(&[0, 0, 0, 0x30, 0]);
            wire.extend_from_slice(&[7u8; 12 << 10]);
        }
        let chunks: Vec<Result<http_body::Frame<Bytes>, Status>> =
            wire.chunks(4 << 10).map(|c| Ok(http_body::Frame::data(Bytes::copy_from_slice(c)))).collect();
        let messages = Holding::default();
        let mut body = Charged::new(
            http_body_util::StreamBody::new(futures::stream::iter(chunks)),
            Arc::clone(&budget),
            Keep::Messages,
            Arc::clone(&messages),
        );
        let mut most = 0;
        while let Some(frame) = body.frame().await {
            frame.unwrap();
            most = most.max(64 - budget.permits.available_permits());
        }
        assert!((12..=17).contains(&most), "held at most a message and a frame: {most} KiB");
        // A unary body over the budget waits, then fails.
        let body = Charged::new(frames(32), Arc::clone(&budget), Keep::Everything, Holding::default());
        let error = body.collect().await.unwrap_err();
        assert_eq!(error.code(), tonic::Code::ResourceExhausted);
    }
}
