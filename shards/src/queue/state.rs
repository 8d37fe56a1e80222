//! One queue's bookkeeping, without I/O: the waiting messages in enqueue order, which are being
//! delivered, when each may be tried again, which functions have no worker, and the
//! dead-letter list. Every change that must reach the store comes back as [`StoreOp`]s, in the
//! order they must be written.

use super::records::Record;
use super::{CallOutcome, QueueSettings};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// Most waiting messages one pump looks at (see [`Queue::next`]): with more than this many
/// blocked at the head of a concurrent queue, the ones behind them wait too.
pub const SCAN_LIMIT: usize = 1024;

/// A write the queue's store must make.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreOp {
    /// Store (or overwrite) a waiting message.
    Put(Record),
    /// Remove a waiting message (delivered, or moved to the dead letters).
    Delete(String),
    /// Store a dead-lettered message.
    PutDead(Record),
    /// Remove a dead-lettered message (redriven or discarded).
    DeleteDead(String),
}

/// A message waiting in the queue.
#[derive(Debug)]
struct Waiting {
    record: Record,
    /// Being delivered now.
    in_flight: bool,
    /// Stored (durable, where the store syncs): only stored messages are delivered.
    stored: bool,
    /// Not to be tried again before this (backoff after a failure).
    not_before: Option<Instant>,
}

/// What to deliver now.
#[derive(Debug, Clone, PartialEq)]
pub struct Dispatch {
    pub seq: u64,
    pub namespace: String,
    pub function_id: String,
    pub data: std::sync::Arc<str>,
    pub traceparent: Option<String>,
    pub baggage: Option<String>,
}

/// The state of one queue on its shard.
#[derive(Debug)]
pub struct Queue {
    pub settings: QueueSettings,
    waiting: BTreeMap<u64, Waiting>,
    /// id -> seq of waiting messages.
    ids: HashMap<String, u64>,
    /// Dead letters in the order they died.
    dead: BTreeMap<u64, Record>,
    dead_ids: HashMap<String, u64>,
    dead_order: u64,
    in_flight: usize,
    /// `(namespace, function)` without a worker at the last try, and when to try again.
    absent: HashMap<(String, String), Instant>,
    /// Payload bytes held (waiting and dead).
    bytes: usize,
    /// Failed attempts rescheduled since start (for metrics).
    pub retries_total: u64,
    /// Messages moved to the dead letters since start.
    pub dead_lettered_total: u64,
    pub delivered_total: u64,
}

impl Queue {
    pub fn new(settings: QueueSettings) -> Queue {
        Queue {
            settings,
            waiting: BTreeMap::new(),
            ids: HashMap::new(),
            dead: BTreeMap::new(),
            dead_ids: HashMap::new(),
            dead_order: 0,
            in_flight: 0,
            absent: HashMap::new(),
            bytes: 0,
            retries_total: 0,
            dead_lettered_total: 0,
            delivered_total: 0,
        }
    }

    /// Waiting messages (in flight included).
    pub fn depth(&self) -> usize {
        self.waiting.len()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub fn dead_len(&self) -> usize {
        self.dead.len()
    }

    /// Holds nothing: no waiting (or in-flight) message, no dead letter.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty() && self.dead.is_empty()
    }

    /// Payload bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether the id is held (waiting or dead).
    pub fn contains(&self, id: &str) -> bool {
        self.ids.contains_key(id) || self.dead_ids.contains_key(id)
    }

    /// Adds a waiting message; `stored`: it may be delivered at once.
    pub fn push(&mut self, record: Record, stored: bool) {
        self.bytes += record.data.len();
        self.ids.insert(record.id.clone(), record.seq);
        self.waiting.insert(record.seq, Waiting { record, in_flight: false, stored, not_before: None });
    }

    /// Adds a dead letter read back from the store.
    pub fn push_dead(&mut self, record: Record) {
        self.bytes += record.data.len();
        self.dead_order += 1;
        self.dead_ids.insert(record.id.clone(), self.dead_order);
        self.dead.insert(self.dead_order, record);
    }

