//! One shard core: owns the groups that hash to it (their store and event order), serves the
//! subscriber connections accepted on its listener, and fans each event frame out — built once,
//! shared by every subscriber on every shard.

use super::frames;
use super::messages::*;
use super::subscriber;
use crate::config::StreamConfig;
use bytes::Bytes;
use futures_util::StreamExt;
use ringcast_shards::outbound::{OutQueue, Push};
use ringcast_shards::wsframe::{close_frame, text_frame};
use super::store::{ShardStore, Syncer};
use crate::config::Durability;
use futures_channel::oneshot;
use ringcast_storage::update_ops;
use ringcast_storage::{Json, KvStore};
use serde_json::{json, Value};
use std::cell::RefCell;
use std::collections::HashMap;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Close code and reason for a subscriber that fell behind its queue bound.
pub const CLOSE_SLOW: (u16, &str) = (4008, "slow subscriber");
/// How long a closing connection may take to flush its close frame before its socket is shut.
const CLOSE_FLUSH_LIMIT: Duration = Duration::from_secs(2);

/// Everything a shard needs to know about its peers.
pub struct ShardContext {
    pub index: usize,
    /// Inboxes of all shards, this one included, by index.
    pub peers: Vec<ShardSender>,
    pub control: ControlSender,
    pub config: StreamConfig,
    /// Counters; `metrics.queued_bytes[i]` is the bytes shard `i` has queued for its
    /// subscribers (frames on their way to it included). Nothing waits on it: each connection's
    /// queue is bounded and a stalled one is closed (see `close_slow`), so no write ever waits
    /// for a subscriber that may never read.
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl ShardContext {
    fn counters(&self) -> &crate::metrics::ShardMetrics {
        &self.metrics.shards[self.index]
    }
}

/// A subscription registered on this shard, receiving the group's frames.
struct LocalSub {
    conn: ConnId,
    join_id: u64,
    item: Option<String>,
}

/// A subscription of a connection, as the connection knows it.
pub struct SubState {
    pub key: GroupKey,
    pub item: Option<String>,
    pub join_id: u64,
    /// Registered for delivery (its `sync` frame has been queued).
    pub active: bool,
}

/// A subscriber connection served by this shard.
pub struct Conn {
    pub queue: OutQueue,
    pub fd: RawFd,
    pub context: Value,
    pub subs: HashMap<String, SubState>,
    /// Subscriptions ended by a close, kept for the `stream:leave` triggers at removal.
    pub ended: Vec<(String, GroupKey, Option<String>)>,
}

/// The state of one shard core.
pub struct Shard {
    pub ctx: ShardContext,
    store: ShardStore,
    /// How writes are acknowledged (file store only; in memory is always immediate).
    durability: Durability,
    /// Group commit: fdatasync off the shard thread.
    syncer: Option<Rc<Syncer>>,
    /// Writes applied but not yet durable: their replies and events wait for the commit.
    uncommitted: Vec<(GroupKey, Applied, oneshot::Sender<StoreReply>)>,
    /// Per group, writes in `uncommitted` or in the commit under way: reads of it wait.
    uncommitted_writes: HashMap<GroupKey, usize>,
    /// A commit task is running.
    committing: bool,
    /// Joins that must see only committed data; served when no commit is outstanding.
    deferred_joins: Vec<(usize, ConnId, u64, GroupKey, Option<String>)>,
    /// The inbox task, holding writes back until the deferred joins are served.
    joins_waker: Option<std::task::Waker>,
    self_ref: std::rc::Weak<RefCell<Shard>>,
    /// Owner side: per owned group, how many subscriptions each shard holds.
    interest: HashMap<GroupKey, HashMap<usize, usize>>,
    /// Subscriber side: subscriptions of this shard's connections, per group.
    local: HashMap<GroupKey, Vec<LocalSub>>,
    pub conns: HashMap<ConnId, Conn>,
    /// Connections given frames quietly since their last flush, each once (see `OutQueue::flush`).
    unflushed: Vec<ConnId>,
    /// The flusher task, parked while `unflushed` is empty.
    flusher: Option<std::task::Waker>,
    next_conn: ConnId,
    next_join: u64,
}

fn storage_error(code: &str, message: impl Into<String>) -> Result<Option<Value>, (String, String)> {
    Err((code.to_string(), message.into()))
}

/// Reads a stored value. Never turns into `null`: text that does not parse (a value written
/// deeper than the reader accepts, by a version without the write-time check) is an error that
/// names the problem; the text itself stays stored and is still what subscribers' frames carry.
fn parse_stored(json: &Json) -> Result<Value, String> {
    serde_json::from_str(json).map_err(|e| format!("the stored value cannot be read back: {e}"))
}

/// `(code, message)` for a stored value `parse_stored` could not read.
fn unreadable(code: &str, item: &str, why: String) -> (String, String) {
    (code.to_string(), format!("item {item:?}: {why}"))
}

/// Checks a document about to be stored against the limits that let it read back as itself:
/// `max_value_bytes` on its text and `MAX_DOCUMENT_DEPTH` on its nesting.
fn check_storable(value: &Value, text: &str, max_value: usize, what: &str) -> Result<(), String> {
    let depth = update_ops::depth(value);
    if depth > update_ops::MAX_DOCUMENT_DEPTH {
        return Err(format!(
            "{what} is nested {depth} levels deep, over the limit of {} levels a stored value may have",
            update_ops::MAX_DOCUMENT_DEPTH
        ));
    }
    if text.len() > max_value {
        return Err(format!("{what} is {} bytes, over the limit of {max_value} bytes (max_value_bytes)", text.len()));
    }
    Ok(())
}

/// The JSON text of a value. Serialising a `Value` cannot fail (its keys are strings); the
/// error path keeps that an error rather than a panic.
fn value_text(value: &Value) -> Result<Json, String> {
    serde_json::to_string(value).map(Json::from).map_err(|e| format!("the value cannot be encoded: {e}"))
}

/// `{"old_value": …}` plus `extra`; an unreadable old value is reported in `old_value_error`
/// instead of being shown as `null` (the write it belongs to has happened).
fn with_old_value(old: Option<&Json>, extra: Option<(&str, Value)>) -> Value {
    let mut result = serde_json::Map::new();
    match old.map(parse_stored).transpose() {
        Ok(old) => {
            result.insert("old_value".to_string(), old.unwrap_or(Value::Null));
        }
        Err(why) => {
            result.insert("old_value_error".to_string(), Value::String(why));
        }
    }
    if let Some((key, value)) = extra {
        result.insert(key.to_string(), value);
    }
    Value::Object(result)
}

/// The outcome of a storage operation, before it is made durable and published.
pub struct Applied {
    result: Result<Option<Value>, (String, String)>,
    /// `(item, frame text)` of the event it produced.
    event: Option<(Option<String>, String)>,
    /// Whether it wrote to the store (and so needs a commit).
    wrote: bool,
}

impl Shard {
    pub fn new(ctx: ShardContext, store: ShardStore, durability: Durability) -> Self {
        let syncer = match durability {
            // `always` uses the sync thread too, without gathering: the shard keeps serving other
            // groups while the disk works, instead of blocking in fdatasync for every write.
            Durability::Batch | Durability::Always => store.flush_handle().map(|h| Rc::new(Syncer::start(h, ctx.index))),
            _ => None,
        };
        Shard {
            ctx,
            store,
            durability,
            syncer,
            uncommitted: Vec::new(),
            uncommitted_writes: HashMap::new(),
            committing: false,
            deferred_joins: Vec::new(),
            joins_waker: None,
            self_ref: std::rc::Weak::new(),
            interest: HashMap::new(),
            local: HashMap::new(),
            conns: HashMap::new(),
            unflushed: Vec::new(),
            flusher: None,
            next_conn: 1,
            next_join: 1,
        }
    }

