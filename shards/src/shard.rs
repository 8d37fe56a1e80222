//! One shard core: the owner side of the groups that hash to it (`owner`), the subscriber
//! connections accepted on its listener (`subscribers`, `delivery`), and its inbox. This file
//! ties them together: it applies inbox messages, sends what the owner side produces to the
//! shards it is for, and gives subscriber connections their methods (join, leave, close).

use crate::commit::{self, CommitHost, GroupCommit, Pending, Syncer};
use crate::config::{CommitMode, ShardConfig};
use crate::delivery::{self, Delivery, Slow, CLOSE_SLOW};
use crate::messages::*;
use crate::metrics::{AllShardMetrics, ShardMetrics};
use crate::outbound::{OutQueue, Push};
use crate::owner::{Owner, OwnerOutput};
use crate::store::ShardStore;
use crate::subscribers::{EndedSubscription, Subscription, SubscriberTable};
use crate::wsframe::close_frame;
use bytes::Bytes;
use serde_json::Value;
use std::cell::RefCell;
use std::os::fd::RawFd;
use std::rc::{Rc, Weak};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How long a closing connection may take to flush its close frame before its socket is shut.
const CLOSE_FLUSH_LIMIT: Duration = Duration::from_secs(2);

/// Everything a shard needs to know about its peers.
pub struct ShardContext {
    pub index: usize,
    /// Inboxes of all shards, this one included, by index.
    pub peers: Vec<ShardSender>,
    pub control: ControlSender,
    pub config: ShardConfig,
    /// Counters of every shard; this one's are at `index`.
    pub metrics: AllShardMetrics,
}

impl ShardContext {
    fn counters(&self) -> &ShardMetrics {
        &self.metrics[self.index]
    }
}

/// The state of one shard core.
pub struct Shard {
    pub(crate) ctx: ShardContext,
    pub(crate) owner: Owner<ShardStore>,
    /// Group commit: fdatasync off the shard thread (`None`: writes are acknowledged at once).
    syncer: Option<Rc<Syncer>>,
    /// Longest a commit gathers writes before it syncs.
    gather: Duration,
    subscribers: SubscriberTable,
    delivery: Delivery,
    pub(crate) self_ref: Weak<RefCell<Shard>>,
    /// The `redis` adapter's connections and subscribed groups (`None` for the other stores).
    pub(crate) redis: Option<Box<crate::redis::backend::RedisBackend>>,
}

impl Shard {
    pub fn new(ctx: ShardContext, store: ShardStore) -> Rc<RefCell<Shard>> {
        let gather = match ctx.config.store.commit {
            CommitMode::Group { gather } => gather,
            CommitMode::Immediate => Duration::ZERO,
        };
        // `always` uses the sync thread too, without gathering: the shard keeps serving other
        // groups while the disk works, instead of blocking in fdatasync for every write.
        let syncer = if ctx.config.store.needs_commit() { store.flush_handle().map(|h| Rc::new(Syncer::start(h, ctx.index))) } else { None };
        let owner = Owner::new(ctx.index, store, syncer.is_some(), ctx.config.max_value_bytes, ctx.metrics.clone());
        let shard = Rc::new(RefCell::new(Shard {
            ctx,
            owner,
            syncer,
            gather,
            subscribers: SubscriberTable::new(),
            delivery: Delivery::default(),
            self_ref: Weak::new(),
            redis: None,
        }));
        shard.borrow_mut().self_ref = Rc::downgrade(&shard);
        let redis = match &shard.borrow().ctx.config.store.location {
            crate::config::StoreLocation::Redis { url, max_waiting_joins } => Some((url.clone(), *max_waiting_joins)),
            _ => None,
        };
        if let Some((url, max_waiting_joins)) = redis {
            match crate::redis::backend::resolve(&url) {
                Some(addr) => {
                    let max_value = shard.borrow().ctx.config.max_value_bytes;
                    let backend = crate::redis::backend::RedisBackend::start(&url, addr, Rc::downgrade(&shard), max_value, max_waiting_joins);
                    shard.borrow_mut().redis = Some(Box::new(backend));
                }
                None => tracing::error!("redis: cannot resolve {}; every stream operation will fail", url.address()),
            }
        }
        shard
    }

    pub fn index(&self) -> usize {
        self.ctx.index
    }

    pub fn config(&self) -> &ShardConfig {
        &self.ctx.config
    }

    /// The control core's inbox (for auth and join/leave trigger requests).
    pub fn control(&self) -> ControlSender {
        self.ctx.control.clone()
    }

    /// One slice of the store's background compaction.
    pub fn compact_step(&mut self) {
        self.owner.store_mut().compact_step();
    }

