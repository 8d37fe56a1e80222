//! The stream module (spec/stream.md): `stream::*` functions on the control core, groups owned
//! by shard cores, and the subscriber WebSocket served by every shard.

pub mod frames;
pub mod functions;
pub mod messages;
pub mod shard;
pub mod store;
pub(crate) mod subscriber;

use messages::ShardSender;

/// What the control core holds of the stream module: the shards' inboxes.
pub struct StreamService {
    pub shards: Vec<ShardSender>,
}