    /// This shard's count of bytes queued for its subscribers.
    pub fn load(&self) -> Arc<AtomicUsize> {
        self.ctx.metrics.queued_bytes[self.ctx.index].clone()
    }

    pub fn owner_of(&self, key: &GroupKey) -> usize {
        ringcast_shards::routing::owner_shard(&key.0, &key.1, self.ctx.peers.len())
    }

    /// Applies one inbox message.
    pub fn handle(&mut self, msg: ShardMsg) {
        match msg {
            ShardMsg::Store { key, op, reply } => {
                let read = matches!(op, StoreOp::Get { .. } | StoreOp::List);
                let applied = self.store_op(&key, op);
                self.acknowledge(key, applied, reply, read);
            }
            ShardMsg::ListGroups { stream, reply } => {
                let _ = reply.send(self.store.list_groups(&stream));
            }
            ShardMsg::ListStreams { reply } => {
                let _ = reply.send(self.store.list_streams());
            }
            ShardMsg::Join { from_shard, conn, join_id, key, item } => self.join_at_owner(from_shard, conn, join_id, key, item),
            ShardMsg::Leave { from_shard, key } => self.leave_at_owner(from_shard, &key),
            ShardMsg::Synced { conn, join_id, key, snapshot } => self.activate(conn, join_id, key, snapshot),
            ShardMsg::Deliver { key, item, frame } => {
                self.deliver_local(&key, item.as_deref(), &frame);
                self.ctx.metrics.queued_bytes[self.ctx.index].fetch_sub(frame.len(), Ordering::Relaxed);
            }
        }
    }