    fn owner_of(&self, key: &GroupKey) -> usize {
        crate::routing::owner_shard(&key.0, &key.1, self.ctx.peers.len())
    }

    /// Applies one inbox message.
    pub fn handle(&mut self, msg: ShardMsg) {
        let mut out = Vec::new();
        match msg {
            ShardMsg::GroupOp { key, op, reply } if self.redis.is_some() => self.redis_op(key, op, reply),
            ShardMsg::GroupOp { key, op, reply } => {
                if self.owner.run(key, op, reply, &mut out) {
                    self.start_commit();
                }
            }
            ShardMsg::ListGroups { stream, reply } if self.redis.is_some() => self.redis_list_groups(stream, reply),
            ShardMsg::ListGroups { stream, reply } => {
                let _ = reply.send(Ok(ringcast_storage::KvStore::list_groups(self.owner.store(), &stream)));
            }
            ShardMsg::ListStreams { reply } if self.redis.is_some() => self.redis_list_streams(reply),
            ShardMsg::ListStreams { reply } => {
                let _ = reply.send(Ok(ringcast_storage::KvStore::list_streams(self.owner.store())));
            }
            ShardMsg::Join(join) => self.owner_join(join, &mut out),
            ShardMsg::Leave { from_shard, key } => self.owner_leave(from_shard, &key),
            ShardMsg::DeliverExact { key, item, frame } => {
                self.deliver_exact_here(&key, item.as_deref(), &frame);
                self.ctx.counters().queued_bytes.fetch_sub(frame.len(), Ordering::Relaxed);
            }
            ShardMsg::Synced { conn, join_id, key, snapshot } => self.activate(conn, join_id, key, snapshot),
            ShardMsg::Deliver { key, item, frame } => {
                self.deliver_here(&key, item.as_deref(), &frame);
                self.ctx.counters().queued_bytes.fetch_sub(frame.len(), Ordering::Relaxed);
            }
        }
        self.send(out);
    }

    /// Sends what the owner side produced: frames and snapshots for other shards to their
    /// inboxes, those for this shard's subscribers straight to them.
    pub(crate) fn send(&mut self, out: Vec<OwnerOutput>) {
        for output in out {
            match output {
                OwnerOutput::DeliverExact { shard, key, item, frame } if shard == self.ctx.index => {
                    self.deliver_exact_here(&key, item.as_deref(), &frame);
                }
                OwnerOutput::DeliverExact { shard, key, item, frame } => {
                    self.ctx.metrics[shard].queued_bytes.fetch_add(frame.len(), Ordering::Relaxed);
                    let _ = self.ctx.peers[shard].unbounded_send(ShardMsg::DeliverExact { key, item, frame });
                }
                OwnerOutput::Deliver { shard, key, item, frame } if shard == self.ctx.index => {
                    self.deliver_here(&key, item.as_deref(), &frame);
                }
                OwnerOutput::Deliver { shard, key, item, frame } => {
                    self.ctx.metrics[shard].queued_bytes.fetch_add(frame.len(), Ordering::Relaxed);
                    let _ = self.ctx.peers[shard].unbounded_send(ShardMsg::Deliver { key, item, frame });
                }
                // Activate now: the next local publish must already include this subscription.
                OwnerOutput::Synced { join, snapshot } if join.from_shard == self.ctx.index => {
                    self.activate(join.conn, join.join_id, join.key, snapshot);
                }
                OwnerOutput::Synced { join, snapshot } => {
                    let JoinRequest { from_shard, conn, join_id, key, .. } = join;
                    let _ = self.ctx.peers[from_shard].unbounded_send(ShardMsg::Synced { conn, join_id, key, snapshot });
                }
                OwnerOutput::Reply { reply, answer } => {
                    let _ = reply.send(answer);
                }
            }
        }
    }

    fn start_commit(&mut self) {
        if let Some(syncer) = &self.syncer {
            commit::spawn_commit(self.self_ref.clone(), syncer.clone(), self.gather);
        }
    }

    /// Resolves once no join is waiting for a commit, so writes cannot starve a join.
    pub async fn joins_served(shard: &Rc<RefCell<Shard>>) {
        std::future::poll_fn(|cx| shard.borrow_mut().owner.group_commit().poll_joins_served(cx)).await
    }

    /// Queues `frame` for this shard's subscriptions of `key`; closes those it overflows.
    fn deliver_here(&mut self, key: &GroupKey, item: Option<&str>, frame: &Bytes) {
        let slow = self.delivery.deliver(&self.subscribers, key, item, frame, self.ctx.counters());
        for conn in slow {
            self.close_slow(conn, Slow::Overflow);
        }
    }

