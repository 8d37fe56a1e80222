//! The queue service of one shard: its inbox (enqueues, redrives, listings from the control
//! core), the queues it owns, their store, and the deliveries it has asked the control core to
//! run. Runs on the shard's executor; every handler runs to completion without awaiting, and
//! work that waits (a delivery, a backoff, an fdatasync) is a task that comes back to it.

use super::durable::{self, QueueStore};
use super::metrics::{QueueCounters, QueueMetrics};
use super::records::Record;
use super::state::{Dispatch, Queue, StoreOp};
use super::{CallOutcome, NewMessage, QueueCall, QueueCallSender, QueueModuleSettings, QueueMsg};
use crate::commit::Syncer;
use crate::store::StoreStartError;
use futures_channel::{mpsc, oneshot};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often an idle queue store compacts a slice.
const COMPACTION_PAUSE: Duration = Duration::from_millis(50);

/// What a shard's queue service needs to know.
pub struct QueueContext {
    pub index: usize,
    pub settings: Arc<QueueModuleSettings>,
    /// Where deliveries go (the control core).
    pub control: QueueCallSender,
    pub metrics: Arc<QueueMetrics>,
}

/// Before the shards start: verifies the queue store directories and re-homes their queues.
pub fn prepare(settings: &QueueModuleSettings, shards: usize) -> Result<(), StoreStartError> {
    match &settings.store {
        Some(store) => durable::prepare(store, shards),
        None => Ok(()),
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Starts shard `ctx.index`'s queue service on the current executor: opens its store, reads
/// back what it held, and serves `inbox` until the executor ends.
pub fn start(ctx: QueueContext, inbox: mpsc::UnboundedReceiver<QueueMsg>) -> Result<(), StoreStartError> {
    let mut store = match &ctx.settings.store {
        Some(settings) => Some(QueueStore::open(settings, ctx.index)?),
        None => None,
    };
    let loaded = store.as_mut().map(QueueStore::load).unwrap_or_default();
    let commit = ctx.settings.store.as_ref().and_then(|s| s.commit);
    let syncer = match (&store, commit) {
        (Some(store), Some(_)) => Some(Rc::new(Syncer::start(store.flush_handle(), ctx.index))),
        _ => None,
    };
    let has_store = store.is_some();
    let service = Rc::new(RefCell::new(Service {
        ctx,
        queues: HashMap::new(),
        counters: HashMap::new(),
        store,
        syncer,
        gather: commit.unwrap_or_default(),
        next_seq: loaded.max_seq + 1,
        bytes: 0,
        commit_waiting: Vec::new(),
        committing: false,
        wakes: HashMap::new(),
        self_ref: Weak::new(),
    }));
    {
        let mut s = service.borrow_mut();
        s.self_ref = Rc::downgrade(&service);
        let mut restored = 0;
        for (name, (waiting, dead)) in loaded.queues {
            restored += waiting.len();
            let q = s.queue(&name);
            for r in waiting {
                q.push(r, true);
            }
            for r in dead {
                q.push_dead(r);
            }
            let bytes = q.bytes();
            s.bytes += bytes;
            s.note(&name);
        }
        if restored > 0 {
            tracing::info!(shard = s.ctx.index, messages = restored, "queue store: resuming delivery of stored messages");
        }
        let names: Vec<String> = s.queues.keys().cloned().collect();
        for name in names {
            s.schedule_pump(name);
        }
    }
    if has_store {
        let compactor = Rc::downgrade(&service);
        glommio::spawn_local(async move {
            while let Some(s) = compactor.upgrade() {
                if let Some(store) = s.borrow_mut().store.as_mut() {
                    store.compact_step();
                }
                drop(s);
                glommio::timer::sleep(COMPACTION_PAUSE).await;
            }
        })
        .detach();
    }
    glommio::spawn_local(async move {
        let mut inbox = inbox;
        while let Some(msg) = inbox.next().await {
            service.borrow_mut().handle(msg);
        }
    })
    .detach();
    Ok(())
}

/// An enqueue waiting for the fdatasync that makes it durable.
struct Unsynced {
    queue: String,
    seq: u64,
    reply: oneshot::Sender<Result<(), String>>,
}

struct Service {
    ctx: QueueContext,
    queues: HashMap<String, Queue>,
    counters: HashMap<String, Arc<QueueCounters>>,
    store: Option<QueueStore>,
    /// fdatasync off the shard thread, for `batch`/`always`.
    syncer: Option<Rc<Syncer>>,
    /// Longest an fdatasync waits for more enqueues to join it.
    gather: Duration,
    next_seq: u64,
    /// Payload bytes held by all queues of this shard.
    bytes: usize,
    commit_waiting: Vec<Unsynced>,
    committing: bool,
    /// The time each queue's wake-up timer is set for.
    wakes: HashMap<String, Instant>,
    self_ref: Weak<RefCell<Service>>,
}

impl Service {
    fn queue(&mut self, name: &str) -> &mut Queue {
        if !self.queues.contains_key(name) {
            let settings = self.ctx.settings.for_queue(name).clone();
            self.queues.insert(name.to_owned(), Queue::new(settings));
            self.counters.insert(name.to_owned(), self.ctx.metrics.counters(name));
        }
        self.queues.get_mut(name).expect("queue just ensured")
    }

    /// Retires a queue that holds nothing and is not named in the config, so ad-hoc queue
    /// names do not accumulate state (it comes back on its next enqueue).
    fn retire_if_empty(&mut self, name: &str) {
        if self.ctx.settings.queues.contains_key(name) || !self.queues.get(name).is_some_and(Queue::is_empty) {
            return;
        }
        self.queues.remove(name);
        self.counters.remove(name);
        self.wakes.remove(name);
        self.ctx.metrics.remove(name);
    }

    /// Publishes a queue's counts to its metrics.
    fn note(&self, name: &str) {
        let (Some(q), Some(c)) = (self.queues.get(name), self.counters.get(name)) else { return };
        c.depth.store(q.depth() as u64, Ordering::Relaxed);
        c.in_flight.store(q.in_flight() as u64, Ordering::Relaxed);
        c.dead_letters.store(q.dead_len() as u64, Ordering::Relaxed);
        c.delivered_total.store(q.delivered_total, Ordering::Relaxed);
        c.retries_total.store(q.retries_total, Ordering::Relaxed);
        c.dead_lettered_total.store(q.dead_lettered_total, Ordering::Relaxed);
    }

    fn handle(&mut self, msg: QueueMsg) {
        match msg {
            QueueMsg::Enqueue { message, reply } => self.enqueue(message, reply),
            QueueMsg::Redrive { queue, id, reply } => {
                let answer = self.redrive(&queue, id.as_deref());
                let _ = reply.send(answer);
            }
            QueueMsg::Discard { queue, id, reply } => {
                let answer = match self.queues.get_mut(&queue) {
                    None => Ok(0),
                    Some(q) => {
                        let before = q.bytes();
                        let (n, ops) = q.discard(&id);
                        let freed = before - q.bytes();
                        self.bytes -= freed;
                        self.write(&queue, &ops).map(|()| n)
                    }
                };
                self.note(&queue);
                self.retire_if_empty(&queue);
                let _ = reply.send(answer);
            }
            QueueMsg::DeadLetters { queue, offset, limit, reply } => {
                let list = self.queues.get(&queue).map(|q| q.dead_letters(offset, limit)).unwrap_or_default();
                let _ = reply.send(list);
            }
            QueueMsg::Stats { reply } => {
                let stats = self
                    .queues
                    .iter()
                    .map(|(name, q)| {
                        json!({
                            "queue": name,
                            "depth": q.depth(),
                            "in_flight": q.in_flight(),
                            "dead_letters": q.dead_len(),
                            "concurrency": q.settings.concurrency,
                            "max_attempts": q.settings.max_attempts,
                        })
                    })
                    .collect::<Vec<Value>>();
                let _ = reply.send(stats);
            }
        }
    }

    /// Writes `ops` to the store (nothing to do in memory); an error is logged and returned.
    fn write(&mut self, queue: &str, ops: &[StoreOp]) -> Result<(), String> {
        let Some(store) = self.store.as_mut() else { return Ok(()) };
        if ops.is_empty() {
            return Ok(());
        }
        store.apply(queue, ops).map_err(|e| {
            tracing::error!(shard = self.ctx.index, queue, "queue store write failed: {e}");
            format!("the queue store failed: {e}")
        })
    }

    fn enqueue(&mut self, message: NewMessage, reply: oneshot::Sender<Result<(), String>>) {
        let settings = self.ctx.settings.clone();
        let name = message.queue.clone();
        if name.is_empty() {
            let _ = reply.send(Err("the queue name is empty".to_string()));
            return;
        }
        if name.len() > settings.max_name_bytes {
            let _ = reply.send(Err(format!("the queue name is longer than {} bytes", settings.max_name_bytes)));
            return;
        }
        if self.bytes + message.data.len() > settings.max_bytes_per_shard {
            let _ = reply.send(Err(format!(
                "queue {name:?} is full: its shard holds {} bytes of messages (max_queued_bytes_per_shard {})",
                self.bytes, settings.max_bytes_per_shard
            )));
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let record = Record {
            id: message.id,
            seq,
            namespace: message.namespace,
            function_id: message.function_id,
            data: message.data,
            traceparent: message.traceparent,
            baggage: message.baggage,
            attempts: 0,
            enqueued_at_ms: now_ms(),
            dead: None,
        };
        if let Err(e) = self.write(&name, &[StoreOp::Put(record.clone())]) {
            let _ = reply.send(Err(e));
            return;
        }
        self.bytes += record.data.len();
        let wait_for_sync = self.syncer.is_some();
        self.queue(&name).push(record, !wait_for_sync);
        if let Some(c) = self.counters.get(&name) {
            c.enqueued_total.fetch_add(1, Ordering::Relaxed);
        }
        if wait_for_sync {
            self.commit_waiting.push(Unsynced { queue: name.clone(), seq, reply });
            if !self.committing {
                self.committing = true;
                self.spawn_commit();
            }
        } else {
            let _ = reply.send(Ok(()));
            self.pump(&name);
        }
        self.note(&name);
    }

    /// Group commit of enqueues: lets the enqueues already in the inbox join (for at most
    /// `gather`), makes them durable with one fdatasync, answers them and releases them for
    /// delivery; repeats until none waits.
    fn spawn_commit(&self) {
        let (Some(syncer), this) = (self.syncer.clone(), self.self_ref.clone()) else { return };
        let gather = self.gather;
        crate::runtime::spawn_deferred(async move {
            let started = Instant::now();
            loop {
                let before = this.upgrade().map_or(0, |s| s.borrow().commit_waiting.len());
                futures_lite::future::yield_now().await;
                let after = this.upgrade().map_or(0, |s| s.borrow().commit_waiting.len());
                if after == before || started.elapsed() >= gather {
                    break;
                }
            }
            loop {
                let Some(service) = this.upgrade() else { return };
                let batch = std::mem::take(&mut service.borrow_mut().commit_waiting);
                if batch.is_empty() {
                    service.borrow_mut().committing = false;
                    return;
                }
                drop(service);
                let outcome = syncer.sync().await;
                let Some(service) = this.upgrade() else { return };
                service.borrow_mut().settle_commit(batch, outcome);
            }
        });
    }

    fn settle_commit(&mut self, batch: Vec<Unsynced>, outcome: std::io::Result<()>) {
        let mut touched = Vec::new();
        for Unsynced { queue, seq, reply } in batch {
            let Some(q) = self.queues.get_mut(&queue) else { continue };
            match &outcome {
                Ok(()) => {
                    q.mark_stored(seq);
                    let _ = reply.send(Ok(()));
                }
                Err(e) => {
                    let before = q.bytes();
                    q.forget(seq);
                    self.bytes -= before - q.bytes();
                    let _ = reply.send(Err(format!("the message could not be made durable: the queue store failed ({e}); restart the engine")));
                }
            }
            if !touched.contains(&queue) {
                touched.push(queue);
            }
        }
        for queue in touched {
            self.pump(&queue);
            self.note(&queue);
            self.retire_if_empty(&queue);
        }
    }

    /// Pumps `queue` from a task of its own (not while a caller holds the service).
    fn schedule_pump(&self, queue: String) {
        let this = self.self_ref.clone();
        crate::runtime::spawn_deferred(async move {
            if let Some(s) = this.upgrade() {
                s.borrow_mut().pump(&queue);
            }
        });
    }

    /// Starts what `queue` may deliver now and sets its wake-up for what must wait.
    fn pump(&mut self, name: &str) {
        let probe = self.ctx.settings.owner_probe;
        let Some(q) = self.queues.get_mut(name) else { return };
        let (dispatches, ops, wake) = q.next(Instant::now(), now_ms(), probe);
        let _ = self.write(name, &ops);
        for d in dispatches {
            self.deliver(name, d);
        }
        if let Some(at) = wake {
            self.wake_at(name, at);
        }
        self.note(name);
    }

    /// Asks the control core to run one delivery; its outcome comes back to `settle`.
    fn deliver(&mut self, queue: &str, d: Dispatch) {
        let (tx, rx) = oneshot::channel();
        let call = QueueCall {
            queue: queue.to_owned(),
            namespace: d.namespace,
            function_id: d.function_id,
            data: d.data,
            traceparent: d.traceparent,
            baggage: d.baggage,
            reply: tx,
        };
        // If the control core is gone the reply is dropped, which reads as a shutdown.
        let _ = self.ctx.control.unbounded_send(call);
        let this = self.self_ref.clone();
        let queue = queue.to_owned();
        let seq = d.seq;
        crate::runtime::spawn_deferred(async move {
            let outcome = rx.await.unwrap_or(CallOutcome::Shutdown);
            if let Some(s) = this.upgrade() {
                s.borrow_mut().settle(&queue, seq, outcome);
            }
        });
    }

    fn settle(&mut self, name: &str, seq: u64, outcome: CallOutcome) {
        if outcome == CallOutcome::Shutdown {
            return; // the engine is stopping: the message stays stored for the next start
        }
        let probe = self.ctx.settings.owner_probe;
        let Some(q) = self.queues.get_mut(name) else { return };
        let before = q.bytes();
        let ops = q.settle(seq, outcome, Instant::now(), now_ms(), probe);
        self.bytes -= before - q.bytes();
        let _ = self.write(name, &ops);
        self.pump(name);
        self.retire_if_empty(name);
    }

    /// Makes sure `queue` is pumped again at `at`.
    fn wake_at(&mut self, queue: &str, at: Instant) {
        if self.wakes.get(queue).is_some_and(|&set| set <= at && set > Instant::now()) {
            return;
        }
        self.wakes.insert(queue.to_owned(), at);
        let this = self.self_ref.clone();
        let queue = queue.to_owned();
        crate::runtime::spawn_deferred(async move {
            glommio::timer::sleep(at.saturating_duration_since(Instant::now())).await;
            let Some(s) = this.upgrade() else { return };
            let mut s = s.borrow_mut();
            if s.wakes.get(&queue) == Some(&at) {
                s.wakes.remove(&queue);
            }
            s.pump(&queue);
        });
    }

    fn redrive(&mut self, name: &str, id: Option<&str>) -> Result<u64, String> {
        let mut next = self.next_seq;
        let Some(q) = self.queues.get_mut(name) else { return Ok(0) };
        // Bytes stay the same: the messages move from the dead letters to the queue.
        let (moved, ops) = q.redrive(id, || {
            let seq = next;
            next += 1;
            seq
        });
        self.next_seq = next;
        self.write(name, &ops)?;
        if moved > 0 {
            tracing::info!(queue = name, moved, "dead letters redriven to the queue");
        }
        self.pump(name);
        Ok(moved)
    }
}