    /// Runs a storage operation on an owned group and publishes its event.
    fn store_op(&mut self, key: &GroupKey, op: StoreOp) -> Applied {
        let (stream, group) = (key.0.as_str(), key.1.as_str());
        let max_value = self.ctx.config.max_value_bytes;
        let mut event: Option<(Option<String>, String)> = None;
        let kind_of_op = match &op {
            StoreOp::Send { .. } | StoreOp::Emit { .. } => OpKind::Ephemeral,
            _ => OpKind::Stored,
        };
        let result = match op {
            StoreOp::Set { item, data } => {
                let checked = value_text(&data).and_then(|text| {
                    check_storable(&data, &text, max_value, "the value").map(|()| text)
                });
                match checked {
                    Err(why) => storage_error("STREAM_SET_ERROR", format!("Failed to set value: {why}")),
                    Ok(text) => match self.store.set(stream, group, &item, text.clone()) {
                        Ok(old) => {
                            self.account_store(text.len(), old.as_ref().map_or(0, |o| o.len()));
                            let kind = if old.is_some() { EventKind::Update } else { EventKind::Create };
                            event = Some((Some(item.clone()), frames::data_event(stream, group, Some(&item), kind.as_str(), &text)));
                            Ok(Some(with_old_value(old.as_ref(), Some(("new_value", data)))))
                        }
                        Err(e) => storage_error("STREAM_SET_ERROR", format!("Failed to set value: {e}")),
                    },
                }
            }
            StoreOp::Get { item } => match self.store.health() {
                Err(e) => storage_error("STREAM_STORE_ERROR", e.to_string()),
                Ok(()) => match self.store.get(stream, group, &item).as_ref().map(parse_stored).transpose() {
                    Ok(value) => Ok(value),
                    Err(why) => Err(unreadable("STREAM_GET_ERROR", &item, why)),
                },
            },
            StoreOp::Delete { item } => match self.store.delete(stream, group, &item) {
                Ok(old) => {
                    if let Some(old) = &old {
                        self.account_store(0, old.len());
                        event = Some((Some(item.clone()), frames::data_event(stream, group, Some(&item), "delete", old)));
                    }
                    Ok(Some(with_old_value(old.as_ref(), None)))
                }
                Err(e) => storage_error("STREAM_DELETE_ERROR", format!("Failed to delete value: {e}")),
            },
            StoreOp::List => match self.store.health() {
                Err(e) => storage_error("STREAM_STORE_ERROR", e.to_string()),
                Ok(()) => {
                    let values: Result<Vec<Value>, String> = self.store.list(stream, group).iter().map(parse_stored).collect();
                    match values {
                        Ok(values) => Ok(Some(Value::Array(values))),
                        Err(why) => storage_error("STREAM_GET_GROUP_ERROR", format!("a value of group {group:?}: {why}")),
                    }
                }
            },
            StoreOp::Update { item, ops } => {
                let old = self.store.get(stream, group, &item);
                // The ops apply to the stored document: one that cannot be read is left as it is
                // (applying to `null` would erase it).
                let applied = old.as_ref().map(parse_stored).transpose().and_then(|old_value| {
                    let (new_value, errors) = update_ops::apply(old_value.as_ref(), &ops);
                    let text = value_text(&new_value)?;
                    check_storable(&new_value, &text, max_value, "the result")?;
                    Ok((old_value, new_value, errors, text))
                });
                match applied {
                    Err(why) => storage_error("STREAM_UPDATE_ERROR", format!("Failed to update value: item {item:?}: {why}")),
                    Ok((old_value, new_value, errors, text)) => match self.store.set(stream, group, &item, text.clone()) {
                        Ok(_) => {
                            self.account_store(text.len(), old.as_ref().map_or(0, |o| o.len()));
                            let kind = if old.is_some() { EventKind::Update } else { EventKind::Create };
                            event = Some((Some(item.clone()), frames::data_event(stream, group, Some(&item), kind.as_str(), &text)));
                            let mut result = json!({ "old_value": old_value, "new_value": new_value });
                            if !errors.is_empty() {
                                result["errors"] = serde_json::to_value(&errors).unwrap_or(Value::Null);
                            }
                            Ok(Some(result))
                        }
                        Err(e) => storage_error("STREAM_UPDATE_ERROR", format!("Failed to update value: {e}")),
                    },
                }
            }
            StoreOp::Send { item, event_type, data } => match value_text(&data) {
                Ok(data) => {
                    event = Some((item.clone(), frames::custom_event(stream, group, item.as_deref(), &event_type, &data)));
                    Ok(Some(Value::Null))
                }
                Err(why) => storage_error("STREAM_SEND_ERROR", why),
            },
            StoreOp::Emit { item, kind, data } => match value_text(&data) {
                Ok(data) => {
                    event = Some((item.clone(), frames::data_event(stream, group, item.as_deref(), kind.as_str(), &data)));
                    Ok(None)
                }
                Err(why) => storage_error("STREAM_EMIT_ERROR", why),
            },
        };
        let wrote = result.is_ok() && event.is_some() && !matches!(kind_of_op, OpKind::Ephemeral);
        Applied { result, event, wrote }
    }

