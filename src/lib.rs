//! ringcast: a thread-per-core engine for the iii worker protocol and iii streams.
//!
//! The binary (`src/main.rs`) is a thin shell over this library; benches and tests use the
//! modules directly.

pub mod boot;
pub mod channels;
pub mod cli;
pub mod config;
pub mod control;
#[doc(hidden)]
pub mod fuzzing;
pub mod http_functions;
pub mod metrics;
pub mod queue;
pub mod shard_config;
pub mod stream;
pub mod telemetry;

/// Exit code for "could not start": bad config, port in use, locked-memory limit.
pub const EXIT_START_FAILED: i32 = 2;
