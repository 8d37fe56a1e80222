//! Messages between cores. Every core has one inbox; messages cross cores through lock-free
//! channels, never through shared state: the control core sends group operations to a group's
//! owner shard, shards send joins, snapshots and event frames to each other, and shards ask the
//! control core to run functions (auth, join/leave triggers).

use crate::update::UpdateOp;
use bytes::Bytes;
use futures_channel::{mpsc, oneshot};
use serde_json::Value;

/// `(stream_name, group_id)`: the unit of ownership, ordering and subscription.
pub type GroupKey = (String, String);

/// Identifies a subscriber connection on its shard.
pub type SubscriberConnId = u64;

/// An operation on one group, run by the shard that owns it.
#[derive(Debug)]
pub enum GroupOp {
    Set { item: String, data: Value },
    Get { item: String },
    Delete { item: String },
    List,
    Update { item: String, ops: Vec<UpdateOp> },
    /// `stream::send`: a custom event for subscribers, nothing stored.
    CustomEvent { item: Option<String>, event_type: String, data: Value },
    /// A change event whose storage was done elsewhere (a custom `stream::<op>(<name>)` function).
    Emit { item: Option<String>, kind: EventKind, data: Value },
}

impl GroupOp {
    /// Whether the operation only reads the group.
    pub fn is_read(&self) -> bool {
        matches!(self, GroupOp::Get { .. } | GroupOp::List)
    }
}

/// What a mutation did, as subscribers and triggers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Create,
    Update,
    Delete,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Create => "create",
            EventKind::Update => "update",
            EventKind::Delete => "delete",
        }
    }
}

/// The owner shard's answer to a `GroupOp`.
#[derive(Debug)]
pub struct GroupOpReply {
    /// The function's result (`None` = no result), or an error `(code, message)`.
    pub result: Result<Option<Value>, (String, String)>,
    /// The event's subscriber frame, when the operation produced one (for `stream` triggers).
    pub event: Option<Bytes>,
}

/// A message to a shard's inbox.
pub enum ShardMsg {
    /// From the control core: run `op` on group `key`.
    GroupOp { key: GroupKey, op: GroupOp, reply: oneshot::Sender<GroupOpReply> },
    /// From the control core: groups of `stream` held by this shard.
    /// (An error: the store could not answer, e.g. Redis is unreachable.)
    ListGroups { stream: String, reply: oneshot::Sender<Result<Vec<String>, String>> },
    /// From the control core: every stream and its groups held by this shard.
    #[allow(clippy::type_complexity)]
    ListStreams { reply: oneshot::Sender<Result<Vec<(String, Vec<String>)>, String>> },
    /// From a shard with a new subscriber: register interest and send back a snapshot.
    Join(JoinRequest),
    /// From a shard: one subscription of `key` there has ended.
    Leave { from_shard: usize, key: GroupKey },
    /// From the owner: the `sync` frame of a subscription, taken at the point in the group's
    /// event sequence after which `Deliver`s for it follow.
    Synced { conn: SubscriberConnId, join_id: u64, key: GroupKey, snapshot: Snapshot },
    /// From the owner: one event frame of `key`, for this shard's subscribers.
    Deliver { key: GroupKey, item: Option<String>, frame: Bytes },
    /// From the owner: a frame only for this shard's subscriptions of `key` whose item is
    /// exactly `item` (a fresh `sync` of the `redis` adapter).
    DeliverExact { key: GroupKey, item: Option<String>, frame: Bytes },
}

/// A subscription asking the owner of `key` for its snapshot (and so for its events).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinRequest {
    /// The shard serving the subscriber.
    pub from_shard: usize,
    pub conn: SubscriberConnId,
    /// Tells this subscription from an earlier one with the same id on the same connection.
    pub join_id: u64,
    pub key: GroupKey,
    /// `Some`: one item of the group; `None`: the whole group.
    pub item: Option<String>,
}

/// A join's `sync` frame, or the close code and reason the subscriber gets instead.
pub type Snapshot = Result<Bytes, (u16, &'static str)>;

/// Close code and reason for a join on a shard whose store has failed (fail-stop).
pub const CLOSE_STORE_FAILED: (u16, &str) = (1011, "the store failed: restart the engine");

/// A request from a shard to the control core (which runs functions on workers). Every request
/// is answered, and each function call it makes is given up after `limit` (or, for `Auth`, as
/// soon as the shard stops waiting), freeing its pending invocation: the shard bounds how many
/// requests it has outstanding, so the control core holds a bounded number too.
pub enum ControlRequest {
    /// Call the auth function with the upgrade request; answer its `context`.
    Auth { function_id: String, input: Value, limit: std::time::Duration, reply: oneshot::Sender<Result<Value, String>> },
    /// Run the `stream:join` triggers (each within `limit`); answer whether the join is authorized.
    Join { payload: Value, limit: std::time::Duration, reply: oneshot::Sender<bool> },
    /// Run the `stream:leave` triggers (each within `limit`); answered when they are done.
    Leave { payload: Value, limit: std::time::Duration, reply: oneshot::Sender<()> },
}

pub type ShardSender = mpsc::UnboundedSender<ShardMsg>;
pub type ControlSender = mpsc::UnboundedSender<ControlRequest>;