    /// Answers a storage operation once it is as durable as configured, publishing its event
    /// at the same moment: subscribers never see a write a crash could take back. A read
    /// (`read`) of a group with writes still waiting for their commit waits behind them, in
    /// order, so no caller sees a value a crash (or a failed sync) could take back either.
    fn acknowledge(&mut self, key: GroupKey, applied: Applied, reply: oneshot::Sender<StoreReply>, read: bool) {
        if self.syncer.is_some() && (applied.wrote || (read && self.uncommitted_writes.contains_key(&key))) {
            if applied.wrote {
                *self.uncommitted_writes.entry(key.clone()).or_default() += 1;
            }
            self.uncommitted.push((key, applied, reply));
            self.schedule_commit();
            return;
        }
        self.finish(key, applied, reply);
    }

    /// A write of `key` left the commit queue (answered either way).
    fn write_committed(&mut self, key: &GroupKey) {
        if let Some(count) = self.uncommitted_writes.get_mut(key) {
            *count -= 1;
            if *count == 0 {
                self.uncommitted_writes.remove(key);
            }
        }
    }

    fn finish(&mut self, key: GroupKey, applied: Applied, reply: oneshot::Sender<StoreReply>) {
        let event = match (&applied.result, applied.event) {
            (Ok(_), Some((item, text))) => Some(self.publish(&key, item, text.as_bytes())),
            _ => None,
        };
        let _ = reply.send(StoreReply { result: applied.result, event });
    }

    /// Group commit: every write applied by the time the commit starts shares its fdatasync.
    fn schedule_commit(&mut self) {
        if self.committing {
            return;
        }
        self.committing = true;
        let shard = self.self_ref.clone();
        let gather_limit = match self.durability {
            Durability::Batch => Duration::from_micros(self.ctx.config.kv().batch_max_delay_us),
            _ => Duration::ZERO,
        };
        crate::control::engine::spawn_deferred(async move {
            // Let the writes already in the inbox join this commit: keep yielding while more
            // arrive, for at most `batch_max_delay_us`.
            let started = std::time::Instant::now();
            loop {
                let before = shard.upgrade().map_or(0, |s| s.borrow().uncommitted.len());
                futures_lite::future::yield_now().await;
                let after = shard.upgrade().map_or(0, |s| s.borrow().uncommitted.len());
                if after == before || started.elapsed() >= gather_limit {
                    break;
                }
            }
            loop {
                let Some(this) = shard.upgrade() else { return };
                let (batch, syncer) = {
                    let mut s = this.borrow_mut();
                    (std::mem::take(&mut s.uncommitted), s.syncer.clone())
                };
                if batch.is_empty() {
                    let mut s = this.borrow_mut();
                    s.committing = false;
                    s.serve_deferred_joins();
                    return;
                }
                let outcome = match syncer {
                    Some(syncer) => syncer.sync().await,
                    None => Ok(()),
                };
                let mut s = this.borrow_mut();
                for (key, applied, reply) in batch {
                    if applied.wrote {
                        s.write_committed(&key);
                    }
                    let applied = match &outcome {
                        Ok(()) => applied,
                        Err(e) => not_durable(applied, e),
                    };
                    s.finish(key, applied, reply);
                }
            }
        });
    }

