//! The stream module (spec/stream.md) on the control core: the `stream::*` functions, which
//! decode their input, route each operation to the group's owner shard and answer. The groups,
//! their store and the subscriber WebSocket live in the shards (`ringcast_shards`).

mod custom_update;
pub mod functions;
pub mod item_locks;

use ringcast_shards::messages::ShardSender;

/// What the control core holds of the stream module: the shards' inboxes, and the per-item
/// locks that serialise the mutations of custom streams.
pub struct StreamService {
    pub shards: Vec<ShardSender>,
    pub item_locks: item_locks::ItemLocks,
}

impl StreamService {
    pub fn new(shards: Vec<ShardSender>) -> StreamService {
        StreamService { shards, item_locks: item_locks::ItemLocks::default() }
    }
}

impl AsRef<item_locks::ItemLocks> for StreamService {
    fn as_ref(&self) -> &item_locks::ItemLocks {
        &self.item_locks
    }
}
