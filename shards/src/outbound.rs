//! The outbound queue of one subscriber connection: shared, pre-built frames waiting to be
//! written, bounded in bytes. The shard pushes; the connection's writer task takes everything
//! queued at once and writes it in one call.
//!
//! Event fan-out pushes quietly instead (`push_quiet`: no writer is woken) and then, once per
//! burst, `flush`es each connection it touched: while the writer is parked, the flush writes
//! what is queued straight to the socket, in one non-blocking call, so an event reaching 1,000
//! idle connections costs 1,000 sends but no task wake-ups. Only what the socket does not take
//! is left to the writer task.
//!
//! The queue also owns its share of the shard's byte count: frames waiting here and the batch
//! the writer took but has not finished writing both count, against the connection's bound and
//! in `shard_total`, until they are written, dropped by `close`, or the queue is dropped. It
//! keeps the time of the connection's last progress (bytes the socket took) so the shard can
//! close a subscriber that holds bytes and no longer reads (`stalled_for`).

use bytes::Bytes;
use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// Result of offering a frame to a queue.
#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// The queue would exceed its byte bound: the subscriber is too slow.
    Overflow,
    /// The connection is closing; the frame was not queued.
    Closed,
}

struct State {
    frames: VecDeque<Bytes>,
    /// Bytes of `frames`.
    bytes: usize,
    /// Bytes of the batch the writer took and has not reported written yet.
    writing: usize,
    /// When the socket last took bytes. `None` once the queue goes from nothing pending to
    /// something pending: the stall clock then starts at the next `stalled_for`, so event
    /// fan-out reads no clock per subscriber (the shard's stall check reads it instead).
    progress_at: Option<Instant>,
    /// Bytes queued on all the connections of this shard, for the metrics (read by peers).
    shard_total: Arc<AtomicUsize>,
    /// Set once: the last frame to write (a close frame), after which the writer stops.
    closing: Option<Bytes>,
    waker: Option<Waker>,
    /// Quietly pushed frames wait for a `flush`.
    flush_due: bool,
    /// The first frame is the unsent rest of a frame `flush` wrote in part: it must be written
    /// whole, even by a close, or the peer's framing breaks.
    partial_head: bool,
}

impl State {
    fn pending(&self) -> usize {
        self.bytes + self.writing
    }

    /// The socket took `n` bytes.
    fn progressed(&mut self, n: usize) {
        if n > 0 {
            self.progress_at = Some(Instant::now());
        }
    }
}

impl Drop for State {
    /// The last handle is gone (writer and shard both done): what it still counted is freed.
    fn drop(&mut self) {
        self.shard_total.fetch_sub(self.pending(), Ordering::Relaxed);
    }
}

/// What the writer gets when it wakes.
pub enum Batch {
    Frames(Vec<Bytes>),
    /// Write this close frame, then stop.
    Close(Bytes),
}

/// A byte-bounded queue of shared frames for one connection. Cloning shares the queue.
#[derive(Clone)]
pub struct OutQueue {
    state: Rc<RefCell<State>>,
    limit: usize,
}

impl OutQueue {
    /// A queue bounded at `limit_bytes` that also counts into `shard_total`.
    pub fn new(limit_bytes: usize, shard_total: Arc<AtomicUsize>) -> Self {
        let state = State {
            frames: VecDeque::new(),
            bytes: 0,
            writing: 0,
            progress_at: None,
            shard_total,
            closing: None,
            waker: None,
            flush_due: false,
            partial_head: false,
        };
        OutQueue { state: Rc::new(RefCell::new(state)), limit: limit_bytes }
    }

    /// Queues a frame unless that would pass the byte bound, and wakes the writer.
    pub fn push(&self, frame: Bytes) -> Push {
        let pushed = self.enqueue(frame);
        if pushed == Push::Queued {
            if let Some(waker) = self.state.borrow_mut().waker.take() {
                waker.wake();
            }
        }
        pushed
    }