    /// Resolves once no join is waiting for a commit, so writes cannot starve a join.
    async fn joins_served(shard: &Rc<RefCell<Shard>>) {
        std::future::poll_fn(|cx| {
            let mut s = shard.borrow_mut();
            if s.deferred_joins.is_empty() {
                return std::task::Poll::Ready(());
            }
            s.joins_waker = Some(cx.waker().clone());
            std::task::Poll::Pending
        })
        .await
    }

    fn serve_deferred_joins(&mut self) {
        for (from_shard, conn, join_id, key, item) in std::mem::take(&mut self.deferred_joins) {
            self.join_at_owner(from_shard, conn, join_id, key, item);
        }
        if let Some(waker) = self.joins_waker.take() {
            waker.wake();
        }
    }

    fn account_store(&self, added: usize, removed: usize) {
        let bytes = &self.ctx.counters().store_bytes;
        bytes.fetch_add(added as u64, Ordering::Relaxed);
        bytes.fetch_sub(removed as u64, Ordering::Relaxed);
    }

    /// Builds the event's frame once and hands it to every shard with subscribers of the group.
    fn publish(&mut self, key: &GroupKey, item: Option<String>, text: &[u8]) -> Bytes {
        self.ctx.counters().events_total.fetch_add(1, Ordering::Relaxed);
        let frame = text_frame(text);
        let Some(shards) = self.interest.get(key) else { return frame };
        let mut deliver_here = false;
        for &shard in shards.keys() {
            if shard == self.ctx.index {
                deliver_here = true;
            } else {
                self.ctx.metrics.queued_bytes[shard].fetch_add(frame.len(), Ordering::Relaxed);
                let _ = self.ctx.peers[shard].unbounded_send(ShardMsg::Deliver { key: key.clone(), item: item.clone(), frame: frame.clone() });
            }
        }
        if deliver_here {
            self.deliver_local(key, item.as_deref(), &frame);
        }
        frame
    }

