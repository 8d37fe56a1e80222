//! The buffer between a channel's writer socket and its reader socket, bounded in frames and in
//! bytes, and the signals by which each end learns that the other (or the engine) ended it.
//!
//! Both ends' tasks run on the channels executor, so this is plain `Cell`/`RefCell` state with
//! one waker slot per end. Policy when full: the writer's task stops reading its socket until
//! the reader's task has taken frames out (TCP flow control then slows the writing peer).
//! Nothing is dropped while both ends live.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Poll, Waker};
use tungstenite::Message;

use super::ChannelMetrics;

/// How an end finished, or why the engine ends a channel; becomes the close frame the other
/// side gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason {
    pub code: u16,
    pub reason: String,
}

impl CloseReason {
    pub fn new(code: u16, reason: impl Into<String>) -> CloseReason {
        CloseReason { code, reason: reason.into() }
    }
}

/// What the reader's side gets next.
pub enum Popped {
    Frame(Message),
    /// The writer finished and everything it sent was taken: close the reader with this.
    End(CloseReason),
}

/// What the writer's side waits for.
pub enum WriterEvent {
    /// There is room for one more frame.
    Room,
    /// Stop reading the writer: the reader went away or the engine ends the channel.
    Stop(CloseReason),
}

pub struct Pipe {
    frames: RefCell<VecDeque<Message>>,
    bytes: Cell<usize>,
    max_frames: usize,
    max_bytes: usize,
    /// Set when the writer's socket finished: no more frames come.
    writer_done: RefCell<Option<CloseReason>>,
    /// Set when the reader's socket finished: the writer is told to stop.
    reader_done: RefCell<Option<CloseReason>>,
    /// Set when the engine ends the channel (peer never connected, shutdown): both stop now.
    aborted: RefCell<Option<CloseReason>>,
    reader_waker: Cell<Option<Waker>>,
    writer_waker: Cell<Option<Waker>>,
    metrics: Arc<ChannelMetrics>,
}

fn frame_len(frame: &Message) -> usize {
    match frame {
        Message::Text(t) => t.len(),
        Message::Binary(b) => b.len(),
        _ => 0,
    }
}

fn wake(slot: &Cell<Option<Waker>>) {
    if let Some(waker) = slot.take() {
        waker.wake();
    }
}

impl Pipe {
    pub fn new(max_frames: usize, max_bytes: usize, metrics: Arc<ChannelMetrics>) -> Pipe {
        Pipe {
            frames: RefCell::new(VecDeque::new()),
            bytes: Cell::new(0),
            max_frames: max_frames.max(1),
            max_bytes: max_bytes.max(1),
            writer_done: RefCell::new(None),
            reader_done: RefCell::new(None),
            aborted: RefCell::new(None),
            reader_waker: Cell::new(None),
            writer_waker: Cell::new(None),
            metrics,
        }
    }

    fn has_room(&self) -> bool {
        self.frames.borrow().len() < self.max_frames && self.bytes.get() < self.max_bytes
    }

    fn stop_reason(&self) -> Option<CloseReason> {
        self.aborted.borrow().clone().or_else(|| self.reader_done.borrow().clone())
    }

