//! The outbound queue of one subscriber connection: shared, pre-built frames waiting to be
//! written, bounded in bytes. The shard pushes; the connection's writer task takes everything
//! queued at once and writes it in one call.

use bytes::Bytes;
use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Poll, Waker};

/// Result of offering a frame to a queue.
#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// The queue would exceed its byte bound: the subscriber is too slow.
    Overflow,
    /// The connection is closing; the frame was not queued.
    Closed,
}

#[derive(Default)]
struct State {
    frames: VecDeque<Bytes>,
    bytes: usize,
    /// Set once: the last frame to write (a close frame), after which the writer stops.
    closing: Option<Bytes>,
    waker: Option<Waker>,
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
    /// Bytes queued on all the connections of this shard, for backpressure (read by peers).
    shard_total: Arc<AtomicUsize>,
}

impl OutQueue {
    /// A queue bounded at `limit_bytes` that also counts into `shard_total`.
    pub fn new(limit_bytes: usize, shard_total: Arc<AtomicUsize>) -> Self {
        OutQueue { state: Rc::default(), limit: limit_bytes, shard_total }
    }

    /// Queues a frame unless that would pass the byte bound.
    pub fn push(&self, frame: Bytes) -> Push {
        let mut state = self.state.borrow_mut();
        if state.closing.is_some() {
            return Push::Closed;
        }
        if state.bytes + frame.len() > self.limit && !state.frames.is_empty() {
            return Push::Overflow;
        }
        state.bytes += frame.len();
        self.shard_total.fetch_add(frame.len(), Ordering::Relaxed);
        state.frames.push_back(frame);
        if let Some(waker) = state.waker.take() {
            waker.wake();
        }
        Push::Queued
    }

    /// Drops what is queued and makes `close` the last frame written.
    pub fn close(&self, close: Bytes) {
        let mut state = self.state.borrow_mut();
        if state.closing.is_some() {
            return;
        }
        state.frames.clear();
        self.shard_total.fetch_sub(state.bytes, Ordering::Relaxed);
        state.bytes = 0;
        state.closing = Some(close);
        if let Some(waker) = state.waker.take() {
            waker.wake();
        }
    }

    pub fn is_closing(&self) -> bool {
        self.state.borrow().closing.is_some()
    }

    /// Bytes waiting to be written.
    pub fn queued_bytes(&self) -> usize {
        self.state.borrow().bytes
    }

    /// Waits until there is something to write and takes all of it.
    pub async fn next_batch(&self) -> Batch {
        poll_fn(|cx| {
            let mut state = self.state.borrow_mut();
            if !state.frames.is_empty() {
                self.shard_total.fetch_sub(state.bytes, Ordering::Relaxed);
                state.bytes = 0;
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
        assert_eq!(total.load(Ordering::Relaxed), 3);
        b.close(Bytes::from_static(b"x"));
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
}
