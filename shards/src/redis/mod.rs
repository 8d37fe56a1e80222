//! The `redis` adapter (spec/stream.md §6.3, with ringcast's own layout and channels): several
//! ringcast nodes share one Redis for storage and cross-node fan-out.
//!
//! `url` reads `redis_url`; `resp` is the wire protocol and `client` the pipelined connection
//! over glommio (no mature Redis client runs on glommio's executors: the usual crates need
//! tokio, and a blocking client would stall the core); `scripts` holds the key layout and the
//! Lua scripts; `message` the event text published per group; `backend` ties them to a shard.

pub mod backend;
pub mod client;
pub mod message;
pub mod resp;
pub mod scripts;
pub mod url;

pub use url::RedisUrl;