    /// Queues a frame without waking the writer. The caller must `flush` the queue afterwards;
    /// `true` says this push is the first since the last flush, so one flush per burst is asked
    /// for, however many frames the burst queues.
    pub fn push_quiet(&self, frame: Bytes) -> (Push, bool) {
        let pushed = self.enqueue(frame);
        let first = pushed == Push::Queued && !std::mem::replace(&mut self.state.borrow_mut().flush_due, true);
        (pushed, first)
    }

    fn enqueue(&self, frame: Bytes) -> Push {
        let mut state = self.state.borrow_mut();
        if state.closing.is_some() {
            return Push::Closed;
        }
        // The writer's unfinished batch counts too: a reader that stopped reading holds it.
        // One frame is always admitted while nothing is pending (a snapshot may be big).
        let pending = state.pending();
        if pending + frame.len() > self.limit && pending > 0 {
            return Push::Overflow;
        }
        if pending == 0 {
            state.progress_at = None;
        }
        state.bytes += frame.len();
        state.shard_total.fetch_add(frame.len(), Ordering::Relaxed);
        state.frames.push_back(frame);
        Push::Queued
    }

    /// Writes quietly pushed frames. While the writer is parked (so nothing of this connection
    /// is half written), everything queued goes to `socket` in one non-blocking send — several
    /// frames copied into `scratch` first; what the socket does not take stays queued, first,
    /// and the writer is woken to wait for room. A busy writer takes the frames itself when it
    /// comes back for more.
    pub fn flush(&self, socket: RawFd, scratch: &mut Vec<u8>) {
        let mut state = self.state.borrow_mut();
        if !std::mem::take(&mut state.flush_due) || state.frames.is_empty() || state.waker.is_none() {
            return;
        }
        let sent = if state.frames.len() == 1 {
            send_now(socket, &state.frames[0])
        } else {
            scratch.clear();
            for frame in &state.frames {
                scratch.extend_from_slice(frame);
            }
            send_now(socket, scratch)
        };
        state.bytes -= sent;
        state.shard_total.fetch_sub(sent, Ordering::Relaxed);
        state.progressed(sent);
        // Drop what went out: whole frames, then the written head of the next (no copy).
        let mut done = sent;
        while done > 0 {
            let front = state.frames.front_mut().expect("sent bytes were queued");
            if front.len() <= done {
                done -= front.len();
                state.frames.pop_front();
            } else {
                *front = front.slice(done..);
                state.partial_head = true;
                done = 0;
            }
        }
        if !state.frames.is_empty() {
            if let Some(waker) = state.waker.take() {
                waker.wake();
            }
        }
    }

    /// Drops what is queued and makes `close` the last frame written.
    pub fn close(&self, close: Bytes) {
        let mut state = self.state.borrow_mut();
        if state.closing.is_some() {
            return;
        }
        // The writer's batch stays counted until it is written or the queue is dropped, and so
        // does the rest of a partly sent frame, which is kept.
        let head = if std::mem::take(&mut state.partial_head) { state.frames.pop_front() } else { None };
        state.frames.clear();
        let kept = head.as_ref().map_or(0, Bytes::len);
        state.shard_total.fetch_sub(state.bytes - kept, Ordering::Relaxed);
        state.bytes = kept;
        state.frames.extend(head);
        state.closing = Some(close);
        if let Some(waker) = state.waker.take() {
            waker.wake();
        }
    }

    /// The connection is over: drops what is queued, refuses new frames and wakes a parked
    /// writer so it stops. A close frame already queued by `close` is still written first.
    /// (Ending is a close with nothing to write: the writer writes the empty frame and stops.)
    pub fn end(&self) {
        self.close(Bytes::new());
    }

    pub fn is_closing(&self) -> bool {
        self.state.borrow().closing.is_some()
    }