    /// The message `seq` is stored: it may be delivered.
    pub fn mark_stored(&mut self, seq: u64) {
        if let Some(w) = self.waiting.get_mut(&seq) {
            w.stored = true;
        }
    }

    /// Forgets a message whose storing failed (its caller got an error).
    pub fn forget(&mut self, seq: u64) {
        if let Some(w) = self.waiting.remove(&seq) {
            self.ids.remove(&w.record.id);
            self.bytes -= w.record.data.len();
        }
    }

    /// Picks what to deliver now, dead-letters messages whose function has had no worker for
    /// longer than `max_owner_wait`, and says when to look again (`None`: when something
    /// happens). With concurrency 1 the queue is strictly ordered: nothing passes a message
    /// that waits.
    pub fn next(&mut self, now: Instant, now_ms: u64, probe: Duration) -> (Vec<Dispatch>, Vec<StoreOp>, Option<Instant>) {
        let limit = self.settings.concurrency.max(1) as usize;
        let ordered = limit == 1;
        let max_wait_ms = u64::try_from(self.settings.max_owner_wait.as_millis()).unwrap_or(u64::MAX);
        let mut out = Vec::new();
        let mut expired = Vec::new();
        let mut wake: Option<Instant> = None;
        let mut earliest = |t: Instant| wake = Some(wake.map_or(t, |w| w.min(t)));
        // Messages looked at and passed over: bounded, so a deep queue whose head is blocked
        // (backoff, no worker) costs each pump O(SCAN_LIMIT), not O(depth).
        for (passed, (seq, w)) in self.waiting.iter_mut().enumerate() {
            if self.in_flight + out.len() >= limit || passed >= SCAN_LIMIT {
                break;
            }
            if w.in_flight {
                continue;
            }
            if !w.stored {
                if ordered {
                    break;
                }
                continue;
            }
            if let Some(t) = w.not_before.filter(|t| *t > now) {
                earliest(t);
                if ordered {
                    break;
                }
                continue;
            }
            let key = (w.record.namespace.clone(), w.record.function_id.clone());
            if let Some(&retry) = self.absent.get(&key) {
                if now_ms.saturating_sub(w.record.enqueued_at_ms) >= max_wait_ms {
                    expired.push(*seq);
                    continue;
                }
                if retry > now {
                    earliest(retry);
                    if ordered {
                        break;
                    }
                    continue;
                }
                // This message probes for a worker; the others of the function wait for it.
                self.absent.insert(key, now + probe);
            }
            w.in_flight = true;
            w.not_before = None;
            out.push(Dispatch {
                seq: *seq,
                namespace: w.record.namespace.clone(),
                function_id: w.record.function_id.clone(),
                data: w.record.data.clone(),
                traceparent: w.record.traceparent.clone(),
                baggage: w.record.baggage.clone(),
            });
        }
        self.in_flight += out.len();
        if self.waiting.is_empty() {
            self.absent.clear();
        }
        let mut ops = Vec::new();
        for seq in expired {
            let reason = self.waiting.get(&seq).map(|w| {
                format!(
                    "function {} (namespace {}) had no worker for {} ms (max_owner_wait_ms)",
                    w.record.function_id, w.record.namespace, max_wait_ms
                )
            });
            if let Some(reason) = reason {
                self.kill(seq, reason, now_ms, &mut ops);
            }
        }
        (out, ops, wake)
    }

    /// A delivery ended. Returns the writes to make and when to look again.
    pub fn settle(&mut self, seq: u64, outcome: CallOutcome, now: Instant, now_ms: u64, probe: Duration) -> Vec<StoreOp> {
        let Some(w) = self.waiting.get_mut(&seq) else { return Vec::new() };
        if !w.in_flight {
            return Vec::new();
        }
        w.in_flight = false;
        self.in_flight -= 1;
        let key = (w.record.namespace.clone(), w.record.function_id.clone());
        let mut ops = Vec::new();
        match outcome {
            CallOutcome::Done => {
                self.absent.remove(&key);
                if let Some(w) = self.waiting.remove(&seq) {
                    self.ids.remove(&w.record.id);
                    self.bytes -= w.record.data.len();
                    self.delivered_total += 1;
                    ops.push(StoreOp::Delete(w.record.id));
                }
            }
            CallOutcome::Failed(code, message) => {
                self.absent.remove(&key);
                w.record.attempts = w.record.attempts.saturating_add(1);
                let attempts = w.record.attempts;
                if attempts >= self.settings.max_attempts.max(1) {
                    let reason = format!("failed {attempts} attempt(s); last error: {code}: {message}");
                    self.kill(seq, reason, now_ms, &mut ops);
                } else {
                    w.not_before = Some(now + self.settings.backoff_after(attempts));
                    self.retries_total += 1;
                    ops.push(StoreOp::Put(w.record.clone()));
                }
            }
            CallOutcome::NoOwner => {
                self.absent.insert(key, now + probe);
            }
            CallOutcome::Shutdown => {}
        }
        ops
    }