    /// Queues `frame` for this shard's subscriptions of exactly `item` of `key`.
    fn deliver_exact_here(&mut self, key: &GroupKey, item: Option<&str>, frame: &Bytes) {
        let slow = self.delivery.deliver_exact(&self.subscribers, key, item, frame, self.ctx.counters());
        for conn in slow {
            self.close_slow(conn, Slow::Overflow);
        }
    }

    /// A join at this shard as the group's owner (under `redis`, once the group is live).
    fn owner_join(&mut self, join: JoinRequest, out: &mut Vec<OwnerOutput>) {
        if self.redis.is_some() {
            self.redis_join(join, out);
        } else {
            self.owner.join(join, out);
        }
    }

    /// A subscription ended at this shard as the group's owner.
    fn owner_leave(&mut self, from_shard: usize, key: &GroupKey) {
        self.owner.leave(from_shard, key);
        if self.redis.is_some() {
            self.redis_after_leave(key);
        }
    }

    /// For the flusher: the connections with frames to write, once there are any.
    pub fn poll_unflushed(&mut self, cx: &mut std::task::Context<'_>, batch: &mut Vec<SubscriberConnId>) -> std::task::Poll<()> {
        self.delivery.poll_unflushed(cx, batch)
    }

    /// Writes what was queued for the connections in `batch`.
    pub fn flush(&self, batch: &mut Vec<SubscriberConnId>, scratch: &mut Vec<u8>) {
        delivery::flush(&self.subscribers, batch, scratch);
    }

    /// The slow-subscriber policy: close with 4008, stop delivering to it at once.
    fn close_slow(&mut self, conn: SubscriberConnId, why: Slow) {
        let Some(c) = self.subscribers.get(conn) else { return };
        if c.queue.is_closing() {
            return;
        }
        self.ctx.counters().slow_subscriber_closes_total.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(shard = self.ctx.index, conn, queued_bytes = c.queue.queued_bytes(), "closing slow subscriber (4008): {}", why.reason());
        self.close_conn(conn, CLOSE_SLOW.0, CLOSE_SLOW.1);
    }

    /// Closes every connection that has held bytes to write without progress for `limit`.
    pub fn close_stalled(&mut self, limit: Duration) {
        for conn in delivery::stalled(&self.subscribers, Instant::now(), limit) {
            self.close_slow(conn, Slow::Stalled);
        }
    }

    /// Whether the shard serves as many connections as it may (`max_connections_per_shard`).
    pub fn is_full(&self) -> bool {
        self.subscribers.len() >= self.ctx.config.max_connections
    }

    /// A new outbound queue for a connection, bounded by `max_queue_bytes` and counted in this
    /// shard's queued bytes.
    pub fn new_queue(&self) -> OutQueue {
        OutQueue::new(self.ctx.config.max_queue_bytes, self.ctx.counters().queued_bytes.clone())
    }

    /// Sends a close frame (dropping queued frames), ends its subscriptions, and shuts the socket
    /// if the close frame cannot be flushed in time.
    pub fn close_conn(&mut self, conn: SubscriberConnId, code: u16, reason: &str) {
        let Some(c) = self.subscribers.get(conn) else { return };
        c.queue.close(close_frame(code, reason));
        self.drop_subscriptions(conn);
        let shard = self.self_ref.clone();
        glommio::spawn_local(async move {
            glommio::timer::sleep(CLOSE_FLUSH_LIMIT).await;
            // Only while the connection is still registered is its fd still its own: after it
            // ends the number may belong to a newer connection.
            let Some(shard) = shard.upgrade() else { return };
            let shard = shard.borrow();
            if let Some(c) = shard.subscribers.get(conn) {
                // SAFETY: shutdown(2) on the socket of a live connection; it only makes its
                // pending reads and writes fail, so its task ends.
                unsafe { libc::shutdown(c.fd, libc::SHUT_RDWR) };
            }
        })
        .detach();
    }

    /// Registers a new connection.
    pub fn add_conn(&mut self, queue: OutQueue, fd: RawFd, context: Value) -> SubscriberConnId {
        let id = self.subscribers.add(queue, fd, context);
        self.ctx.counters().subscribers.store(self.subscribers.len() as u64, Ordering::Relaxed);
        id
    }

    /// Removes a connection, ending its subscriptions; returns its auth context and every
    /// subscription it held at its end (for the `stream:leave` triggers).
    pub fn remove_conn(&mut self, conn: SubscriberConnId) -> (Value, Vec<EndedSubscription>) {
        self.drop_subscriptions(conn);
        let removed = self.subscribers.remove(conn);
        self.ctx.counters().subscribers.store(self.subscribers.len() as u64, Ordering::Relaxed);
        removed.unwrap_or((Value::Null, Vec::new()))
    }

    /// The auth context of `conn` (`None` once it is gone).
    pub fn context_of(&self, conn: SubscriberConnId) -> Option<Value> {
        self.subscribers.get(conn).map(|c| c.context.clone())
    }

