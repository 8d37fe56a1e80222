//! A worker connection's outbound queue: the frames its writer task sends, bounded in bytes,
//! and the one signal that ends the connection. The engine only pushes; the connection task
//! (`connection.rs`) owns the socket and drains it.

use futures_channel::mpsc::UnboundedSender;
use std::cell::{Cell, RefCell};
use std::task::{Poll, Waker};

/// What a connection's writer task sends.
#[derive(Debug)]
pub enum OutFrame {
    Text(String),
    /// A WebSocket ping (liveness check of a silent worker).
    Ping,
    /// Send a Close frame with this code and reason, then stop writing.
    Close(u16, String),
}

/// Close code for a socket the engine closes because it is shutting down.
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code for a worker refused by a name conflict or retired by `reattach`.
pub const CLOSE_POLICY: u16 = 1008;
/// Close code for a worker whose outbox passed `max_outbox_bytes` (it is not reading); the
/// same code the stream port uses for a slow subscriber.
pub const CLOSE_OUTBOX_FULL: u16 = 4008;

/// A worker connection's outbound queue, bounded in bytes, and the signal that ends the
/// connection. The connection task owns the socket; everything that must end it (a full
/// outbox, a ping timeout, a policy close, the peer going away) goes through `end`, which
/// wakes both the reader and the writer.
pub struct Outbox {
    tx: UnboundedSender<OutFrame>,
    /// Bytes of text frames queued and not yet handed to the socket writer.
    queued: Cell<usize>,
    limit: usize,
    /// Why the connection ends (`Some` once `end` ran): the close frame to try to send, if any.
    ended: RefCell<Option<Option<(u16, String)>>>,
    waiters: RefCell<Vec<Waker>>,
}

impl Outbox {
    pub fn new(tx: UnboundedSender<OutFrame>, limit: usize) -> Outbox {
        Outbox { tx, queued: Cell::new(0), limit, ended: RefCell::new(None), waiters: RefCell::new(Vec::new()) }
    }

    /// Queues a text frame. A backlog that would pass the limit ends the connection instead
    /// (4008); a frame is always accepted when nothing is queued, so one message of any
    /// allowed size can still go out to a worker that reads.
    pub fn push(&self, text: String) {
        if self.is_ended() {
            return;
        }
        let queued = self.queued.get();
        if queued > 0 && queued.saturating_add(text.len()) > self.limit {
            self.end(Some((CLOSE_OUTBOX_FULL, "outbox full: the worker is not reading".into())));
            return;
        }
        self.queued.set(queued.saturating_add(text.len()));
        // A closed channel means the writer is gone; the connection task cleans up.
        let _ = self.tx.unbounded_send(OutFrame::Text(text));
    }

    /// Queues a frame that is not counted (pings, ordered close frames).
    pub fn push_control(&self, frame: OutFrame) {
        if !self.is_ended() {
            let _ = self.tx.unbounded_send(frame);
        }
    }

    /// The writer took `bytes` of text off the queue.
    pub fn taken(&self, bytes: usize) {
        self.queued.set(self.queued.get().saturating_sub(bytes));
    }

    pub fn queued_bytes(&self) -> usize {
        self.queued.get()
    }

    /// Ends the connection now: the writer drops what is queued and tries `close` (bounded in
    /// time), the reader stops. The first call decides the close frame.
    pub fn end(&self, close: Option<(u16, String)>) {
        {
            let mut ended = self.ended.borrow_mut();
            if ended.is_some() {
                return;
            }
            *ended = Some(close);
        }
        self.tx.close_channel();
        for waker in self.waiters.borrow_mut().drain(..) {
            waker.wake();
        }
    }

    pub fn is_ended(&self) -> bool {
        self.ended.borrow().is_some()
    }

    /// The close frame chosen by `end`, if it ran and chose one.
    pub fn close_frame(&self) -> Option<(u16, String)> {
        self.ended.borrow().clone().flatten()
    }

    /// Resolves once `end` has run.
    pub fn ended(&self) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.is_ended() {
                return Poll::Ready(());
            }
            let mut waiters = self.waiters.borrow_mut();
            if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                waiters.push(cx.waker().clone());
            }
            Poll::Pending
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_bounds_the_backlog_and_ends_once() {
        let (tx, mut rx) = futures_channel::mpsc::unbounded();
        let outbox = Outbox::new(tx, 10);
        outbox.push("x".repeat(25)); // an empty outbox takes one frame of any size
        assert_eq!(outbox.queued_bytes(), 25);
        outbox.taken(25);
        outbox.push("12345".into());
        outbox.push("12345".into());
        assert!(!outbox.is_ended(), "exactly at the limit is allowed");
        outbox.push("1".into());
        assert_eq!(outbox.close_frame().map(|(code, _)| code), Some(CLOSE_OUTBOX_FULL));
        outbox.end(Some((CLOSE_POLICY, "later".into())));
        assert_eq!(outbox.close_frame().map(|(code, _)| code), Some(CLOSE_OUTBOX_FULL), "the first end decides");
        outbox.push("dropped".into());
        let mut texts = 0;
        while let Ok(OutFrame::Text(_)) = rx.try_recv() {
            texts += 1;
        }
        assert_eq!(texts, 3, "nothing is queued past the end");
    }
}
