//! The `redis` adapter on a shard: the groups this shard owns are stored in Redis, and their
//! events reach this node's subscribers through Redis pub/sub, so several ringcast nodes can
//! share one Redis.
//!
//! Writes: each operation becomes one command or Lua script on the shard's command connection
//! (pipelined with the others), answered when Redis replies; nothing is acknowledged that Redis
//! did not take. `stream::update` is a compare-and-set loop: the ops run here (the same code as
//! the other stores, so results and stored text are identical), and the write script stores the
//! result only if the item still holds the text the ops ran on; updates of one item from this
//! node run one after another, each starting from the value the previous one wrote.
//!
//! Events: every storing script increments the group's sequence number and publishes the event
//! on the group's channel in the same atomic step. A shard subscribes to the channel of an owned
//! group when its first subscriber joins and unsubscribes when the last leaves. It keeps a
//! mirror of each subscribed group (the shard's memory store), taken from a snapshot read after
//! the subscription was confirmed and kept current by the events, so joins are answered from the
//! mirror at exactly the point of the event sequence after which their events follow. Each event
//! is built into its frame once per node and published through the owner like a local one.
//!
//! Gaps and faults: an event whose sequence number is not the next one (a message lost, or
//! Redis replaced), a pub/sub connection that ended, or a pub/sub buffer past its bound makes
//! the group take a fresh snapshot and send every subscriber of it a fresh `sync` frame.

use super::client::{Client, PubSubEvent, RedisError};
use super::message::{self, Kind};
use super::resp::Resp;
use super::scripts::{self, Script};
use super::url::RedisUrl;
use crate::event_json;
use crate::group_ops::{check_storable, parse_stored, unreadable, value_text, with_old_value, OpResult};
use crate::messages::{GroupKey, GroupOp, GroupOpReply, JoinRequest};
use crate::owner::OwnerOutput;
use crate::shard::Shard;
use crate::store::ShardStore;
use crate::update::{self, UpdateOp};
use crate::wsframe::text_frame;
use bytes::Bytes;
use futures_channel::oneshot;
use ringcast_storage::{Json, KvStore};
use serde_json::{json, Value};
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::rc::{Rc, Weak};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Bytes of events a group may hold while its snapshot is read; past it they are dropped and
/// the snapshot is read again (it then holds them).
pub const MAX_BUFFER_BYTES: usize = 8 << 20;
/// Close code and reason of a join refused while too many wait for Redis.
const CLOSE_REDIS_UNAVAILABLE: (u16, &str) = (1013, "redis is unavailable: try again later");
/// Pause before a failed snapshot read is tried again.
const SNAPSHOT_RETRY: Duration = Duration::from_millis(250);
/// Compare-and-set attempts of one `stream::update` against writes from other nodes.
const UPDATE_ATTEMPTS: u32 = 32;

/// Where a subscribed group stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// `SUBSCRIBE` sent (or waiting for the pub/sub connection), not yet confirmed.
    Subscribing,
    /// Snapshot read under way (its generation); events are buffered.
    Snapshotting(u64),
    /// The mirror is current at `last`; events apply as they come.
    Live,
    /// The snapshot read failed; retried after a pause or when the command connection is back.
    Retry,
}

struct GroupSync {
    channel: Bytes,
    phase: Phase,
    /// Sequence number the mirror is current at.
    last: u64,
    /// Events received while not live, in order.
    buffer: VecDeque<Bytes>,
    buffered_bytes: usize,
    /// Joins waiting for the group to be live.
    joins: Vec<JoinRequest>,
    /// The group's subscribers hold a `sync` that may be stale: send a fresh one after the
    /// next snapshot.
    resync: bool,
}