    /// Queues `frame` for every local subscription of `key` that matches `item`.
    fn deliver_local(&mut self, key: &GroupKey, item: Option<&str>, frame: &Bytes) {
        let Some(subs) = self.local.get(key) else { return };
        let mut slow = Vec::new();
        let mut delivered = 0;
        for sub in subs {
            if sub.item.is_some() && sub.item.as_deref() != item {
                continue;
            }
            if let Some(conn) = self.conns.get(&sub.conn) {
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
        self.ctx.counters().deliveries_total.fetch_add(delivered, Ordering::Relaxed);
        if delivered > 0 {
            if let Some(flusher) = self.flusher.take() {
                flusher.wake();
            }
        }
        for conn in slow {
            self.close_slow(conn, Slow::Overflow);
        }
    }

    /// The slow-subscriber policy: close with 4008, stop delivering to it at once.
    fn close_slow(&mut self, conn: ConnId, why: Slow) {
        let Some(c) = self.conns.get(&conn) else { return };
        if c.queue.is_closing() {
            return;
        }
        self.ctx.counters().slow_subscriber_closes_total.fetch_add(1, Ordering::Relaxed);
        let why = match why {
            Slow::Overflow => "its outbound queue passed max_queue_bytes",
            Slow::Stalled => "its socket took none of its queued bytes for slow_subscriber_timeout_ms",
        };
        tracing::warn!(shard = self.ctx.index, conn, queued_bytes = c.queue.queued_bytes(), "closing slow subscriber (4008): {why}");
        self.close_conn(conn, CLOSE_SLOW.0, CLOSE_SLOW.1);
    }

    /// Closes every connection that has held bytes to write without progress for `limit`.
    fn close_stalled(&mut self, limit: Duration) {
        let now = std::time::Instant::now();
        let stalled: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.queue.stalled_for(now).is_some_and(|d| d >= limit))
            .map(|(&id, _)| id)
            .collect();
        for conn in stalled {
            self.close_slow(conn, Slow::Stalled);
        }
    }

    /// Sends a close frame (dropping queued frames), ends its subscriptions, and shuts the socket
    /// if the close frame cannot be flushed in time.
    pub fn close_conn(&mut self, conn: ConnId, code: u16, reason: &str) {
        let Some(c) = self.conns.get(&conn) else { return };
        c.queue.close(close_frame(code, reason));
        self.drop_subscriptions(conn);
        let shard = self.self_ref.clone();
        glommio::spawn_local(async move {
            glommio::timer::sleep(CLOSE_FLUSH_LIMIT).await;
            // Only while the connection is still registered is its fd still its own: after it
            // ends the number may belong to a newer connection.
            let Some(shard) = shard.upgrade() else { return };
            let shard = shard.borrow();
            if let Some(c) = shard.conns.get(&conn) {
                // SAFETY: shutdown(2) on the socket of a live connection; it only makes its
                // pending reads and writes fail, so its task ends.
                unsafe { libc::shutdown(c.fd, libc::SHUT_RDWR) };
            }
        })
        .detach();
    }

    /// Registers a new connection.
    pub fn add_conn(&mut self, queue: OutQueue, fd: RawFd, context: Value) -> ConnId {
        let id = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(id, Conn { queue, fd, context, subs: HashMap::new(), ended: Vec::new() });
        self.ctx.counters().subscribers.store(self.conns.len() as u64, Ordering::Relaxed);
        id
    }

    /// Removes a connection, ending its subscriptions; returns its auth context and every
    /// subscription it held at its end (for the `stream:leave` triggers).
    pub fn remove_conn(&mut self, conn: ConnId) -> (Value, Vec<(String, GroupKey, Option<String>)>) {
        self.drop_subscriptions(conn);
        let removed = self.conns.remove(&conn);
        self.ctx.counters().subscribers.store(self.conns.len() as u64, Ordering::Relaxed);
        match removed {
            Some(c) => (c.context, c.ended),
            None => (Value::Null, Vec::new()),
        }
    }

    /// Ends every subscription of `conn`, remembering them in `Conn::ended`.
    fn drop_subscriptions(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let subs: Vec<(String, SubState)> = c.subs.drain().collect();
        for (id, sub) in subs {
            if let Some(c) = self.conns.get_mut(&conn) {
                c.ended.push((id, sub.key.clone(), sub.item.clone()));
            }
            self.end_subscription(conn, sub);
        }
    }

    /// Starts a subscription of `conn`: the owner snapshots the group and registers interest at
    /// the same point of its event sequence. Replaces a subscription with the same id.
    pub fn join(&mut self, conn: ConnId, subscription: String, key: GroupKey, item: Option<String>) {
        let join_id = self.next_join;
        self.next_join += 1;
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let previous = c.subs.insert(subscription, SubState { key: key.clone(), item: item.clone(), join_id, active: false });
        if let Some(previous) = previous {
            self.end_subscription(conn, previous);
        }
        let owner = self.owner_of(&key);
        if owner == self.ctx.index {
            self.join_at_owner(owner, conn, join_id, key, item);
        } else {
            let msg = ShardMsg::Join { from_shard: self.ctx.index, conn, join_id, key, item };
            let _ = self.ctx.peers[owner].unbounded_send(msg);
        }
    }

    /// Ends one subscription of `conn` by id; returns it if it existed.
    pub fn leave(&mut self, conn: ConnId, subscription: &str) -> Option<(GroupKey, Option<String>)> {
        let sub = self.conns.get_mut(&conn)?.subs.remove(subscription)?;
        let ended = (sub.key.clone(), sub.item.clone());
        self.end_subscription(conn, sub);
        Some(ended)
    }

    /// Stops delivery of an ended subscription; an active one releases its interest at the owner
    /// now, a pending one when its `Synced` arrives (see `activate`).
    fn end_subscription(&mut self, conn: ConnId, sub: SubState) {
        if !sub.active {
            return;
        }
        self.ctx.counters().subscriptions.fetch_sub(1, Ordering::Relaxed);
        if let Some(subs) = self.local.get_mut(&sub.key) {
            subs.retain(|s| !(s.conn == conn && s.join_id == sub.join_id));
            if subs.is_empty() {
                self.local.remove(&sub.key);
            }
        }
        self.release_interest(sub.key);
    }

    fn release_interest(&mut self, key: GroupKey) {
        let owner = self.owner_of(&key);
        if owner == self.ctx.index {
            self.leave_at_owner(owner, &key);
        } else {
            let _ = self.ctx.peers[owner].unbounded_send(ShardMsg::Leave { from_shard: self.ctx.index, key });
        }
    }

    fn join_at_owner(&mut self, from_shard: usize, conn: ConnId, join_id: u64, key: GroupKey, item: Option<String>) {
        if self.committing {
            // The snapshot must not hold writes whose events are still waiting for the disk.
            self.deferred_joins.push((from_shard, conn, join_id, key, item));
            return;
        }
        // A failed store serves no snapshot: its index may hold a write that never became durable.
        let snapshot = match self.store.health() {
            Err(_) => Err(CLOSE_STORE_FAILED),
            Ok(()) => {
                *self.interest.entry(key.clone()).or_default().entry(from_shard).or_default() += 1;
                let text = match &item {
                    Some(id) => {
                        let value = self.store.get(&key.0, &key.1, id);
                        frames::data_event(&key.0, &key.1, Some(id), "sync", value.as_deref().unwrap_or("null"))
                    }
                    None => frames::group_sync(&key.0, &key.1, &self.store.list(&key.0, &key.1)),
                };
                Ok(text_frame(text.as_bytes()))
            }
        };
        if from_shard == self.ctx.index {
            // Activate now: the next local publish must already include this subscription.
            self.activate(conn, join_id, key, snapshot);
        } else {
            let _ = self.ctx.peers[from_shard].unbounded_send(ShardMsg::Synced { conn, join_id, key, snapshot });
        }
    }

    fn leave_at_owner(&mut self, from_shard: usize, key: &GroupKey) {
        if let Some(shards) = self.interest.get_mut(key) {
            if let Some(count) = shards.get_mut(&from_shard) {
                *count -= 1;
                if *count == 0 {
                    shards.remove(&from_shard);
                }
            }
            if shards.is_empty() {
                self.interest.remove(key);
            }
        }
    }

    /// The owner's snapshot arrived: queue the `sync` frame and start delivering. A subscription
    /// that ended (or was replaced) meanwhile gives its interest back instead.
    fn activate(&mut self, conn: ConnId, join_id: u64, key: GroupKey, snapshot: Snapshot) {
        let frame = match snapshot {
            Ok(frame) => frame,
            // No interest was registered for a refused snapshot: nothing to give back.
            Err((code, reason)) => return self.close_conn(conn, code, reason),
        };
        let sub = self
            .conns
            .get_mut(&conn)
            .and_then(|c| c.subs.values_mut().find(|s| s.join_id == join_id));
        let Some(sub) = sub else {
            self.release_interest(key);
            return;
        };
        sub.active = true;
        let item = sub.item.clone();
        self.ctx.counters().subscriptions.fetch_add(1, Ordering::Relaxed);
        self.local.entry(key).or_default().push(LocalSub { conn, join_id, item });
        // The snapshot counts against the same bound as events (one always fits an empty queue).
        if self.conns.get(&conn).is_some_and(|c| c.queue.push(frame) == Push::Overflow) {
            self.close_slow(conn, Slow::Overflow);
        }
    }

    /// Closes every connection with "going away".
    pub fn shutdown(&mut self) {
        let conns: Vec<ConnId> = self.conns.keys().copied().collect();
        for conn in conns {
            self.close_conn(conn, 1001, "engine shutting down");
        }
    }
}

/// Why a subscriber is closed as slow.
#[derive(Clone, Copy)]
enum Slow {
    /// Its queue would pass `max_queue_bytes`.
    Overflow,
    /// It held bytes and read none for `slow_subscriber_timeout_ms`.
    Stalled,
}

/// How often a shard looks for stalled subscribers: a quarter of the timeout, so one is closed
/// at most 25% late, within bounds that keep the scan cheap.
fn stall_check_interval(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// Test-only fault trigger: `RINGCAST_TEST_PANIC_SHARD=<index>` makes that shard panic on the
/// first message of its inbox, to show that a dying core takes the process down (exit 70)
/// instead of leaving it half alive. Not a setting; read once at shard start.
fn induced_panic(index: usize) -> bool {
    std::env::var("RINGCAST_TEST_PANIC_SHARD").is_ok_and(|v| v == index.to_string())
}

/// Whether an operation stores data (and so must be committed) or only publishes.
enum OpKind {
    Stored,
    Ephemeral,
}

/// A write whose commit failed, or a read that waited for it: the caller gets an error and
/// subscribers no event. The store has stopped (fail-stop) and answers errors from now on.
fn not_durable(applied: Applied, error: &std::io::Error) -> Applied {
    let what = if applied.wrote { "the write could not be made durable" } else { "the read waited for a write that could not be made durable" };
    Applied {
        result: Err(("STREAM_STORE_ERROR".to_string(), format!("{what}: the file store failed ({error}); restart the engine"))),
        event: None,
        wrote: applied.wrote,
    }
}

/// Runs shard `ctx.index` until `shutdown` is set; fails (before serving) when its store cannot
/// be opened.
pub async fn run(
    ctx: ShardContext,
    inbox: futures_channel::mpsc::UnboundedReceiver<ShardMsg>,
    listener_fd: std::os::fd::OwnedFd,
    shutdown: Arc<AtomicBool>,
) -> Result<(), String> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    let index = ctx.index;
    let kv = ctx.config.kv().clone();
    let store = super::store::open_for_shard(&kv, index)?;
    let stall_timeout = Duration::from_millis(ctx.config.slow_subscriber_timeout_ms);
    let durability = if super::store::needs_commit(&kv) { kv.durability } else { Durability::None };
    let shard = Rc::new(RefCell::new(Shard::new(ctx, store, durability)));
    shard.borrow_mut().self_ref = Rc::downgrade(&shard);
    if kv.store_method == crate::config::StoreMethod::FileBased {
        let compactor = Rc::downgrade(&shard);
        glommio::spawn_local(async move {
            while let Some(shard) = compactor.upgrade() {
                shard.borrow_mut().store.compact_step();
                drop(shard);
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
        })
        .detach();
    }

    // Writes what fan-out queued, once the burst that queued it is over (the inbox task yields
    // only when its inbox is empty or its time slice ends), so frames still coalesce under load.
    let flusher = Rc::downgrade(&shard);
    glommio::spawn_local(async move {
        let mut scratch = Vec::new();
        let mut batch = Vec::new();
        loop {
            let ready = std::future::poll_fn(|cx| {
                let Some(shard) = flusher.upgrade() else { return std::task::Poll::Ready(false) };
                let mut shard = shard.borrow_mut();
                if shard.unflushed.is_empty() {
                    shard.flusher = Some(cx.waker().clone());
                    return std::task::Poll::Pending;
                }
                std::mem::swap(&mut shard.unflushed, &mut batch);
                std::task::Poll::Ready(true)
            })
            .await;
            let Some(shard) = flusher.upgrade().filter(|_| ready) else { return };
            let shard = shard.borrow();
            for conn in batch.drain(..) {
                if let Some(c) = shard.conns.get(&conn) {
                    c.queue.flush(c.fd, &mut scratch);
                }
            }
        }
    })
    .detach();

    // Stalled subscribers: closed once they have held bytes without progress for the timeout,
    // so their bytes are freed even when no new event comes to overflow their queue.
    if !stall_timeout.is_zero() {
        let reaper = Rc::downgrade(&shard);
        glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(stall_check_interval(stall_timeout)).await;
                let Some(shard) = reaper.upgrade() else { return };
                shard.borrow_mut().close_stalled(stall_timeout);
            }
        })
        .detach();
    }

