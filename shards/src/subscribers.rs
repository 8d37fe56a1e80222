//! The subscriber side's bookkeeping: the shard's subscriber connections (queue, socket, auth
//! context) and their subscriptions, by connection and — for the active ones — by group.
//! Plain data: messaging the owner and closing sockets is the shard's job.

use crate::messages::{GroupKey, SubscriberConnId};
use crate::outbound::OutQueue;
use serde_json::Value;
use std::collections::HashMap;
use std::os::fd::RawFd;

/// A subscription of a connection, as the connection knows it.
pub struct Subscription {
    pub key: GroupKey,
    pub item: Option<String>,
    pub join_id: u64,
    /// Registered for delivery (its `sync` frame has been queued).
    pub active: bool,
}

/// A subscription that ended: `(subscription id, group, item)`, for the `stream:leave` triggers.
pub type EndedSubscription = (String, GroupKey, Option<String>);

/// A subscriber connection served by this shard.
pub struct SubscriberConn {
    pub queue: OutQueue,
    pub fd: RawFd,
    /// What the auth function answered, stamped on join/leave trigger payloads.
    pub context: Value,
    /// Subscriptions by subscription id.
    subs: HashMap<String, Subscription>,
    /// Subscriptions ended by a close, kept for the `stream:leave` triggers at removal.
    ended: Vec<EndedSubscription>,
}

/// An active subscription, as delivery sees it.
pub struct GroupSubscriber {
    pub conn: SubscriberConnId,
    join_id: u64,
    /// `Some`: only events of this item.
    pub item: Option<String>,
}

/// The connection table of one shard.
#[derive(Default)]
pub struct SubscriberTable {
    conns: HashMap<SubscriberConnId, SubscriberConn>,
    /// Active subscriptions, per group.
    by_group: HashMap<GroupKey, Vec<GroupSubscriber>>,
    next_conn: SubscriberConnId,
    next_join: u64,
}

impl SubscriberTable {
    pub fn new() -> Self {
        SubscriberTable { next_conn: 1, next_join: 1, ..Default::default() }
    }

    /// Registers a new connection.
    pub fn add(&mut self, queue: OutQueue, fd: RawFd, context: Value) -> SubscriberConnId {
        let id = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(id, SubscriberConn { queue, fd, context, subs: HashMap::new(), ended: Vec::new() });
        id
    }

    /// Unregisters a connection (its subscriptions must have been ended); returns its auth
    /// context and the subscriptions it held at its end.
    pub fn remove(&mut self, conn: SubscriberConnId) -> Option<(Value, Vec<EndedSubscription>)> {
        self.conns.remove(&conn).map(|c| (c.context, c.ended))
    }

    pub fn get(&self, conn: SubscriberConnId) -> Option<&SubscriberConn> {
        self.conns.get(&conn)
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (SubscriberConnId, &SubscriberConn)> {
        self.conns.iter().map(|(&id, c)| (id, c))
    }

    /// How many subscriptions `conn` holds, and whether one of them is `subscription`.
    pub fn subscriptions(&self, conn: SubscriberConnId, subscription: &str) -> (usize, bool) {
        self.conns.get(&conn).map_or((0, false), |c| (c.subs.len(), c.subs.contains_key(subscription)))
    }

    /// Adds a pending subscription to `conn`; returns its join id and the subscription it
    /// replaced (same id), or `None` when the connection is gone.
    pub fn subscribe(&mut self, conn: SubscriberConnId, subscription: String, key: GroupKey, item: Option<String>) -> Option<(u64, Option<Subscription>)> {
        let join_id = self.next_join;
        self.next_join += 1;
        let c = self.conns.get_mut(&conn)?;
        let previous = c.subs.insert(subscription, Subscription { key, item, join_id, active: false });
        Some((join_id, previous))
    }

    /// Removes one subscription of `conn` by id.
    pub fn unsubscribe(&mut self, conn: SubscriberConnId, subscription: &str) -> Option<Subscription> {
        self.conns.get_mut(&conn)?.subs.remove(subscription)
    }

    /// Removes every subscription of `conn`, remembering them for the leave triggers.
    pub fn unsubscribe_all(&mut self, conn: SubscriberConnId) -> Vec<Subscription> {
        let Some(c) = self.conns.get_mut(&conn) else { return Vec::new() };
        let subs: Vec<(String, Subscription)> = c.subs.drain().collect();
        subs.into_iter()
            .map(|(id, sub)| {
                c.ended.push((id, sub.key.clone(), sub.item.clone()));
                sub
            })
            .collect()
    }

    /// Marks the subscription `join_id` of `conn` active and registers it for delivery; `false`
    /// when it ended (or was replaced) meanwhile.
    pub fn activate(&mut self, conn: SubscriberConnId, join_id: u64, key: GroupKey) -> bool {
        let sub = self.conns.get_mut(&conn).and_then(|c| c.subs.values_mut().find(|s| s.join_id == join_id));
        let Some(sub) = sub else { return false };
        sub.active = true;
        let item = sub.item.clone();
        self.by_group.entry(key).or_default().push(GroupSubscriber { conn, join_id, item });
        true
    }

    /// Stops delivery to an ended subscription of `conn` (one that was active).
    pub fn deactivate(&mut self, conn: SubscriberConnId, sub: &Subscription) {
        if let Some(subs) = self.by_group.get_mut(&sub.key) {
            subs.retain(|s| !(s.conn == conn && s.join_id == sub.join_id));
            if subs.is_empty() {
                self.by_group.remove(&sub.key);
            }
        }
    }

    /// The active subscriptions of `key`.
    pub fn subscribers_of(&self, key: &GroupKey) -> &[GroupSubscriber] {
        self.by_group.get(key).map_or(&[], Vec::as_slice)
    }
}