    /// Moves a waiting message to the dead letters.
    fn kill(&mut self, seq: u64, reason: String, now_ms: u64, ops: &mut Vec<StoreOp>) {
        let Some(w) = self.waiting.remove(&seq) else { return };
        if w.in_flight {
            self.in_flight -= 1;
        }
        self.ids.remove(&w.record.id);
        let mut record = w.record;
        tracing::warn!(message = %record.id, function = %record.function_id, "queue message dead-lettered: {reason}");
        record.dead = Some((reason, now_ms));
        self.dead_order += 1;
        self.dead_ids.insert(record.id.clone(), self.dead_order);
        self.dead_lettered_total += 1;
        // The dead letter is written before the waiting record goes: a crash between the two
        // leaves both, and the waiting one wins at the next start (delivered again, never lost).
        ops.push(StoreOp::PutDead(record.clone()));
        ops.push(StoreOp::Delete(record.id.clone()));
        self.dead.insert(self.dead_order, record);
    }

    /// Moves dead letters back to the end of the queue with fresh attempts: the one with `id`,
    /// or all of them. `next_seq` gives each its new place in the enqueue order.
    pub fn redrive(&mut self, id: Option<&str>, mut next_seq: impl FnMut() -> u64) -> (u64, Vec<StoreOp>) {
        let orders: Vec<u64> = match id {
            Some(id) => self.dead_ids.get(id).copied().into_iter().collect(),
            None => self.dead.keys().copied().collect(),
        };
        let mut ops = Vec::new();
        let mut moved = 0;
        for order in orders {
            let Some(mut record) = self.dead.remove(&order) else { continue };
            self.dead_ids.remove(&record.id);
            self.bytes -= record.data.len();
            record.dead = None;
            record.attempts = 0;
            record.seq = next_seq();
            // Waiting first, then the dead letter goes: a crash between leaves both, and the
            // waiting one wins at the next start.
            ops.push(StoreOp::Put(record.clone()));
            ops.push(StoreOp::DeleteDead(record.id.clone()));
            self.push(record, true);
            moved += 1;
        }
        (moved, ops)
    }

    /// Deletes a dead letter.
    pub fn discard(&mut self, id: &str) -> (u64, Vec<StoreOp>) {
        let Some(order) = self.dead_ids.remove(id) else { return (0, Vec::new()) };
        match self.dead.remove(&order) {
            Some(record) => {
                self.bytes -= record.data.len();
                (1, vec![StoreOp::DeleteDead(record.id)])
            }
            None => (0, Vec::new()),
        }
    }