    /// Waits for room for a frame (`want_room`) or for a reason to stop reading the writer.
    pub async fn writer_event(&self, want_room: bool) -> WriterEvent {
        std::future::poll_fn(|cx| {
            if let Some(reason) = self.stop_reason() {
                return Poll::Ready(WriterEvent::Stop(reason));
            }
            if want_room && self.has_room() {
                return Poll::Ready(WriterEvent::Room);
            }
            self.writer_waker.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await
    }

    /// Adds a frame the writer sent. Callers wait for [`WriterEvent::Room`] first, so the
    /// buffer passes its bounds by one frame at most (one frame of any size fits an empty one).
    pub fn push(&self, frame: Message) {
        let len = frame_len(&frame);
        self.bytes.set(self.bytes.get() + len);
        self.metrics.buffered_bytes.fetch_add(len as u64, Relaxed);
        self.frames.borrow_mut().push_back(frame);
        wake(&self.reader_waker);
    }

    /// The next frame for the reader, or the end once the writer finished and all was taken.
    /// An engine abort ends it at once, frames still buffered or not.
    pub async fn pop(&self) -> Popped {
        std::future::poll_fn(|cx| Poll::Ready(match self.try_pop() {
            Some(popped) => popped,
            None => {
                self.reader_waker.set(Some(cx.waker().clone()));
                return Poll::Pending;
            }
        }))
        .await
    }

    /// [`Pipe::pop`] without waiting: `None` when nothing is there yet.
    pub fn try_pop(&self) -> Option<Popped> {
        if let Some(reason) = self.aborted.borrow().clone() {
            return Some(Popped::End(reason));
        }
        let frame = self.frames.borrow_mut().pop_front();
        match frame {
            Some(frame) => {
                let len = frame_len(&frame);
                self.bytes.set(self.bytes.get().saturating_sub(len));
                self.metrics.buffered_bytes.fetch_sub(len as u64, Relaxed);
                wake(&self.writer_waker);
                Some(Popped::Frame(frame))
            }
            None => self.writer_done.borrow().clone().map(Popped::End),
        }
    }

    /// Resolves when the engine aborts the channel.
    pub async fn aborted(&self) -> CloseReason {
        std::future::poll_fn(|cx| match self.aborted.borrow().clone() {
            Some(reason) => Poll::Ready(reason),
            None => {
                // The reader's task is the one that races sends against an abort.
                self.reader_waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }

    /// The writer's socket finished; the reader gets `reason` after the buffered frames.
    pub fn finish_writer(&self, reason: CloseReason) {
        self.writer_done.borrow_mut().get_or_insert(reason);
        wake(&self.reader_waker);
    }

    /// The reader's socket finished; the writer is stopped with `reason`. Buffered frames can go
    /// nowhere now and are released.
    pub fn finish_reader(&self, reason: CloseReason) {
        self.reader_done.borrow_mut().get_or_insert(reason);
        self.release_frames();
        wake(&self.writer_waker);
    }

    /// The engine ends the channel: both ends are closed with `reason`.
    pub fn abort(&self, reason: CloseReason) {
        self.aborted.borrow_mut().get_or_insert(reason);
        self.release_frames();
        wake(&self.reader_waker);
        wake(&self.writer_waker);
    }

    /// Frees the buffered frames (the channel is over); idempotent.
    pub fn release_frames(&self) {
        self.frames.borrow_mut().clear();
        self.metrics.buffered_bytes.fetch_sub(self.bytes.replace(0) as u64, Relaxed);
    }

    #[cfg(test)]
    pub fn buffered_bytes(&self) -> usize {
        self.bytes.get()
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        self.release_frames();
    }
}

/// Adds `n` to a counter (relayed bytes and frames).
pub fn count(counter: &AtomicU64, n: usize) {
    counter.fetch_add(n as u64, Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    fn pipe(frames: usize, bytes: usize) -> Pipe {
        Pipe::new(frames, bytes, Arc::new(ChannelMetrics::default()))
    }

    #[test]
    fn bounded_in_frames_and_bytes_with_one_frame_always_fitting() {
        let p = pipe(2, 10);
        assert!(matches!(p.writer_event(true).now_or_never(), Some(WriterEvent::Room)));
        p.push(Message::binary(vec![0u8; 100])); // over the byte bound, fits an empty pipe
        assert!(p.writer_event(true).now_or_never().is_none(), "no room past the byte bound");
        assert!(matches!(p.try_pop(), Some(Popped::Frame(_))));
        p.push(Message::text("a"));
        p.push(Message::text("b"));
        assert!(p.writer_event(true).now_or_never().is_none(), "no room past the frame bound");
        assert_eq!(p.buffered_bytes(), 2);
        assert_eq!(p.metrics.buffered_bytes.load(Relaxed), 2);
    }

    #[test]
    fn frames_come_out_in_order_then_the_writers_close() {
        let p = pipe(8, 1 << 20);
        p.push(Message::text("one"));
        p.push(Message::binary(vec![2u8]));
        p.finish_writer(CloseReason::new(1000, "stream_complete"));
        assert!(matches!(p.try_pop(), Some(Popped::Frame(Message::Text(t))) if t.as_str() == "one"));
        assert!(matches!(p.try_pop(), Some(Popped::Frame(Message::Binary(b))) if b.as_ref() == [2u8]));
        assert!(matches!(p.try_pop(), Some(Popped::End(r)) if r.code == 1000 && r.reason == "stream_complete"));
    }

    #[test]
    fn a_reader_that_left_stops_the_writer_and_frees_the_buffer() {
        let p = pipe(8, 1 << 20);
        p.push(Message::binary(vec![0u8; 64]));
        p.finish_reader(CloseReason::new(4002, "channel reader went away"));
        assert!(matches!(p.writer_event(true).now_or_never(), Some(WriterEvent::Stop(r)) if r.code == 4002));
        assert_eq!(p.buffered_bytes(), 0);
        assert_eq!(p.metrics.buffered_bytes.load(Relaxed), 0);
    }

    #[test]
    fn an_abort_ends_both_sides_at_once() {
        let p = pipe(8, 1 << 20);
        p.push(Message::text("x"));
        p.abort(CloseReason::new(4001, "channel peer never connected"));
        assert!(matches!(p.try_pop(), Some(Popped::End(r)) if r.code == 4001));
        assert!(matches!(p.writer_event(false).now_or_never(), Some(WriterEvent::Stop(r)) if r.code == 4001));
        drop(p); // the buffered frame's bytes go back to the gauge
    }
}