/// A reply sender shared by a command's callback and the code that sends it (whichever runs
/// takes it), and the error for the latter when the command could not be sent.
type Unsent = (Rc<RefCell<Option<oneshot::Sender<GroupOpReply>>>>, &'static str, String);

/// An update waiting behind another of the same item.
type QueuedUpdate = (Vec<UpdateOp>, oneshot::Sender<GroupOpReply>);

/// The Redis side of one shard.
pub struct RedisBackend {
    cmd: Rc<Client>,
    pubsub: Rc<Client>,
    groups: HashMap<GroupKey, GroupSync>,
    /// Channel → group, for the groups in `groups`.
    channels: HashMap<Bytes, GroupKey>,
    /// `SUBSCRIBE`s not yet confirmed, per channel (a group goes on only once all are).
    acks: HashMap<Bytes, u32>,
    /// Items with an update in flight, and the updates waiting behind it.
    updates: HashMap<(GroupKey, String), VecDeque<QueuedUpdate>>,
    next_gen: u64,
    max_value_bytes: usize,
    /// Joins in the groups' `joins`, over all groups, and their bound. A join waits there only
    /// while its group is not live; one whose subscriber left meanwhile is not told apart, so
    /// without the bound a client joining and leaving during a Redis outage would grow it.
    waiting_joins: usize,
    max_waiting_joins: usize,
}

impl RedisBackend {
    /// Starts the shard's two connections (commands, pub/sub), reporting to `shard`.
    pub fn start(url: &RedisUrl, addr: SocketAddr, shard: Weak<RefCell<Shard>>, max_value_bytes: usize, max_waiting_joins: usize) -> RedisBackend {
        let cmd = Client::commands(url.clone(), addr, "commands");
        let pubsub = Client::pubsub(url.clone(), addr, "pub/sub");
        if let Some(s) = shard.upgrade() {
            let s = s.borrow();
            cmd.set_metrics(s.ctx.metrics.clone(), s.ctx.index);
            pubsub.set_metrics(s.ctx.metrics.clone(), s.ctx.index);
        }
        let on_event = shard.clone();
        pubsub.set_on_event(Rc::new(move |event| {
            if let Some(shard) = on_event.upgrade() {
                shard.borrow_mut().redis_pubsub(event);
            }
        }));
        cmd.set_on_connect(Rc::new(move || {
            if let Some(shard) = shard.upgrade() {
                shard.borrow_mut().redis_retry_all();
            }
        }));
        cmd.start();
        pubsub.start();
        RedisBackend {
            cmd,
            pubsub,
            groups: HashMap::new(),
            channels: HashMap::new(),
            acks: HashMap::new(),
            updates: HashMap::new(),
            next_gen: 0,
            max_value_bytes,
            waiting_joins: 0,
            max_waiting_joins,
        }
    }

    /// Waits (at most `limit`) until both connections are up, so the shard's first operations
    /// do not fail while it connects at start-up.
    pub async fn wait_connected(shard: &Rc<RefCell<Shard>>, limit: Duration) {
        let started = std::time::Instant::now();
        loop {
            let live = shard.borrow().redis.as_deref().is_none_or(|b| b.cmd.is_live() && b.pubsub.is_live());
            if live || started.elapsed() >= limit {
                return;
            }
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Ends both connections.
    pub fn stop(&self) {
        self.cmd.stop();
        self.pubsub.stop();
    }

    /// Takes the joins waiting for `key` once its group is live, giving back their places.
    fn take_live_joins(&mut self, key: &GroupKey) -> Vec<JoinRequest> {
        let joins = match self.groups.get_mut(key) {
            Some(group) if group.phase == Phase::Live => std::mem::take(&mut group.joins),
            _ => return Vec::new(),
        };
        self.waiting_joins = self.waiting_joins.saturating_sub(joins.len());
        joins
    }

    fn subscribe(&mut self, channel: &Bytes) {
        if self.pubsub.pubsub_command(b"SUBSCRIBE", channel) {
            *self.acks.entry(channel.clone()).or_default() += 1;
        }
    }
}

/// Resolves `url` to the address the shards connect to (at start-up; the engine checked it).
pub fn resolve(url: &RedisUrl) -> Option<SocketAddr> {
    use std::net::ToSocketAddrs;
    (url.host.as_str(), url.port).to_socket_addrs().ok()?.next()
}

fn error(code: &str, message: impl Into<String>) -> OpResult {
    Err((code.to_string(), message.into()))
}

fn answer(reply: oneshot::Sender<GroupOpReply>, result: OpResult, event: Option<Bytes>) {
    let _ = reply.send(GroupOpReply { result, event });
}

/// `{seq, had_old, old}` of the write and delete scripts.
fn write_reply(reply: Resp) -> Result<(i64, Option<Json>), RedisError> {
    let bad = || RedisError::Reply("the write script answered something else".into());
    let parts = reply.into_array().ok_or_else(bad)?;
    let seq = parts.first().and_then(Resp::as_int).ok_or_else(bad)?;
    let had = parts.get(1).and_then(Resp::as_int).ok_or_else(bad)?;
    let old = match had {
        0 => None,
        _ => Some(Json::from(parts.get(2).and_then(Resp::as_str).ok_or_else(bad)?)),
    };
    Ok((seq, old))
}

fn shard_of(weak: &Weak<RefCell<Shard>>) -> Option<Rc<RefCell<Shard>>> {
    weak.upgrade()
}

impl Shard {
    fn backend(&mut self) -> Option<&mut RedisBackend> {
        self.redis.as_deref_mut()
    }

    fn count_redis_error(&self) {
        self.ctx.metrics[self.ctx.index].redis_errors_total.fetch_add(1, Ordering::Relaxed);
    }

    /// Runs a group operation against Redis; `reply` is answered when Redis has answered.
    pub(crate) fn redis_op(&mut self, key: GroupKey, op: GroupOp, reply: oneshot::Sender<GroupOpReply>) {
        let Some(backend) = self.redis.as_deref() else { return };
        let cmd = backend.cmd.clone();
        let max_value = backend.max_value_bytes;
        let (stream, group) = (key.0.as_str(), key.1.as_str());
        let items = scripts::items_key(stream, group);
        let seq = scripts::seq_key(stream, group);
        let groups = scripts::groups_key(stream);
        let channel = scripts::channel(stream, group);
        let ts = crate::runtime::unix_time_ms();
        let ts_text = ts.to_string();
        let sent = match op {
            GroupOp::Set { item, data } => {
                let text = match value_text(&data).and_then(|t| check_storable(&data, &t, max_value, "the value").map(|()| t)) {
                    Ok(text) => text,
                    Err(why) => return answer(reply, error("STREAM_SET_ERROR", format!("Failed to set value: {why}")), None),
                };
                let id = item.clone();
                let args: [&[u8]; 8] = [id.as_bytes(), b"any", b"", text.as_bytes(), &channel, ts_text.as_bytes(), stream.as_bytes(), group.as_bytes()];
                let key2 = key.clone();
                let reply_cell = Rc::new(RefCell::new(Some(reply)));
                let on_fail = reply_cell.clone();
                let written = text.clone();
                let sent = cmd.eval(Script::Write, &[&items, &seq, &groups, scripts::STREAMS_KEY], &args, Box::new(move |r| {
                    let Some(reply) = reply_cell.borrow_mut().take() else { return };
                    match r.and_then(write_reply) {
                        Ok((_, old)) => {
                            let kind = if old.is_some() { "update" } else { "create" };
                            let frame = text_frame(event_json::data_event_at(ts, &key2.0, &key2.1, Some(&item), kind, &written).as_bytes());
                            answer(reply, Ok(Some(with_old_value(old.as_ref(), Some(("new_value", data))))), Some(frame));
                        }
                        Err(e) => answer(reply, error("STREAM_SET_ERROR", format!("Failed to set value: {e}")), None),
                    }
                }));
                sent.map_err(|e| (on_fail, "STREAM_SET_ERROR", format!("Failed to set value: {e}")))
            }
            GroupOp::Get { item } => {
                let reply_cell = Rc::new(RefCell::new(Some(reply)));
                let on_fail = reply_cell.clone();
                let id = item.clone();
                let sent = cmd.send(&[b"HGET", &items, id.as_bytes()], Box::new(move |r| {
                    let Some(reply) = reply_cell.borrow_mut().take() else { return };
                    let result = match r {
                        Ok(Resp::Bulk(None)) => Ok(None),
                        Ok(found) => match found.as_str().map(|t| parse_stored(&Json::from(t))) {
                            Some(Ok(value)) => Ok(Some(value)),
                            Some(Err(why)) => Err(unreadable("STREAM_GET_ERROR", &item, why)),
                            None => error("STREAM_GET_ERROR", format!("item {item:?}: the stored value is not text")),
                        },
                        Err(e) => error("STREAM_GET_ERROR", format!("Failed to get value: {e}")),
                    };
                    answer(reply, result, None);
                }));
                sent.map_err(|e| (on_fail, "STREAM_GET_ERROR", format!("Failed to get value: {e}")))
            }
            GroupOp::List => {
                let reply_cell = Rc::new(RefCell::new(Some(reply)));
                let on_fail = reply_cell.clone();
                let group_name = group.to_string();
                let sent = cmd.send(&[b"HVALS", &items], Box::new(move |r| {
                    let Some(reply) = reply_cell.borrow_mut().take() else { return };
                    let result = match r.map(Resp::into_array) {
                        Ok(Some(values)) => {
                            let parsed: Result<Vec<Value>, String> =
                                values.iter().map(|v| v.as_str().ok_or_else(|| "a stored value is not text".to_string()).and_then(|t| parse_stored(&Json::from(t)))).collect();
                            match parsed {
                                Ok(values) => Ok(Some(Value::Array(values))),
                                Err(why) => error("STREAM_GET_GROUP_ERROR", format!("a value of group {group_name:?}: {why}")),
                            }
                        }
                        Ok(None) => error("STREAM_GET_GROUP_ERROR", "unexpected reply from redis to HVALS"),
                        Err(e) => error("STREAM_GET_GROUP_ERROR", format!("Failed to list group: {e}")),
                    };
                    answer(reply, result, None);
                }));
                sent.map_err(|e| (on_fail, "STREAM_GET_GROUP_ERROR", format!("Failed to list group: {e}")))
            }
            GroupOp::Delete { item } => {
                let id = item.clone();
                let args: [&[u8]; 5] = [id.as_bytes(), &channel, ts_text.as_bytes(), stream.as_bytes(), group.as_bytes()];
                let reply_cell = Rc::new(RefCell::new(Some(reply)));
                let on_fail = reply_cell.clone();
                let key2 = key.clone();
                let sent = cmd.eval(Script::Delete, &[&items, &seq, &groups, scripts::STREAMS_KEY], &args, Box::new(move |r| {
                    let Some(reply) = reply_cell.borrow_mut().take() else { return };
                    match r.and_then(write_reply) {
                        Ok((_, old)) => {
                            let frame = old.as_ref().map(|old| text_frame(event_json::data_event_at(ts, &key2.0, &key2.1, Some(&item), "delete", old).as_bytes()));
                            answer(reply, Ok(Some(with_old_value(old.as_ref(), None))), frame);
                        }
                        Err(e) => answer(reply, error("STREAM_DELETE_ERROR", format!("Failed to delete value: {e}")), None),
                    }
                }));
                sent.map_err(|e| (on_fail, "STREAM_DELETE_ERROR", format!("Failed to delete value: {e}")))
            }
            GroupOp::CustomEvent { item, event_type, data } => {
                let data = match value_text(&data) {
                    Ok(d) => d,
                    Err(why) => return answer(reply, error("STREAM_SEND_ERROR", why), None),
                };
                let frame = text_frame(event_json::custom_event_at(ts, stream, group, item.as_deref(), &event_type, &data).as_bytes());
                let tail = message::custom_tail(ts, item.as_deref(), &event_type, &data);
                self.redis_publish(&cmd, &seq, &channel, &tail, reply, Some(Value::Null), frame, "STREAM_SEND_ERROR")
            }
            GroupOp::Emit { item, kind, data } => {
                let data = match value_text(&data) {
                    Ok(d) => d,
                    Err(why) => return answer(reply, error("STREAM_EMIT_ERROR", why), None),
                };
                let frame = text_frame(event_json::data_event_at(ts, stream, group, item.as_deref(), kind.as_str(), &data).as_bytes());
                let kind = match kind {
                    crate::messages::EventKind::Create => Kind::Create,
                    crate::messages::EventKind::Update => Kind::Update,
                    crate::messages::EventKind::Delete => Kind::Delete,
                };
                let tail = message::change_tail(ts, kind, item.as_deref(), &data);
                return self.redis_publish_emit(&cmd, &seq, &channel, &tail, reply, frame);
            }
            GroupOp::Update { item, ops } => {
                self.redis_update_start(key, item, ops, reply);
                return;
            }
        };
        if let Err((cell, code, message)) = sent {
            self.count_redis_error();
            if let Some(reply) = cell.borrow_mut().take() {
                answer(reply, error(code, message), None);
            }
        }
    }

    /// `stream::send`: publishes through the group's sequence; answers `result` once Redis took it.
    #[allow(clippy::too_many_arguments)]
    fn redis_publish(
        &self,
        cmd: &Client,
        seq: &[u8],
        channel: &[u8],
        tail: &[u8],
        reply: oneshot::Sender<GroupOpReply>,
        result: Option<Value>,
        frame: Bytes,
        code: &'static str,
    ) -> Result<(), Unsent> {
        let reply_cell = Rc::new(RefCell::new(Some(reply)));
        let on_fail = reply_cell.clone();
        let sent = cmd.eval(Script::Publish, &[seq], &[channel, tail], Box::new(move |r| {
            let Some(reply) = reply_cell.borrow_mut().take() else { return };
            match r {
                Ok(_) => answer(reply, Ok(result), Some(frame)),
                Err(e) => answer(reply, error(code, format!("Failed to send the event: {e}")), None),
            }
        }));
        sent.map_err(|e| (on_fail, code, format!("Failed to send the event: {e}")))
    }

    /// The event of a custom storage function: published like `send`, answered with no result.
    fn redis_publish_emit(&mut self, cmd: &Client, seq: &[u8], channel: &[u8], tail: &[u8], reply: oneshot::Sender<GroupOpReply>, frame: Bytes) {
        if let Err((cell, code, message)) = self.redis_publish(cmd, seq, channel, tail, reply, None, frame, "STREAM_EMIT_ERROR") {
            self.count_redis_error();
            if let Some(reply) = cell.borrow_mut().take() {
                answer(reply, error(code, message), None);
            }
        }
    }

    /// `ListGroups` under the redis adapter: shard 0 asks Redis, the others hold nothing.
    pub(crate) fn redis_list_groups(&mut self, stream: String, reply: oneshot::Sender<Result<Vec<String>, String>>) {
        let Some(backend) = self.redis.as_deref() else { return };
        if self.ctx.index != 0 {
            let _ = reply.send(Ok(Vec::new()));
            return;
        }
        let cell = Rc::new(RefCell::new(Some(reply)));
        let on_fail = cell.clone();
        let sent = backend.cmd.send(&[b"SMEMBERS", &scripts::groups_key(&stream)], Box::new(move |r| {
            let Some(reply) = cell.borrow_mut().take() else { return };
            let result = match r.map(Resp::into_array) {
                Ok(Some(names)) => {
                    let mut names: Vec<String> = names.iter().filter_map(|n| n.as_str().map(str::to_owned)).collect();
                    names.sort_unstable();
                    Ok(names)
                }
                Ok(None) => Err("unexpected reply from redis to SMEMBERS".to_string()),
                Err(e) => Err(format!("Failed to list groups: {e}")),
            };
            let _ = reply.send(result);
        }));
        if let Err(e) = sent {
            self.count_redis_error();
            if let Some(reply) = on_fail.borrow_mut().take() {
                let _ = reply.send(Err(format!("Failed to list groups: {e}")));
            }
        }
    }

    /// `ListStreams` under the redis adapter: shard 0 asks Redis, the others hold nothing.
    #[allow(clippy::type_complexity)]
    pub(crate) fn redis_list_streams(&mut self, reply: oneshot::Sender<Result<Vec<(String, Vec<String>)>, String>>) {
        let Some(backend) = self.redis.as_deref() else { return };
        if self.ctx.index != 0 {
            let _ = reply.send(Ok(Vec::new()));
            return;
        }
        let cell = Rc::new(RefCell::new(Some(reply)));
        let on_fail = cell.clone();
        let sent = backend.cmd.eval(Script::ListAll, &[scripts::STREAMS_KEY], &[scripts::GROUPS_PREFIX.as_bytes()], Box::new(move |r| {
            let Some(reply) = cell.borrow_mut().take() else { return };
            let result = match r.map(Resp::into_array) {
                Ok(Some(flat)) => {
                    let mut streams: Vec<(String, Vec<String>)> = flat
                        .chunks(2)
                        .filter_map(|pair| {
                            let name = pair.first()?.as_str()?.to_owned();
                            let groups = pair.get(1)?.clone().into_array()?;
                            let mut groups: Vec<String> = groups.iter().filter_map(|g| g.as_str().map(str::to_owned)).collect();
                            groups.sort_unstable();
                            (!groups.is_empty()).then_some((name, groups))
                        })
                        .collect();
                    streams.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                    Ok(streams)
                }
                Ok(None) => Err("unexpected reply from redis to the list_all script".to_string()),
                Err(e) => Err(format!("Failed to list streams: {e}")),
            };
            let _ = reply.send(result);
        }));
        if let Err(e) = sent {
            self.count_redis_error();
            if let Some(reply) = on_fail.borrow_mut().take() {
                let _ = reply.send(Err(format!("Failed to list streams: {e}")));
            }
        }
    }

    // ----- stream::update: compare-and-set, one update of an item at a time from this node -----

    fn redis_update_start(&mut self, key: GroupKey, item: String, ops: Vec<UpdateOp>, reply: oneshot::Sender<GroupOpReply>) {
        let Some(backend) = self.backend() else { return };
        let slot = (key.clone(), item.clone());
        if let Some(queue) = backend.updates.get_mut(&slot) {
            queue.push_back((ops, reply));
            return;
        }
        backend.updates.insert(slot, VecDeque::new());
        self.redis_update_read(key, item, ops, reply, 0);
    }

    /// Reads the item, then applies the ops to it.
    fn redis_update_read(&mut self, key: GroupKey, item: String, ops: Vec<UpdateOp>, reply: oneshot::Sender<GroupOpReply>, attempt: u32) {
        let Some(backend) = self.redis.as_deref() else { return };
        let items = scripts::items_key(&key.0, &key.1);
        let weak = self.self_ref.clone();
        let state = Rc::new(RefCell::new(Some((key.clone(), item.clone(), ops, reply))));
        let on_fail = state.clone();
        let sent = backend.cmd.send(&[b"HGET", &items, item.as_bytes()], Box::new(move |r| {
            let Some((key, item, ops, reply)) = state.borrow_mut().take() else { return };
            let current = r.and_then(|found| match found {
                Resp::Bulk(None) => Ok(None),
                other => other.as_str().map(|t| Some(Json::from(t))).ok_or_else(|| RedisError::Reply("HGET answered something else".into())),
            });
            if let Some(shard) = shard_of(&weak) {
                shard.borrow_mut().redis_update_apply(key, item, ops, reply, attempt, current);
            }
        }));
        if let Err(e) = sent {
            self.count_redis_error();
            if let Some((key, item, _, reply)) = on_fail.borrow_mut().take() {
                answer(reply, error("STREAM_UPDATE_ERROR", format!("Failed to update value: {e}")), None);
                self.redis_update_fail_all(key, item, &e);
            }
        }
    }

    /// The command could not even be sent (Redis unreachable or overloaded): the updates waiting
    /// behind it would fail the same way, so they are answered now, in a loop (not one nested
    /// call per waiting update).
    fn redis_update_fail_all(&mut self, key: GroupKey, item: String, e: &RedisError) {
        let Some(backend) = self.backend() else { return };
        for (_, reply) in backend.updates.remove(&(key, item)).into_iter().flatten() {
            answer(reply, error("STREAM_UPDATE_ERROR", format!("Failed to update value: {e}")), None);
        }
    }

    /// Runs the ops on `current` and writes the result if the item still holds `current`.
    fn redis_update_apply(
        &mut self,
        key: GroupKey,
        item: String,
        ops: Vec<UpdateOp>,
        reply: oneshot::Sender<GroupOpReply>,
        attempt: u32,
        current: Result<Option<Json>, RedisError>,
    ) {
        let Some(backend) = self.redis.as_deref() else { return };
        let current = match current {
            Ok(c) => c,
            Err(e) => {
                answer(reply, error("STREAM_UPDATE_ERROR", format!("Failed to update value: {e}")), None);
                return self.redis_update_next(key, item, None);
            }
        };
        let max_value = backend.max_value_bytes;
        let applied = current.as_ref().map(parse_stored).transpose().and_then(|old_value| {
            let (new_value, errors) = update::apply(old_value.as_ref(), &ops);
            let text = value_text(&new_value)?;
            check_storable(&new_value, &text, max_value, "the result")?;
            Ok((old_value, new_value, errors, text))
        });
        let (old_value, new_value, errors, text) = match applied {
            Ok(a) => a,
            Err(why) => {
                answer(reply, error("STREAM_UPDATE_ERROR", format!("Failed to update value: item {item:?}: {why}")), None);
                // The next update starts from a task of its own: a queue of updates that each
                // fail here must not become one nested call per update.
                let weak = self.self_ref.clone();
                glommio::spawn_local(async move {
                    if let Some(shard) = weak.upgrade() {
                        shard.borrow_mut().redis_update_next(key, item, Some(current));
                    }
                })
                .detach();
                return;
            }
        };
        let (stream, group) = (key.0.as_str(), key.1.as_str());
        let ts = crate::runtime::unix_time_ms();
        let ts_text = ts.to_string();
        let channel = scripts::channel(stream, group);
        let mode: &[u8] = if current.is_some() { b"1" } else { b"0" };
        let expected = current.clone().unwrap_or_else(|| Json::from(""));
        let args: [&[u8]; 8] = [item.as_bytes(), mode, expected.as_bytes(), text.as_bytes(), &channel, ts_text.as_bytes(), stream.as_bytes(), group.as_bytes()];
        let keys: [&[u8]; 4] = [&scripts::items_key(stream, group), &scripts::seq_key(stream, group), &scripts::groups_key(stream), scripts::STREAMS_KEY];
        let weak = self.self_ref.clone();
        let state = Rc::new(RefCell::new(Some((key.clone(), item.clone(), ops, reply))));
        let on_fail = state.clone();
        let written = text.clone();
        let sent = backend.cmd.eval(Script::Write, &keys, &args, Box::new(move |r| {
            let text = written;
            let Some((key, item, ops, reply)) = state.borrow_mut().take() else { return };
            let Some(shard) = shard_of(&weak) else { return };
            let mut shard = shard.borrow_mut();
            match r.and_then(write_reply) {
                Ok((seq, stored)) if seq < 0 => {
                    // Another node wrote the item since it was read: run the ops again on what it holds now.
                    if attempt + 1 >= UPDATE_ATTEMPTS {
                        let message = format!("Failed to update value: item {item:?} kept changing under {UPDATE_ATTEMPTS} attempts");
                        answer(reply, error("STREAM_UPDATE_ERROR", message), None);
                        return shard.redis_update_next(key, item, None);
                    }
                    shard.redis_update_apply(key, item, ops, reply, attempt + 1, Ok(stored));
                }
                Ok((_, old)) => {
                    let kind = if old.is_some() { "update" } else { "create" };
                    let frame = text_frame(event_json::data_event_at(ts, &key.0, &key.1, Some(&item), kind, &text).as_bytes());
                    let mut result = json!({ "old_value": old_value, "new_value": new_value });
                    if !errors.is_empty() {
                        result["errors"] = serde_json::to_value(&errors).unwrap_or(Value::Null);
                    }
                    answer(reply, Ok(Some(result)), Some(frame));
                    shard.redis_update_next(key, item, Some(Some(text)));
                }
                Err(e) => {
                    answer(reply, error("STREAM_UPDATE_ERROR", format!("Failed to update value: {e}")), None);
                    shard.redis_update_next(key, item, None);
                }
            }
        }));
        if let Err(e) = sent {
            self.count_redis_error();
            if let Some((key, item, _, reply)) = on_fail.borrow_mut().take() {
                answer(reply, error("STREAM_UPDATE_ERROR", format!("Failed to update value: {e}")), None);
                self.redis_update_fail_all(key, item, &e);
            }
        }
    }

    /// The update of an item ended: starts the next one waiting, from `known` (the value the
    /// item is believed to hold; checked by the write) or from a fresh read.
    fn redis_update_next(&mut self, key: GroupKey, item: String, known: Option<Option<Json>>) {
        let Some(backend) = self.backend() else { return };
        let slot = (key, item);
        let next = backend.updates.get_mut(&slot).and_then(VecDeque::pop_front);
        let Some((ops, reply)) = next else {
            backend.updates.remove(&slot);
            return;
        };
        let (key, item) = slot;
        match known {
            Some(current) => self.redis_update_apply(key, item, ops, reply, 0, Ok(current)),
            None => self.redis_update_read(key, item, ops, reply, 0),
        }
    }

    // ----- subscriptions: pub/sub, snapshots, the mirror -----

    /// A join at the owner: answered from the mirror once the group is live.
    pub(crate) fn redis_join(&mut self, join: JoinRequest, out: &mut Vec<OwnerOutput>) {
        let key = join.key.clone();
        let Some(backend) = self.backend() else {
            return out.push(OwnerOutput::Synced { join, snapshot: Err(CLOSE_REDIS_UNAVAILABLE) });
        };
        if backend.groups.get(&key).is_some_and(|group| group.phase == Phase::Live) {
            self.owner.join(join, out);
            return;
        }
        if backend.waiting_joins >= backend.max_waiting_joins {
            tracing::warn!(limit = backend.max_waiting_joins, "redis: a join refused, too many joins wait for their groups' snapshots (is Redis down?)");
            out.push(OwnerOutput::Synced { join, snapshot: Err(CLOSE_REDIS_UNAVAILABLE) });
            return;
        }
        backend.waiting_joins += 1;
        if let Some(group) = backend.groups.get_mut(&key) {
            group.joins.push(join);
            return;
        }
        let channel = Bytes::from(scripts::channel(&key.0, &key.1));
        backend.channels.insert(channel.clone(), key.clone());
        backend.groups.insert(
            key,
            GroupSync { channel: channel.clone(), phase: Phase::Subscribing, last: 0, buffer: VecDeque::new(), buffered_bytes: 0, joins: vec![join], resync: false },
        );
        backend.subscribe(&channel);
    }

    /// After a subscription of `key` ended at the owner: the last one unsubscribes the channel
    /// and drops the mirror of the group.
    pub(crate) fn redis_after_leave(&mut self, key: &GroupKey) {
        if self.owner.has_interest(key) {
            return;
        }
        let Some(backend) = self.backend() else { return };
        let Some(group) = backend.groups.get(key) else { return };
        if !group.joins.is_empty() {
            return;
        }
        let channel = group.channel.clone();
        backend.groups.remove(key);
        backend.channels.remove(&channel);
        backend.pubsub.pubsub_command(b"UNSUBSCRIBE", &channel);
        if let ShardStore::Memory(mirror) = self.owner.store_mut() {
            mirror.remove_group(&key.0, &key.1);
        }
    }

    /// What the pub/sub connection reports.
    pub(crate) fn redis_pubsub(&mut self, event: PubSubEvent) {
        let mut out = Vec::new();
        match event {
            PubSubEvent::Connected => {
                let keys: Vec<GroupKey> = self.redis.as_deref().map(|b| b.groups.keys().cloned().collect()).unwrap_or_default();
                let interested: Vec<bool> = keys.iter().map(|k| self.owner.has_interest(k)).collect();
                let Some(backend) = self.backend() else { return };
                backend.acks.clear();
                let mut channels = Vec::new();
                for (key, interested) in keys.iter().zip(interested) {
                    if let Some(group) = backend.groups.get_mut(key) {
                        group.phase = Phase::Subscribing;
                        group.buffer.clear();
                        group.buffered_bytes = 0;
                        group.resync |= interested;
                        channels.push(group.channel.clone());
                    }
                }
                for channel in channels {
                    backend.subscribe(&channel);
                }
                if !keys.is_empty() {
                    tracing::info!(shard = self.ctx.index, groups = keys.len(), "redis pub/sub connected: resubscribing; subscribers get a fresh sync");
                }
            }
            PubSubEvent::Disconnected => {
                let Some(backend) = self.backend() else { return };
                backend.acks.clear();
                for group in backend.groups.values_mut() {
                    group.phase = Phase::Subscribing;
                    group.buffer.clear();
                    group.buffered_bytes = 0;
                }
            }
            PubSubEvent::Subscribed(channel) => {
                let Some(backend) = self.backend() else { return };
                let left = match backend.acks.get_mut(&channel) {
                    Some(n) => {
                        *n = n.saturating_sub(1);
                        *n
                    }
                    None => 0,
                };
                if left == 0 {
                    backend.acks.remove(&channel);
                    if let Some(key) = backend.channels.get(&channel).cloned() {
                        if backend.groups.get(&key).is_some_and(|g| g.phase == Phase::Subscribing) {
                            self.redis_snapshot_start(key);
                        }
                    }
                }
            }
            PubSubEvent::Message { channel, payload } => {
                let Some(backend) = self.backend() else { return };
                let Some(key) = backend.channels.get(&channel).cloned() else { return };
                self.ctx.metrics[self.ctx.index].redis_events_received_total.fetch_add(1, Ordering::Relaxed);
                self.redis_event(&key, payload, &mut out);
            }
        }
        self.send(out);
    }

    /// One event of a subscribed group.
    fn redis_event(&mut self, key: &GroupKey, payload: Bytes, out: &mut Vec<OwnerOutput>) {
        let Some(group) = self.redis.as_deref_mut().and_then(|b| b.groups.get_mut(key)) else { return };
        match group.phase {
            Phase::Live => {}
            Phase::Subscribing | Phase::Snapshotting(_) => {
                if group.buffered_bytes + payload.len() > MAX_BUFFER_BYTES {
                    // The snapshot read after this moment holds everything dropped here.
                    group.buffer.clear();
                    group.buffered_bytes = 0;
                    tracing::warn!(stream = %key.0, group = %key.1, "redis: events arrived faster than the snapshot was read; reading it again");
                    if matches!(group.phase, Phase::Snapshotting(_)) {
                        self.redis_snapshot_start(key.clone());
                    }
                    return;
                }
                group.buffered_bytes += payload.len();
                group.buffer.push_back(payload);
                return;
            }
            // The next snapshot holds it.
            Phase::Retry => return,
        }
        let event = match message::parse(&payload) {
            Ok(event) => event,
            Err(e) => {
                tracing::warn!(stream = %key.0, group = %key.1, "redis: {e}; taking a fresh snapshot");
                group.resync = true;
                return self.redis_snapshot_start(key.clone());
            }
        };
        if event.seq <= group.last {
            return;
        }
        if event.seq != group.last + 1 {
            tracing::warn!(stream = %key.0, group = %key.1, expected = group.last + 1, got = event.seq, "redis: gap in the group's events; subscribers get a fresh sync");
            // The snapshot read from now on holds this event's effect (it was published before
            // the read), so the event itself is not kept.
            group.resync = true;
            return self.redis_snapshot_start(key.clone());
        }
        group.last = event.seq;
        let (stream, name) = (key.0.as_str(), key.1.as_str());
        let mirror = self.owner.store_mut();
        let text = match (event.kind, event.item) {
            (Kind::Custom, item) => event_json::custom_event_at(event.timestamp, stream, name, item, event.event_type.unwrap_or_default(), event.data),
            (kind, item) => {
                match (kind, item) {
                    (Kind::Delete, Some(id)) => {
                        let _ = mirror.delete(stream, name, id);
                    }
                    (_, Some(id)) => {
                        let _ = mirror.set(stream, name, id, Json::from(event.data));
                    }
                    _ => {}
                }
                event_json::data_event_at(event.timestamp, stream, name, item, kind.event_type(), event.data)
            }
        };
        let item = event.item.map(str::to_owned);
        self.owner.publish_event(key, item, text.as_bytes(), out);
    }

    /// Reads the group's snapshot (after its subscription is confirmed).
    fn redis_snapshot_start(&mut self, key: GroupKey) {
        let weak = self.self_ref.clone();
        let Some(backend) = self.backend() else { return };
        backend.next_gen += 1;
        let gen = backend.next_gen;
        let Some(group) = backend.groups.get_mut(&key) else { return };
        group.phase = Phase::Snapshotting(gen);
        let keys: [&[u8]; 2] = [&scripts::items_key(&key.0, &key.1), &scripts::seq_key(&key.0, &key.1)];
        let key2 = key.clone();
        let sent = backend.cmd.eval(Script::Snapshot, &keys, &[], Box::new(move |r| {
            if let Some(shard) = shard_of(&weak) {
                shard.borrow_mut().redis_snapshot_done(key2, gen, r);
            }
        }));
        if sent.is_err() {
            self.redis_snapshot_failed(key);
        }
    }

    fn redis_snapshot_failed(&mut self, key: GroupKey) {
        self.count_redis_error();
        let Some(group) = self.backend().and_then(|b| b.groups.get_mut(&key)) else { return };
        group.phase = Phase::Retry;
        group.buffer.clear();
        group.buffered_bytes = 0;
        let weak = self.self_ref.clone();
        glommio::spawn_local(async move {
            glommio::timer::sleep(SNAPSHOT_RETRY).await;
            if let Some(shard) = weak.upgrade() {
                shard.borrow_mut().redis_retry(key);
            }
        })
        .detach();
    }

    fn redis_retry(&mut self, key: GroupKey) {
        if self.backend().and_then(|b| b.groups.get(&key)).is_some_and(|g| g.phase == Phase::Retry) {
            self.redis_snapshot_start(key);
        }
    }

    /// The command connection is back: groups whose snapshot failed try again now.
    pub(crate) fn redis_retry_all(&mut self) {
        let keys: Vec<GroupKey> =
            self.redis.as_deref().map(|b| b.groups.iter().filter(|(_, g)| g.phase == Phase::Retry).map(|(k, _)| k.clone()).collect()).unwrap_or_default();
        for key in keys {
            self.redis_snapshot_start(key);
        }
    }

    fn redis_snapshot_done(&mut self, key: GroupKey, gen: u64, result: Result<Resp, RedisError>) {
        if !self.backend().and_then(|b| b.groups.get(&key)).is_some_and(|g| g.phase == Phase::Snapshotting(gen)) {
            return;
        }
        let parsed = result.ok().and_then(|r| {
            let mut parts = r.into_array()?.into_iter();
            let seq: u64 = parts.next()?.as_str()?.parse().ok()?;
            let flat = parts.next()?.into_array()?;
            let items: Option<Vec<(String, Json)>> =
                flat.chunks(2).map(|pair| Some((pair.first()?.as_str()?.to_owned(), Json::from(pair.get(1)?.as_str()?)))).collect();
            Some((seq, items?))
        });
        let Some((seq, items)) = parsed else {
            tracing::warn!(stream = %key.0, group = %key.1, "redis: cannot read the group's snapshot; retrying");
            return self.redis_snapshot_failed(key);
        };
        let mut out = Vec::new();
        let (stream, name) = (key.0.clone(), key.1.clone());
        let ShardStore::Memory(mirror) = self.owner.store_mut() else { return };
        let before = mirror.items(&stream, &name);
        mirror.remove_group(&stream, &name);
        for (id, value) in &items {
            let _ = mirror.set(&stream, &name, id, value.clone());
        }
        let Some(group) = self.redis.as_deref_mut().and_then(|b| b.groups.get_mut(&key)) else { return };
        group.last = seq;
        group.phase = Phase::Live;
        let resync = std::mem::take(&mut group.resync);
        let buffered = std::mem::take(&mut group.buffer);
        group.buffered_bytes = 0;
        if resync {
            self.redis_fresh_sync(&key, before, &items, &mut out);
        }
        for payload in buffered {
            let live = self.redis.as_deref().and_then(|b| b.groups.get(&key)).is_some_and(|g| g.phase == Phase::Live);
            if live {
                self.redis_event(&key, payload, &mut out);
            } else if let Some(group) = self.redis.as_deref_mut().and_then(|b| b.groups.get_mut(&key)) {
                group.buffered_bytes += payload.len();
                group.buffer.push_back(payload);
            }
        }
        let joins = self.redis.as_deref_mut().map(|backend| backend.take_live_joins(&key)).unwrap_or_default();
        for join in joins {
            self.owner.join(join, &mut out);
        }
        self.send(out);
    }

    /// Sends the group's subscribers a fresh `sync`: the group's snapshot to group subscribers,
    /// and to the subscribers of each item whose value changed, that item's.
    fn redis_fresh_sync(&mut self, key: &GroupKey, before: Vec<(String, Json)>, now: &[(String, Json)], out: &mut Vec<OwnerOutput>) {
        let shards = self.owner.interested_shards(key);
        if shards.is_empty() {
            return;
        }
        self.ctx.metrics[self.ctx.index].redis_resyncs_total.fetch_add(1, Ordering::Relaxed);
        let (stream, group) = (key.0.as_str(), key.1.as_str());
        let values: Vec<Json> = now.iter().map(|(_, v)| v.clone()).collect();
        let group_frame = text_frame(event_json::group_sync(stream, group, &values).as_bytes());
        let old: HashMap<&str, &Json> = before.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let new: HashMap<&str, &Json> = now.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut item_frames = Vec::new();
        for id in old.keys().chain(new.keys().filter(|k| !old.contains_key(*k))) {
            if old.get(id) != new.get(id) {
                let data = new.get(id).map_or("null", |v| v.as_ref());
                item_frames.push((id.to_string(), text_frame(event_json::data_event(stream, group, Some(id), "sync", data).as_bytes())));
            }
        }
        for shard in shards {
            out.push(OwnerOutput::DeliverExact { shard, key: key.clone(), item: None, frame: group_frame.clone() });
            for (id, frame) in &item_frames {
                out.push(OwnerOutput::DeliverExact { shard, key: key.clone(), item: Some(id.clone()), frame: frame.clone() });
            }
        }
    }
}