    /// Dead letters, oldest first, as `engine::queue::dlq_messages` shows them.
    pub fn dead_letters(&self, offset: usize, limit: usize) -> Vec<Value> {
        self.dead
            .values()
            .skip(offset)
            .take(limit)
            .map(|r| {
                let data: Value = serde_json::from_str(&r.data).unwrap_or(Value::Null);
                let (reason, at) = r.dead.clone().unwrap_or_default();
                json!({
                    "id": r.id,
                    "function_id": r.function_id,
                    "namespace": r.namespace,
                    "data": data,
                    "attempts": r.attempts,
                    "error": reason,
                    "enqueued_at_ms": r.enqueued_at_ms,
                    "failed_at_ms": at,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const PROBE: Duration = Duration::from_millis(200);

    fn record(seq: u64, function: &str) -> Record {
        Record {
            id: format!("m{seq}"),
            seq,
            namespace: "default".into(),
            function_id: function.into(),
            data: Arc::from(format!("{{\"n\":{seq}}}")),
            traceparent: None,
            baggage: None,
            attempts: 0,
            enqueued_at_ms: 1_000,
            dead: None,
        }
    }

    fn ordered() -> Queue {
        Queue::new(QueueSettings { concurrency: 1, max_attempts: 2, backoff: Duration::from_millis(100), ..Default::default() })
    }

    fn seqs(d: &[Dispatch]) -> Vec<u64> {
        d.iter().map(|d| d.seq).collect()
    }

    #[test]
    fn concurrency_one_delivers_in_order_and_a_retry_holds_the_line() {
        let mut q = ordered();
        let t0 = Instant::now();
        for seq in 1..=3 {
            q.push(record(seq, "f"), true);
        }
        let (d, _, _) = q.next(t0, 1_000, PROBE);
        assert_eq!(seqs(&d), [1]);
        assert!(q.next(t0, 1_000, PROBE).0.is_empty(), "one at a time");
        let ops = q.settle(1, CallOutcome::Failed("invocation_failed".into(), "boom".into()), t0, 1_000, PROBE);
        assert!(matches!(&ops[..], [StoreOp::Put(r)] if r.attempts == 1));
        let (d, _, wake) = q.next(t0, 1_000, PROBE);
        assert!(d.is_empty(), "message 2 must not pass message 1 while it backs off");
        assert_eq!(wake, Some(t0 + Duration::from_millis(100)));
        let later = t0 + Duration::from_millis(100);
        assert_eq!(seqs(&q.next(later, 1_100, PROBE).0), [1]);
        assert_eq!(q.settle(1, CallOutcome::Done, later, 1_100, PROBE), vec![StoreOp::Delete("m1".into())]);
        assert_eq!(seqs(&q.next(later, 1_100, PROBE).0), [2]);
    }

    #[test]
    fn the_last_failed_attempt_dead_letters_and_redrive_brings_it_back_last() {
        let mut q = ordered();
        let t0 = Instant::now();
        q.push(record(1, "f"), true);
        q.push(record(2, "f"), true);
        let fail = || CallOutcome::Failed("E".into(), "no".into());
        q.next(t0, 0, PROBE);
        q.settle(1, fail(), t0, 0, PROBE);
        let t1 = t0 + Duration::from_secs(1);
        q.next(t1, 0, PROBE);
        let ops = q.settle(1, fail(), t1, 5, PROBE);
        assert!(matches!(&ops[..], [StoreOp::PutDead(r), StoreOp::Delete(id)] if id == "m1" && r.dead.as_ref().is_some_and(|(why, at)| why.contains("E: no") && *at == 5)));
        assert_eq!((q.depth(), q.dead_len()), (1, 1));
        assert_eq!(seqs(&q.next(t1, 0, PROBE).0), [2]);
        let mut seq = 10;
        let (moved, ops) = q.redrive(Some("m1"), || {
            seq += 1;
            seq
        });
        assert_eq!(moved, 1);
        assert!(matches!(&ops[..], [StoreOp::Put(r), StoreOp::DeleteDead(_)] if r.seq == 11 && r.attempts == 0 && r.dead.is_none()));
        assert_eq!(q.redrive(Some("m1"), || 0).0, 0, "only once");
        q.settle(2, CallOutcome::Done, t1, 0, PROBE);
        assert_eq!(seqs(&q.next(t1, 0, PROBE).0), [11]);
    }

    #[test]
    fn redrive_finds_any_dead_letter_by_id_not_only_the_first() {
        let mut q = Queue::new(QueueSettings { max_attempts: 1, ..Default::default() });
        let t0 = Instant::now();
        for seq in 1..=3 {
            q.push(record(seq, "f"), true);
        }
        q.next(t0, 0, PROBE);
        for seq in 1..=3 {
            q.settle(seq, CallOutcome::Failed("E".into(), "x".into()), t0, 0, PROBE);
        }
        assert_eq!(q.dead_len(), 3);
        assert_eq!(q.redrive(Some("m2"), || 9).0, 1);
        assert_eq!(q.dead_letters(0, 10).iter().map(|v| v["id"].as_str().unwrap_or("")).collect::<Vec<_>>(), ["m1", "m3"]);
        assert_eq!(q.discard("m3").0, 1);
        assert_eq!(q.discard("m3").0, 0);
    }

    #[test]
    fn a_function_without_worker_waits_without_using_attempts_then_dies_of_age() {
        let mut q = Queue::new(QueueSettings { max_attempts: 1, max_owner_wait: Duration::from_millis(500), ..Default::default() });
        let t0 = Instant::now();
        q.push(record(1, "gone"), true);
        q.push(record(2, "gone"), true);
        q.push(record(3, "here"), true);
        assert_eq!(seqs(&q.next(t0, 1_000, PROBE).0), [1, 2, 3]);
        q.settle(1, CallOutcome::NoOwner, t0, 1_000, PROBE);
        q.settle(2, CallOutcome::NoOwner, t0, 1_000, PROBE);
        q.settle(3, CallOutcome::Done, t0, 1_000, PROBE);
        // Within the probe interval nothing is tried; after it, one message probes.
        let (d, ops, wake) = q.next(t0, 1_100, PROBE);
        assert!(d.is_empty() && ops.is_empty());
        assert_eq!(wake, Some(t0 + PROBE));
        let t1 = t0 + PROBE;
        assert_eq!(seqs(&q.next(t1, 1_200, PROBE).0), [1]);
        q.settle(1, CallOutcome::NoOwner, t1, 1_200, PROBE);
        assert_eq!(q.dead_len(), 0, "waiting for a worker uses no attempt");
        // Past the age limit both go to the dead letters, with the reason.
        let (d, ops, _) = q.next(t1 + PROBE, 1_500, PROBE);
        assert!(d.is_empty());
        assert_eq!(ops.len(), 4);
        assert_eq!(q.dead_len(), 2);
        assert!(q.dead_letters(0, 1)[0]["error"].as_str().unwrap_or("").contains("had no worker"));
    }

    #[test]
    fn the_worker_coming_back_releases_the_waiting_messages() {
        let mut q = Queue::new(QueueSettings::default());
        let t0 = Instant::now();
        q.push(record(1, "f"), true);
        q.next(t0, 0, PROBE);
        q.settle(1, CallOutcome::NoOwner, t0, 0, PROBE);
        q.push(record(2, "f"), true);
        assert!(q.next(t0, 0, PROBE).0.is_empty());
        let t1 = t0 + PROBE;
        assert_eq!(seqs(&q.next(t1, 0, PROBE).0), [1], "one probe");
        q.settle(1, CallOutcome::Done, t1, 0, PROBE);
        assert_eq!(seqs(&q.next(t1, 0, PROBE).0), [2]);
    }

    #[test]
    fn a_deep_blocked_head_bounds_the_scan() {
        let mut q = Queue::new(QueueSettings::default());
        let t0 = Instant::now();
        for seq in 1..=(SCAN_LIMIT as u64 + 1) {
            q.push(record(seq, "gone"), true);
        }
        q.push(record(5_000, "here"), true);
        // Everything at the head waits for a worker of "gone".
        q.absent.insert(("default".into(), "gone".into()), t0 + Duration::from_secs(60));
        assert!(q.next(t0, 1_000, PROBE).0.is_empty(), "the message past the scan window waits");
        for seq in 1..=(SCAN_LIMIT as u64 + 1) {
            q.forget(seq);
        }
        assert_eq!(seqs(&q.next(t0, 1_000, PROBE).0), [5_000]);
        assert!(q.absent.is_empty() || q.depth() > 0);
    }

    #[test]
    fn unstored_messages_are_not_delivered() {
        let mut q = ordered();
        let t0 = Instant::now();
        q.push(record(1, "f"), false);
        q.push(record(2, "f"), true);
        assert!(q.next(t0, 0, PROBE).0.is_empty());
        q.mark_stored(1);
        assert_eq!(seqs(&q.next(t0, 0, PROBE).0), [1]);
        let bytes = q.bytes();
        q.forget(2);
        assert!(q.bytes() < bytes);
    }
}
