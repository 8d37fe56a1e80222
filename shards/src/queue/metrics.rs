//! Per-queue counters for `/metrics`: each queue's shard updates its own with relaxed atomics;
//! the metrics thread renders them. A queue's counters are created once, on its first use.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Counters of one queue.
#[derive(Default)]
pub struct QueueCounters {
    /// Messages waiting (in flight included).
    pub depth: AtomicU64,
    pub in_flight: AtomicU64,
    /// Messages in the dead-letter list now.
    pub dead_letters: AtomicU64,
    pub enqueued_total: AtomicU64,
    pub delivered_total: AtomicU64,
    /// Failed attempts that were rescheduled.
    pub retries_total: AtomicU64,
    /// Messages moved to the dead-letter list.
    pub dead_lettered_total: AtomicU64,
}

/// Every queue's counters, by name.
#[derive(Default)]
pub struct QueueMetrics {
    queues: Mutex<BTreeMap<String, Arc<QueueCounters>>>,
}

impl QueueMetrics {
    /// The counters of `queue`, created on first use.
    pub fn counters(&self, queue: &str) -> Arc<QueueCounters> {
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        queues.entry(queue.to_owned()).or_default().clone()
    }

    /// Forgets a queue's counters (the queue was retired empty).
    pub fn remove(&self, queue: &str) {
        self.queues.lock().unwrap_or_else(|e| e.into_inner()).remove(queue);
    }

    /// The Prometheus text of every queue's counters.
    pub fn render(&self, out: &mut String) {
        type Field = fn(&QueueCounters) -> &AtomicU64;
        let queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        let fields: [(&str, &str, &str, Field); 7] = [
            ("ringcast_queue_depth", "Messages waiting in a queue, in flight included", "gauge", |c| &c.depth),
            ("ringcast_queue_in_flight", "Queue messages being delivered", "gauge", |c| &c.in_flight),
            ("ringcast_queue_dead_letters", "Messages in a queue's dead-letter list", "gauge", |c| &c.dead_letters),
            ("ringcast_queue_enqueued_total", "Messages stored in a queue", "counter", |c| &c.enqueued_total),
            ("ringcast_queue_delivered_total", "Queue messages whose function succeeded", "counter", |c| &c.delivered_total),
            ("ringcast_queue_retries_total", "Failed queue deliveries scheduled again", "counter", |c| &c.retries_total),
            ("ringcast_queue_dead_lettered_total", "Queue messages moved to the dead-letter list", "counter", |c| &c.dead_lettered_total),
        ];
        for (name, help, kind, field) in fields {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (queue, counters) in queues.iter() {
                let _ = writeln!(out, "{name}{{queue=\"{}\"}} {}", escape(queue), field(counters).load(Ordering::Relaxed));
            }
        }
    }
}

/// A label value in the Prometheus text format.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_each_queue_with_an_escaped_label() {
        let m = QueueMetrics::default();
        m.counters("a\"b").depth.store(3, Ordering::Relaxed);
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains("ringcast_queue_depth{queue=\"a\\\"b\"} 3"), "{out}");
    }
}
