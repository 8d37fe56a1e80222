//! The owner side of a shard: the groups that hash to it. It runs their operations on its store
//! (through the commit queue), keeps which shards subscribe to each group, answers joins with a
//! snapshot taken at the same point of the group's event sequence as the interest it registers,
//! and publishes each event frame — built once — to exactly those shards.
//!
//! Nothing here does I/O or messaging: what leaves the owner is returned as `OwnerOutput`s (in
//! order) for the shard to send, so the ordering rules are unit-tested without executors.

use crate::commit::{Admitted, GroupCommit, Pending};
use crate::event_json;
use crate::group_ops::{self, Applied};
use crate::messages::{GroupKey, GroupOp, GroupOpReply, JoinRequest, Snapshot, CLOSE_STORE_FAILED};
use crate::metrics::AllShardMetrics;
use crate::wsframe::text_frame;
use bytes::Bytes;
use futures_channel::oneshot;
use ringcast_storage::KvStore;
use std::collections::HashMap;
use std::sync::atomic::Ordering;

/// Something the owner sends out.
#[derive(Debug)]
pub enum OwnerOutput {
    /// An event frame of `key` for the subscribers on shard `shard` (this one included).
    Deliver { shard: usize, key: GroupKey, item: Option<String>, frame: Bytes },
    /// A join's snapshot, for the subscription on shard `join.from_shard`.
    Synced { join: JoinRequest, snapshot: Snapshot },
    /// A frame only for the subscriptions on shard `shard` whose item is exactly `item` (`None`:
    /// group subscriptions): the fresh `sync` of the `redis` adapter after a gap.
    DeliverExact { shard: usize, key: GroupKey, item: Option<String>, frame: Bytes },
    /// The answer to a group operation, after its event's deliveries.
    Reply { reply: oneshot::Sender<GroupOpReply>, answer: GroupOpReply },
}

/// The groups a shard owns.
pub struct Owner<S> {
    index: usize,
    store: S,
    commit: GroupCommit,
    /// Per owned group, how many subscriptions each shard holds.
    interest: HashMap<GroupKey, HashMap<usize, usize>>,
    max_value_bytes: usize,
    metrics: AllShardMetrics,
}

