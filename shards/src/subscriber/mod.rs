//! Subscriber connections on the stream port (spec/stream.md §1): the HTTP upgrade
//! (`upgrade`), the socket's reader and writer (`socket`), the messages subscribers send
//! (`message`), and the connection itself (`connection`).

mod connection;
pub mod message;
mod socket;
pub mod upgrade;

pub use connection::serve;
