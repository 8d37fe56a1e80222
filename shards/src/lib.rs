//! The shard cores of ringcast and the thread-per-core runtime they run on.
//!
//! A shard owns the stream groups that hash to it (`routing`): it runs their operations on its
//! store (`group_ops`, `update`, `store`), makes writes durable before anything is released
//! (`commit`), answers joins with snapshots and publishes each event frame once to the shards
//! with subscribers (`owner`), and serves the subscriber connections accepted on its listener
//! (`subscriber`, `subscribers`, `delivery`, `outbound`, `wsframe`). `shard` ties one core
//! together and `start` runs it; `messages` are what cores send each other; `runtime` places,
//! starts and stops every core, the control core's included.

pub mod commit;
pub mod config;
pub mod delivery;
pub mod event_json;
pub mod group_ops;
pub mod messages;
pub mod metrics;
pub mod outbound;
pub mod redis;
pub mod owner;
pub mod queue;
pub mod routing;
pub mod runtime;
pub mod shard;
pub mod start;
pub mod store;
pub mod subscriber;
pub mod subscribers;
pub mod update;
pub mod wsframe;