impl<S: KvStore> Owner<S> {
    /// The owner side of shard `index` over `store`; `commit_enabled`: writes wait for a commit.
    pub fn new(index: usize, store: S, commit_enabled: bool, max_value_bytes: usize, metrics: AllShardMetrics) -> Self {
        Owner { index, store, commit: GroupCommit::new(commit_enabled), interest: HashMap::new(), max_value_bytes, metrics }
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    pub fn group_commit(&mut self) -> &mut GroupCommit {
        &mut self.commit
    }

    /// Runs `op` on group `key`. Its reply and event are released once it is as durable as
    /// configured (at once, or after its commit: subscribers never see a write a crash could
    /// take back). Returns whether a commit task must be started.
    pub fn run(&mut self, key: GroupKey, op: GroupOp, reply: oneshot::Sender<GroupOpReply>, out: &mut Vec<OwnerOutput>) -> bool {
        let read = op.is_read();
        let applied = group_ops::apply(&mut self.store, &key, op, self.max_value_bytes);
        self.account_store(&applied);
        match self.commit.admit(Pending { key, applied, reply }, read) {
            Admitted::Release(pending) => {
                self.release(pending, out);
                false
            }
            Admitted::Queued { start_commit } => start_commit,
        }
    }

    fn account_store(&self, applied: &Applied) {
        let (added, removed) = applied.stored_bytes;
        let bytes = &self.metrics[self.index].store_bytes;
        bytes.fetch_add(added as u64, Ordering::Relaxed);
        bytes.fetch_sub(removed as u64, Ordering::Relaxed);
    }

    /// Answers an operation and publishes its event (a failed one publishes nothing).
    pub fn release(&mut self, pending: Pending, out: &mut Vec<OwnerOutput>) {
        let Pending { key, applied, reply } = pending;
        let event = match (&applied.result, applied.event) {
            (Ok(_), Some((item, text))) => Some(self.publish(&key, item, text.as_bytes(), out)),
            _ => None,
        };
        out.push(OwnerOutput::Reply { reply, answer: GroupOpReply { result: applied.result, event } });
    }

    /// Builds the event's frame once and hands it to every shard with subscribers of the group.
    fn publish(&mut self, key: &GroupKey, item: Option<String>, text: &[u8], out: &mut Vec<OwnerOutput>) -> Bytes {
        self.metrics[self.index].events_total.fetch_add(1, Ordering::Relaxed);
        let frame = text_frame(text);
        if let Some(shards) = self.interest.get(key) {
            for &shard in shards.keys() {
                out.push(OwnerOutput::Deliver { shard, key: key.clone(), item: item.clone(), frame: frame.clone() });
            }
        }
        frame
    }

    /// Publishes an event whose storage happened elsewhere (the `redis` adapter: another node,
    /// or this one through Redis); returns its frame.
    pub fn publish_event(&mut self, key: &GroupKey, item: Option<String>, text: &[u8], out: &mut Vec<OwnerOutput>) -> Bytes {
        self.publish(key, item, text, out)
    }

    /// Whether any shard holds a subscription of `key`.
    pub fn has_interest(&self, key: &GroupKey) -> bool {
        self.interest.contains_key(key)
    }

    /// The shards that hold subscriptions of `key`.
    pub fn interested_shards(&self, key: &GroupKey) -> Vec<usize> {
        self.interest.get(key).map(|shards| shards.keys().copied().collect()).unwrap_or_default()
    }

    /// A subscription asks for the group: registers its shard's interest and answers the
    /// snapshot taken at the same point (after every event already published, before every
    /// later one). Waits while a commit is under way.
    pub fn join(&mut self, join: JoinRequest, out: &mut Vec<OwnerOutput>) {
        let Some(join) = self.commit.defer_join(join) else { return };
        // A failed store serves no snapshot: its index may hold a write that never became durable.
        let snapshot = match self.store.health() {
            Err(_) => Err(CLOSE_STORE_FAILED),
            Ok(()) => {
                let key = &join.key;
                *self.interest.entry(key.clone()).or_default().entry(join.from_shard).or_default() += 1;
                let text = match &join.item {
                    Some(id) => {
                        let value = self.store.get(&key.0, &key.1, id);
                        event_json::data_event(&key.0, &key.1, Some(id), "sync", value.as_deref().unwrap_or("null"))
                    }
                    None => event_json::group_sync(&key.0, &key.1, &self.store.list(&key.0, &key.1)),
                };
                Ok(text_frame(text.as_bytes()))
            }
        };
        out.push(OwnerOutput::Synced { join, snapshot });
    }

    /// The commit ended: serves the joins that waited for it.
    pub fn serve_deferred_joins(&mut self, out: &mut Vec<OwnerOutput>) {
        for join in self.commit.take_deferred_joins() {
            self.join(join, out);
        }
    }

    /// One subscription of `key` on shard `from_shard` has ended.
    pub fn leave(&mut self, from_shard: usize, key: &GroupKey) {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics;
    use ringcast_storage::memory::MemoryStore;
    use serde_json::{json, Value};
    use std::task::{Context, Poll, Waker};

    const SUBSCRIBER_SHARD: usize = 1;

    fn owner(commit: bool) -> Owner<MemoryStore> {
        Owner::new(0, MemoryStore::new(), commit, 1 << 20, metrics::for_shards(2))
    }

    fn group() -> GroupKey {
        ("chat".into(), "room".into())
    }

    fn set(item: &str, value: Value) -> GroupOp {
        GroupOp::Set { item: item.into(), data: value }
    }

    /// Runs `op` on `group()`; returns the reply's receiver and whether a commit must start.
    fn run(owner: &mut Owner<MemoryStore>, op: GroupOp, out: &mut Vec<OwnerOutput>) -> (oneshot::Receiver<GroupOpReply>, bool) {
        let (tx, rx) = oneshot::channel();
        let start = owner.run(group(), op, tx, out);
        (rx, start)
    }

    fn join(owner: &mut Owner<MemoryStore>, out: &mut Vec<OwnerOutput>) {
        let request = JoinRequest { from_shard: SUBSCRIBER_SHARD, conn: 7, join_id: 1, key: group(), item: None };
        owner.join(request, out);
    }

    fn frame_json(frame: &Bytes) -> Value {
        serde_json::from_slice(&crate::wsframe::payload_of(frame)).unwrap()
    }

    /// What the outputs say, in order: `deliver <event type> <data>`, `synced <data>`,
    /// `reply ok|<error code>`.
    fn describe(out: Vec<OwnerOutput>) -> Vec<String> {
        out.into_iter()
            .map(|o| match o {
                OwnerOutput::Deliver { shard, frame, .. } => {
                    let event = &frame_json(&frame)["event"];
                    format!("deliver to {shard}: {} {}", event["type"].as_str().unwrap(), event["data"])
                }
                OwnerOutput::DeliverExact { shard, .. } => format!("deliver exact to {shard}"),
                OwnerOutput::Synced { join, snapshot } => format!("synced to {}: {}", join.from_shard, frame_json(&snapshot.unwrap())["event"]["data"]),
                OwnerOutput::Reply { answer, .. } => match answer.result {
                    Ok(value) => format!("reply {}", value.map_or("none".to_string(), |v| v.to_string())),
                    Err((code, _)) => format!("reply {code}"),
                },
            })
            .collect()
    }

    fn settle_one_commit(owner: &mut Owner<MemoryStore>, outcome: std::io::Result<()>, out: &mut Vec<OwnerOutput>) {
        let batch = owner.group_commit().next_batch().expect("a batch");
        for pending in owner.group_commit().settle(batch, &outcome) {
            owner.release(pending, out);
        }
        assert!(owner.group_commit().next_batch().is_none(), "one commit takes every waiting operation");
        owner.serve_deferred_joins(out);
    }

    #[test]
    fn writes_are_released_in_order_only_after_their_commit() {
        let mut owner = owner(true);
        let mut out = Vec::new();
        join(&mut owner, &mut out);
        assert_eq!(describe(std::mem::take(&mut out)), ["synced to 1: []"]);

        let (first, start) = run(&mut owner, set("a", json!(1)), &mut out);
        assert!(start, "the first write starts a commit");
        let (read, start) = run(&mut owner, GroupOp::Get { item: "a".into() }, &mut out);
        assert!(!start, "one commit at a time");
        let (second, _) = run(&mut owner, set("b", json!(2)), &mut out);
        // A read of a group without waiting writes is answered at once.
        let (tx, mut other) = oneshot::channel();
        assert!(!owner.run(("chat".into(), "other".into()), GroupOp::List, tx, &mut out));
        let released_now = describe(std::mem::take(&mut out));
        assert_eq!(released_now, ["reply []"]);
        drop(other.try_recv());
        for mut rx in [first, read, second] {
            assert_eq!(rx.try_recv().unwrap().map(|_| ()), None, "nothing is answered before the commit");
        }

        settle_one_commit(&mut owner, Ok(()), &mut out);
        assert_eq!(
            describe(out),
            [
                "deliver to 1: create 1",
                r#"reply {"new_value":1,"old_value":null}"#,
                "reply 1",
                "deliver to 1: create 2",
                r#"reply {"new_value":2,"old_value":null}"#,
            ]
        );
    }

    #[test]
    fn a_failed_commit_answers_errors_and_publishes_nothing() {
        let mut owner = owner(true);
        let mut out = Vec::new();
        join(&mut owner, &mut out);
        out.clear();
        let _ = run(&mut owner, set("a", json!(1)), &mut out);
        let _ = run(&mut owner, GroupOp::Get { item: "a".into() }, &mut out);
        let _ = run(&mut owner, GroupOp::CustomEvent { item: None, event_type: "typing".into(), data: json!({}) }, &mut out);
        // An event that stores nothing is not held back by the commit.
        assert_eq!(describe(std::mem::take(&mut out)), ["deliver to 1: event null", "reply null"]);

        settle_one_commit(&mut owner, Err(std::io::Error::other("disk gone")), &mut out);
        assert_eq!(describe(out), ["reply STREAM_STORE_ERROR", "reply STREAM_STORE_ERROR"]);
        assert_eq!(owner.metrics[0].events_total.load(Ordering::Relaxed), 1, "only the custom event was published");
    }

    /// Rebuilds the group as a subscriber sees it: the snapshot, then each delivered event.
    fn subscriber_view(out: &[OwnerOutput], view: &mut Option<Vec<(Option<String>, Value)>>) {
        for o in out {
            match o {
                OwnerOutput::Synced { snapshot, .. } => {
                    assert!(view.is_none(), "one snapshot per join");
                    let values = frame_json(snapshot.as_ref().unwrap())["event"]["data"].as_array().unwrap().clone();
                    *view = Some(values.into_iter().map(|v| (v["id"].as_str().map(String::from), v)).collect());
                }
                OwnerOutput::Deliver { shard, frame, .. } => {
                    assert_eq!(*shard, SUBSCRIBER_SHARD);
                    let view = view.as_mut().expect("no event before the snapshot");
                    let event = frame_json(frame);
                    let id = event["id"].as_str().map(String::from);
                    let data = event["event"]["data"].clone();
                    match event["event"]["type"].as_str().unwrap() {
                        "create" => {
                            assert!(!view.iter().any(|(i, _)| *i == id), "a create the snapshot already held: {id:?}");
                            view.push((id, data));
                        }
                        "update" => view.iter_mut().find(|(i, _)| *i == id).expect("an update of a known item").1 = data,
                        "delete" => view.retain(|(i, _)| *i != id),
                        other => panic!("unexpected event {other}"),
                    }
                }
                OwnerOutput::Reply { .. } | OwnerOutput::DeliverExact { .. } => {}
            }
        }
    }

    fn stored(owner: &Owner<MemoryStore>) -> Vec<Value> {
        owner.store().list("chat", "room").iter().map(|v| serde_json::from_str(v).unwrap()).collect()
    }

    #[test]
    fn snapshot_and_later_events_meet_without_gap_or_duplicate() {
        let mut owner = owner(false);
        let mut out = Vec::new();
        let _ = run(&mut owner, set("a", json!({"id": "a", "n": 1})), &mut out);
        let _ = run(&mut owner, set("b", json!({"id": "b", "n": 1})), &mut out);
        assert!(!out.iter().any(|o| matches!(o, OwnerOutput::Deliver { .. })), "no subscriber yet");
        out.clear();
        join(&mut owner, &mut out);
        let _ = run(&mut owner, set("a", json!({"id": "a", "n": 2})), &mut out);
        let _ = run(&mut owner, GroupOp::Delete { item: "b".into() }, &mut out);
        let _ = run(&mut owner, set("c", json!({"id": "c", "n": 1})), &mut out);
        let mut view = None;
        subscriber_view(&out, &mut view);
        let view: Vec<Value> = view.unwrap().into_iter().map(|(_, v)| v).collect();
        assert_eq!(view, stored(&owner));
    }

    #[test]
    fn a_join_during_a_commit_waits_for_it_and_sees_its_write_once() {
        let mut owner = owner(true);
        let mut out = Vec::new();
        let _ = run(&mut owner, set("a", json!({"id": "a"})), &mut out);
        join(&mut owner, &mut out);
        assert!(out.is_empty(), "the join waits for the commit under way");
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(owner.group_commit().poll_joins_served(&mut cx), Poll::Pending, "the inbox holds writes back meanwhile");

        settle_one_commit(&mut owner, Ok(()), &mut out);
        assert_eq!(owner.group_commit().poll_joins_served(&mut cx), Poll::Ready(()));
        // The write was published before the interest existed; the snapshot holds it instead.
        assert_eq!(describe(std::mem::take(&mut out).into_iter().filter(|o| !matches!(o, OwnerOutput::Reply { .. })).collect()), [r#"synced to 1: [{"id":"a"}]"#]);
        join_then_write(owner);
    }

    /// After a deferred join: later writes reach the subscriber after their commit.
    fn join_then_write(mut owner: Owner<MemoryStore>) {
        let mut out = Vec::new();
        let mut view = Some(vec![(Some("a".to_string()), json!({"id": "a"}))]);
        let _ = run(&mut owner, set("b", json!({"id": "b"})), &mut out);
        assert!(out.is_empty());
        settle_one_commit(&mut owner, Ok(()), &mut out);
        subscriber_view(&out, &mut view);
        let view: Vec<Value> = view.unwrap().into_iter().map(|(_, v)| v).collect();
        assert_eq!(view, stored(&owner));
    }

    /// A store that has failed (fail-stop): empty, and its health says so.
    struct FailedStore;

    impl KvStore for FailedStore {
        fn get(&self, _: &str, _: &str, _: &str) -> Option<ringcast_storage::Json> {
            None
        }
        fn set(&mut self, _: &str, _: &str, _: &str, _: ringcast_storage::Json) -> Result<Option<ringcast_storage::Json>, ringcast_storage::StoreError> {
            Err(self.health().unwrap_err())
        }
        fn delete(&mut self, _: &str, _: &str, _: &str) -> Result<Option<ringcast_storage::Json>, ringcast_storage::StoreError> {
            Err(self.health().unwrap_err())
        }
        fn list(&self, _: &str, _: &str) -> Vec<ringcast_storage::Json> {
            Vec::new()
        }
        fn list_groups(&self, _: &str) -> Vec<String> {
            Vec::new()
        }
        fn list_streams(&self) -> Vec<(String, Vec<String>)> {
            Vec::new()
        }
        fn health(&self) -> Result<(), ringcast_storage::StoreError> {
            Err(ringcast_storage::StoreError::Failed { dir: "test".into(), why: "fdatasync failed".into() })
        }
    }

    #[test]
    fn a_failed_store_serves_no_snapshot_and_registers_no_interest() {
        let mut owner = Owner::new(0, FailedStore, false, 1 << 20, metrics::for_shards(2));
        let mut out = Vec::new();
        owner.join(JoinRequest { from_shard: SUBSCRIBER_SHARD, conn: 7, join_id: 1, key: group(), item: None }, &mut out);
        assert!(matches!(&out[..], [OwnerOutput::Synced { snapshot: Err(CLOSE_STORE_FAILED), .. }]));
        assert!(owner.interest.is_empty());
    }
}