    /// How many subscriptions `conn` holds, and whether one of them is `subscription`.
    pub fn subscriptions_of(&self, conn: SubscriberConnId, subscription: &str) -> (usize, bool) {
        self.subscribers.subscriptions(conn, subscription)
    }

    /// Queues one frame for `conn` (an answer of its own, not an event).
    pub fn push_frame(&self, conn: SubscriberConnId, frame: Bytes) {
        if let Some(c) = self.subscribers.get(conn) {
            let _ = c.queue.push(frame);
        }
    }

    /// Ends every subscription of `conn`, remembering them for the leave triggers.
    fn drop_subscriptions(&mut self, conn: SubscriberConnId) {
        for sub in self.subscribers.unsubscribe_all(conn) {
            self.end_subscription(conn, sub);
        }
    }

    /// Starts a subscription of `conn`: the owner snapshots the group and registers interest at
    /// the same point of its event sequence. Replaces a subscription with the same id.
    pub fn join(&mut self, conn: SubscriberConnId, subscription: String, key: GroupKey, item: Option<String>) {
        let Some((join_id, previous)) = self.subscribers.subscribe(conn, subscription, key.clone(), item.clone()) else { return };
        if let Some(previous) = previous {
            self.end_subscription(conn, previous);
        }
        let join = JoinRequest { from_shard: self.ctx.index, conn, join_id, key, item };
        let owner = self.owner_of(&join.key);
        if owner == self.ctx.index {
            let mut out = Vec::new();
            self.owner_join(join, &mut out);
            self.send(out);
        } else {
            let _ = self.ctx.peers[owner].unbounded_send(ShardMsg::Join(join));
        }
    }

    /// Ends one subscription of `conn` by id; returns it if it existed.
    pub fn leave(&mut self, conn: SubscriberConnId, subscription: &str) -> Option<(GroupKey, Option<String>)> {
        let sub = self.subscribers.unsubscribe(conn, subscription)?;
        let ended = (sub.key.clone(), sub.item.clone());
        self.end_subscription(conn, sub);
        Some(ended)
    }

    /// Stops delivery of an ended subscription; an active one releases its interest at the owner
    /// now, a pending one when its `Synced` arrives (see `activate`).
    fn end_subscription(&mut self, conn: SubscriberConnId, sub: Subscription) {
        if !sub.active {
            return;
        }
        self.ctx.counters().subscriptions.fetch_sub(1, Ordering::Relaxed);
        self.subscribers.deactivate(conn, &sub);
        self.release_interest(sub.key);
    }

    fn release_interest(&mut self, key: GroupKey) {
        let owner = self.owner_of(&key);
        if owner == self.ctx.index {
            self.owner_leave(owner, &key);
        } else {
            let _ = self.ctx.peers[owner].unbounded_send(ShardMsg::Leave { from_shard: self.ctx.index, key });
        }
    }

    /// The owner's snapshot arrived: queue the `sync` frame and start delivering. A subscription
    /// that ended (or was replaced) meanwhile gives its interest back instead.
    fn activate(&mut self, conn: SubscriberConnId, join_id: u64, key: GroupKey, snapshot: Snapshot) {
        let frame = match snapshot {
            Ok(frame) => frame,
            // No interest was registered for a refused snapshot: nothing to give back.
            Err((code, reason)) => return self.close_conn(conn, code, reason),
        };
        if !self.subscribers.activate(conn, join_id, key.clone()) {
            self.release_interest(key);
            return;
        }
        self.ctx.counters().subscriptions.fetch_add(1, Ordering::Relaxed);
        // The snapshot counts against the same bound as events (one always fits an empty queue).
        if self.subscribers.get(conn).is_some_and(|c| c.queue.push(frame) == Push::Overflow) {
            self.close_slow(conn, Slow::Overflow);
        }
    }

    /// Closes every connection with "going away".
    pub fn shutdown(&mut self) {
        if let Some(redis) = &self.redis {
            redis.stop();
        }
        let conns: Vec<SubscriberConnId> = self.subscribers.iter().map(|(id, _)| id).collect();
        for conn in conns {
            self.close_conn(conn, 1001, "engine shutting down");
        }
    }
}

impl CommitHost for Shard {
    fn group_commit(&mut self) -> &mut GroupCommit {
        self.owner.group_commit()
    }

    fn release(&mut self, settled: Vec<Pending>) {
        let mut out = Vec::new();
        for pending in settled {
            self.owner.release(pending, &mut out);
        }
        self.send(out);
    }

    fn serve_deferred_joins(&mut self) {
        let mut out = Vec::new();
        self.owner.serve_deferred_joins(&mut out);
        self.send(out);
    }
}
