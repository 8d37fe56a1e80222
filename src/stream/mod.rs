//! The stream module (spec/stream.md) on the control core: the `stream::*` functions, which
//! decode their input, route each operation to the group's owner shard and answer. The groups,
//! their store and the subscriber WebSocket live in the shards (`ringcast_shards`).

pub mod functions;

use ringcast_shards::messages::ShardSender;

/// What the control core holds of the stream module: the shards' inboxes.
pub struct StreamService {
    pub shards: Vec<ShardSender>,
}