    // The inbox never waits on subscribers: a slow one is closed, not waited for.
    let inbox_shard = shard.clone();
    let panic_on_first_message = induced_panic(index);
    glommio::spawn_local(async move {
        let mut inbox = inbox;
        while let Some(msg) = inbox.next().await {
            if panic_on_first_message {
                panic!("shard {index}: induced failure (RINGCAST_TEST_PANIC_SHARD)");
            }
            if matches!(msg, ShardMsg::Store { .. }) {
                // A waiting join goes first, so writes cannot starve it.
                Shard::joins_served(&inbox_shard).await;
            }
            inbox_shard.borrow_mut().handle(msg);
        }
    })
    .detach();

    let listener_fd = listener_fd.into_raw_fd();
    // SAFETY: a bound, listening TCP socket handed to this shard alone.
    let listener = unsafe { glommio::net::TcpListener::from_raw_fd(listener_fd) };
    let accept_shard = shard.clone();
    let stopping = shutdown.clone();
    glommio::spawn_local(async move {
        loop {
            match listener.accept().await {
                Ok(stream) => {
                    glommio::spawn_local(subscriber::serve(accept_shard.clone(), stream)).detach();
                }
                Err(_) if stopping.load(Ordering::Relaxed) => return,
                Err(e) => {
                    tracing::warn!(shard = index, "stream port accept failed: {e}");
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    })
    .detach();

    while !shutdown.load(Ordering::Relaxed) {
        glommio::timer::sleep(Duration::from_millis(25)).await;
    }
    crate::control::stop_listening(listener_fd);
    shard.borrow_mut().shutdown();
    glommio::timer::sleep(Duration::from_millis(200)).await;
    Ok(())
}
