//! Subscriber-side delivery: queues each event frame for the shard's matching subscriptions,
//! has the flusher write what a burst queued, and the slow-subscriber policy that decides who
//! is closed for falling behind (past `max_queue_bytes`, or stalled for the timeout).

use crate::messages::{GroupKey, SubscriberConnId};
use crate::metrics::ShardMetrics;
use crate::outbound::Push;
use crate::subscribers::SubscriberTable;
use bytes::Bytes;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// Close code and reason for a subscriber that fell behind its queue bound.
pub const CLOSE_SLOW: (u16, &str) = (4008, "slow subscriber");

/// Why a subscriber is closed as slow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slow {
    /// Its queue would pass `max_queue_bytes`.
    Overflow,
    /// It held bytes and read none for `slow_subscriber_timeout_ms`.
    Stalled,
}

impl Slow {
    /// The reason, as the log states it.
    pub fn reason(self) -> &'static str {
        match self {
            Slow::Overflow => "its outbound queue passed max_queue_bytes",
            Slow::Stalled => "its socket took none of its queued bytes for slow_subscriber_timeout_ms",
        }
    }
}

/// Connections with frames queued quietly, waiting for the flusher.
#[derive(Default)]
pub struct Delivery {
    /// Connections given frames since their last flush, each once (see `OutQueue::flush`).
    unflushed: Vec<SubscriberConnId>,
    /// The flusher task, parked while `unflushed` is empty.
    flusher: Option<Waker>,
}

impl Delivery {
    /// Queues `frame` for every subscription of `key` that matches `item`; returns the
    /// connections whose queue it would overflow (to be closed as slow).
    pub fn deliver(&mut self, table: &SubscriberTable, key: &GroupKey, item: Option<&str>, frame: &Bytes, counters: &ShardMetrics) -> Vec<SubscriberConnId> {
        let mut slow = Vec::new();
        let mut delivered = 0;
        for sub in table.subscribers_of(key) {
            if sub.item.is_some() && sub.item.as_deref() != item {
                continue;
            }
            if let Some(conn) = table.get(sub.conn) {
                match conn.queue.push_quiet(frame.clone()) {
                    (Push::Queued, first) => {
                        delivered += 1;
                        if first {
                            self.unflushed.push(sub.conn);
                        }
                    }
                    (Push::Overflow, _) => slow.push(sub.conn),
                    (Push::Closed, _) => {}
                }
            }
        }
        counters.deliveries_total.fetch_add(delivered, Ordering::Relaxed);
        if delivered > 0 {
            if let Some(flusher) = self.flusher.take() {
                flusher.wake();
            }
        }
        slow
    }

    /// Queues `frame` only for the subscriptions of `key` whose item is exactly `item` (`None`:
    /// the group subscriptions); returns the connections it would overflow.
    pub fn deliver_exact(&mut self, table: &SubscriberTable, key: &GroupKey, item: Option<&str>, frame: &Bytes, counters: &ShardMetrics) -> Vec<SubscriberConnId> {
        let mut slow = Vec::new();
        let mut delivered = 0;
        for sub in table.subscribers_of(key) {
            if sub.item.as_deref() != item {
                continue;
            }
            if let Some(conn) = table.get(sub.conn) {
                match conn.queue.push_quiet(frame.clone()) {
                    (Push::Queued, first) => {
                        delivered += 1;
                        if first {
                            self.unflushed.push(sub.conn);
                        }
                    }
                    (Push::Overflow, _) => slow.push(sub.conn),
                    (Push::Closed, _) => {}
                }
            }
        }
        counters.deliveries_total.fetch_add(delivered, Ordering::Relaxed);
        if delivered > 0 {
            if let Some(flusher) = self.flusher.take() {
                flusher.wake();
            }
        }
        slow
    }

    /// For the flusher: swaps the connections to flush into `batch`, or parks until there are.
    pub fn poll_unflushed(&mut self, cx: &mut Context<'_>, batch: &mut Vec<SubscriberConnId>) -> Poll<()> {
        if self.unflushed.is_empty() {
            self.flusher = Some(cx.waker().clone());
            return Poll::Pending;
        }
        std::mem::swap(&mut self.unflushed, batch);
        Poll::Ready(())
    }
}

/// Writes what was queued for `batch` (drained), each connection's frames in one write.
pub fn flush(table: &SubscriberTable, batch: &mut Vec<SubscriberConnId>, scratch: &mut Vec<u8>) {
    for conn in batch.drain(..) {
        if let Some(c) = table.get(conn) {
            c.queue.flush(c.fd, scratch);
        }
    }
}

/// Connections that have held bytes to write without progress for `limit`.
pub fn stalled(table: &SubscriberTable, now: Instant, limit: Duration) -> Vec<SubscriberConnId> {
    table.iter().filter(|(_, c)| c.queue.stalled_for(now).is_some_and(|d| d >= limit)).map(|(id, _)| id).collect()
}

/// How often a shard looks for stalled subscribers: a quarter of the timeout. A queue's stall
/// clock starts at the first check that sees it pending, so one is closed at most half a
/// timeout late, within bounds that keep the scan cheap.
pub fn stall_check_interval(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
}
