//! Thread-per-core machinery of ringcast: which executor runs on which CPU, which shard owns a
//! stream group, WebSocket framing for subscriber sockets, and the per-connection outbound queue
//! that carries shared, pre-built frames.

pub mod outbound;
pub mod routing;
pub mod runtime;
pub mod wsframe;