    /// Bytes waiting to be written: queued, and taken by the writer but not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.state.borrow().pending()
    }

    /// The writer wrote `n` bytes of its current batch to the socket.
    pub fn written(&self, n: usize) {
        let mut state = self.state.borrow_mut();
        let n = n.min(state.writing);
        state.writing -= n;
        state.shard_total.fetch_sub(n, Ordering::Relaxed);
        state.progressed(n);
    }

    /// How long the connection has held bytes to write without the socket taking any; `None`
    /// when nothing is pending or it is already closing (its close is under way).
    pub fn stalled_for(&self, now: Instant) -> Option<Duration> {
        let mut state = self.state.borrow_mut();
        if state.pending() == 0 || state.closing.is_some() {
            return None;
        }
        let since = *state.progress_at.get_or_insert_with(Instant::now);
        Some(now.saturating_duration_since(since))
    }

    /// Waits until there is something to write and takes all of it. Coming back for more means
    /// the previous batch is written, whatever the writer reported of it.
    pub async fn next_batch(&self) -> Batch {
        poll_fn(|cx| {
            let mut state = self.state.borrow_mut();
            let finished = std::mem::take(&mut state.writing);
            state.shard_total.fetch_sub(finished, Ordering::Relaxed);
            state.progressed(finished);
            if !state.frames.is_empty() {
                state.partial_head = false;
                state.writing = std::mem::take(&mut state.bytes);
                return Poll::Ready(Batch::Frames(state.frames.drain(..).collect()));
            }
            if let Some(close) = state.closing.clone() {
                return Poll::Ready(Batch::Close(close));
            }
            state.waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

/// One non-blocking send; how many bytes the socket took (0 when full or failed: the writer
/// then waits for room or meets the error itself).
fn send_now(socket: RawFd, data: &[u8]) -> usize {
    // SAFETY: send(2) from a live buffer on a socket the queue's owner keeps open.
    let n = unsafe { libc::send(socket, data.as_ptr().cast(), data.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    usize::try_from(n).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        glommio::LocalExecutorBuilder::default().make().unwrap().run(f)
    }

    #[test]
    fn batches_take_everything_queued() {
        let q = OutQueue::new(1024, Arc::default());
        assert_eq!(q.push(Bytes::from_static(b"a")), Push::Queued);
        assert_eq!(q.push(Bytes::from_static(b"bc")), Push::Queued);
        assert_eq!(q.queued_bytes(), 3);
        match block_on(q.next_batch()) {
            Batch::Frames(frames) => assert_eq!(frames.len(), 2),
            Batch::Close(_) => panic!("not closing"),
        }
        assert_eq!(q.queued_bytes(), 3, "taken, not yet written");
        q.written(3);
        assert_eq!(q.queued_bytes(), 0);
    }

    #[test]
    fn shard_total_counts_every_queue() {
        let total = Arc::new(AtomicUsize::new(0));
        let a = OutQueue::new(100, total.clone());
        let b = OutQueue::new(100, total.clone());
        a.push(Bytes::from_static(b"12"));
        b.push(Bytes::from_static(b"345"));
        assert_eq!(total.load(Ordering::Relaxed), 5);
        block_on(a.next_batch());
        assert_eq!(total.load(Ordering::Relaxed), 5, "a batch counts until it is written");
        a.written(2);
        assert_eq!(total.load(Ordering::Relaxed), 3);
        b.close(Bytes::from_static(b"x"));
        assert_eq!(total.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_writers_unfinished_batch_counts_against_the_bound() {
        let total = Arc::new(AtomicUsize::new(0));
        let q = OutQueue::new(8, total.clone());
        q.push(Bytes::from(vec![0u8; 6]));
        block_on(q.next_batch());
        assert_eq!(q.queued_bytes(), 6);
        assert_eq!(q.push(Bytes::from(vec![0u8; 6])), Push::Overflow, "a stuck writer's batch is still pending");
        q.written(4);
        assert_eq!((q.queued_bytes(), total.load(Ordering::Relaxed)), (2, 2));
        assert_eq!(q.push(Bytes::from(vec![0u8; 6])), Push::Queued);
        // Coming back for more means the previous batch is written.
        block_on(q.next_batch());
        assert_eq!((q.queued_bytes(), total.load(Ordering::Relaxed)), (6, 6));
    }

    #[test]
    fn stall_clock_runs_only_while_bytes_are_pending_and_resets_on_progress() {
        let q = OutQueue::new(100, Arc::default());
        let later = |secs| Instant::now() + Duration::from_secs(secs);
        assert_eq!(q.stalled_for(later(10)), None, "nothing pending is no stall");
        q.push(Bytes::from(vec![0u8; 10]));
        assert!(q.stalled_for(later(10)).unwrap() >= Duration::from_secs(9));
        block_on(q.next_batch());
        assert!(q.stalled_for(later(10)).unwrap() >= Duration::from_secs(9), "taking a batch is not progress");
        q.written(0);
        assert!(q.stalled_for(later(10)).unwrap() >= Duration::from_secs(9), "writing nothing is not progress");
        let before = Instant::now();
        q.written(3);
        let stalled = q.stalled_for(before + Duration::from_secs(10)).unwrap();
        assert!(stalled <= Duration::from_secs(10) && stalled > Duration::from_secs(9), "progress restarts the clock");
        assert!(q.stalled_for(before).unwrap() == Duration::ZERO);
        q.close(Bytes::from_static(b"bye"));
        assert_eq!(q.stalled_for(later(10)), None, "a closing queue is the close path's business");
    }

    #[test]
    fn dropping_the_queue_gives_back_everything_it_counted() {
        let total = Arc::new(AtomicUsize::new(0));
        let q = OutQueue::new(100, total.clone());
        let writer = q.clone();
        q.push(Bytes::from(vec![0u8; 10]));
        block_on(writer.next_batch());
        q.push(Bytes::from(vec![0u8; 7]));
        assert_eq!(total.load(Ordering::Relaxed), 17);
        q.close(Bytes::from_static(b"bye"));
        assert_eq!(total.load(Ordering::Relaxed), 10, "close drops the queued frames; the batch is in the writer");
        drop(q);
        assert_eq!(total.load(Ordering::Relaxed), 10, "the writer still holds the queue");
        drop(writer);
        assert_eq!(total.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn byte_bound_reports_overflow_but_always_admits_one_frame() {
        let q = OutQueue::new(4, Arc::default());
        assert_eq!(q.push(Bytes::from(vec![0u8; 10])), Push::Queued);
        assert_eq!(q.push(Bytes::from_static(b"x")), Push::Overflow);
    }

    #[test]
    fn close_drops_queued_frames_and_refuses_new_ones() {
        let q = OutQueue::new(100, Arc::default());
        q.push(Bytes::from_static(b"a"));
        q.close(Bytes::from_static(b"bye"));
        assert_eq!(q.push(Bytes::from_static(b"b")), Push::Closed);
        match block_on(q.next_batch()) {
            Batch::Close(frame) => assert_eq!(&frame[..], b"bye"),
            Batch::Frames(_) => panic!("queued frames must be dropped on close"),
        }
    }

    #[test]
    fn end_wakes_a_parked_writer_and_keeps_a_pending_close_frame() {
        let q = OutQueue::new(100, Arc::default());
        block_on(async {
            let writer = q.clone();
            let task = glommio::spawn_local(async move { writer.next_batch().await });
            while q.state.borrow().waker.is_none() {
                yield_once().await;
            }
            q.end();
            assert!(matches!(task.await, Batch::Close(frame) if frame.is_empty()), "the parked writer wakes to stop");
        });
        assert_eq!(q.push(Bytes::from_static(b"late")), Push::Closed);
        let closed = OutQueue::new(100, Arc::default());
        closed.close(Bytes::from_static(b"bye"));
        closed.end();
        assert!(matches!(block_on(closed.next_batch()), Batch::Close(frame) if &frame[..] == b"bye"));
    }

    /// Lets other tasks run once.
    async fn yield_once() {
        let mut yielded = false;
        poll_fn(|cx| {
            if std::mem::replace(&mut yielded, true) {
                return Poll::Ready(());
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        })
        .await
    }

    #[test]
    fn flush_writes_straight_to_the_socket_only_while_the_writer_is_parked() {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let (ours, mut peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let total = Arc::new(AtomicUsize::new(0));
        let q = OutQueue::new(1 << 30, total.clone());
        let mut scratch = Vec::new();

        // No writer parked yet: a flush leaves the frame to the writer.
        assert_eq!(q.push_quiet(Bytes::from_static(b"early")).0, Push::Queued);
        q.flush(ours.as_raw_fd(), &mut scratch);
        assert_eq!(q.queued_bytes(), 5);

        block_on(async {
            let writer = q.clone();
            let task = glommio::spawn_local(async move {
                let mut batches = Vec::new();
                while batches.len() < 2 {
                    match writer.next_batch().await {
                        Batch::Frames(frames) => batches.push(frames.iter().map(|f| f.len()).sum::<usize>()),
                        Batch::Close(_) => break,
                    }
                }
                batches
            });
            while q.queued_bytes() > 0 || q.state.borrow().waker.is_none() {
                yield_once().await;
            }

            // Parked writer: quiet pushes stay quiet, and the flush sends both in one write.
            q.push_quiet(Bytes::from_static(b"ab"));
            q.push_quiet(Bytes::from_static(b"cd"));
            assert!(q.state.borrow().waker.is_some(), "quiet pushes do not wake the writer");
            q.flush(ours.as_raw_fd(), &mut scratch);
            assert_eq!((q.queued_bytes(), total.load(Ordering::Relaxed)), (0, 0));
            let mut got = [0u8; 4];
            peer.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"abcd");

            // A socket that takes only part: the rest stays queued and the writer gets it.
            let big = Bytes::from(vec![7u8; 4 << 20]);
            q.push_quiet(big.clone());
            q.flush(ours.as_raw_fd(), &mut scratch);
            let left = q.queued_bytes();
            assert!(left > 0 && left < big.len(), "part written, the rest queued ({left})");
            assert!(q.state.borrow().waker.is_none(), "the writer was woken for the rest");
            let batches = task.await;
            assert_eq!(batches, vec![5, left]);
        });
    }

    #[test]
    fn close_keeps_the_rest_of_a_partly_flushed_frame() {
        use std::os::fd::AsRawFd;
        let (ours, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let total = Arc::new(AtomicUsize::new(0));
        let q = OutQueue::new(1 << 30, total.clone());
        block_on(async {
            let writer = q.clone();
            let task = glommio::spawn_local(async move {
                let mut got = Vec::new();
                loop {
                    match writer.next_batch().await {
                        Batch::Frames(frames) => got.push(frames.iter().map(|f| f.len()).sum::<usize>()),
                        Batch::Close(frame) => {
                            got.push(frame.len());
                            return got;
                        }
                    }
                }
            });
            while q.state.borrow().waker.is_none() {
                yield_once().await;
            }
            let big = Bytes::from(vec![7u8; 4 << 20]);
            q.push_quiet(big.clone());
            q.flush(ours.as_raw_fd(), &mut Vec::new());
            let left = q.queued_bytes();
            assert!(left > 0 && left < big.len(), "part written ({left} left)");
            q.push_quiet(Bytes::from_static(b"dropped"));
            q.close(Bytes::from_static(b"bye"));
            assert_eq!(q.queued_bytes(), left, "the rest of the partly sent frame stays");
            assert_eq!(task.await, vec![left, 3], "the rest, then the close frame");
        });
        drop(q);
        assert_eq!(total.load(Ordering::Relaxed), 0);
    }
}
