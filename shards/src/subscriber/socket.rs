//! The socket of a subscriber connection: keepalive, the reader that reassembles client
//! frames, and the writer that sends every queued frame in one write.
//!
//! Everything here reads client bytes, so it must not panic on any input: no indexing, slicing
//! by offset, unwrap or expect outside tests.
#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

use crate::outbound::{Batch, OutQueue};
use crate::wsframe::{self, ClientFrame, FrameError};
use bytes::BytesMut;
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use tungstenite::protocol::frame::coding::{Data, OpCode};

/// TCP keepalive on an accepted socket: finds peers that vanished without FIN or RST even when
/// pings are off (30 s idle, then 3 probes 10 s apart).
pub(super) fn set_keepalive(fd: std::os::fd::RawFd) {
    let options = [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 30),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3),
    ];
    for (level, name, value) in options {
        let value: libc::c_int = value;
        // SAFETY: setsockopt(2) on a socket this task owns, with an int-sized option value.
        unsafe {
            libc::setsockopt(fd, level, name, (&value as *const libc::c_int).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t);
        }
    }
}

/// A socket shared by a connection's reader and writer.
pub(super) type Socket = Rc<RefCell<TcpStream>>;

/// Bytes a subscriber read asks for at a time: clients send only small join/leave frames, and
/// idle connections should cost little memory.
const READ_CHUNK: usize = 512;

/// Reads once and appends to `buf`; returns how many bytes arrived (0 = end of stream).
/// Cancel-safe: `buf` changes only when the read completes, in the same poll.
async fn read_some(socket: &Socket, buf: &mut BytesMut) -> std::io::Result<usize> {
    let mut chunk = [0u8; READ_CHUNK];
    let n = std::future::poll_fn(|cx| Pin::new(&mut *socket.borrow_mut()).poll_read(cx, &mut chunk)).await?;
    buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
    Ok(n)
}

/// Writes all of `data`.
async fn write_all(socket: &Socket, queue: &OutQueue, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        let n = std::future::poll_fn(|cx| Pin::new(&mut *socket.borrow_mut()).poll_write(cx, data)).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        // Progress for the slow-subscriber policy (a partly read batch is not a stall).
        queue.written(n);
        data = data.get(n..).unwrap_or_default();
    }
    Ok(())
}

/// Reads client frames, reassembling fragmented messages.
pub(super) struct Reader {
    pub(super) socket: Socket,
    pub(super) buf: BytesMut,
    pub(super) max_frame: usize,
    pub(super) fragments: Vec<u8>,
    pub(super) fragment_opcode: Option<OpCode>,
}

impl Reader {
    /// The next complete message or control frame; `Ok(None)` at end of stream.
    pub(super) async fn next_frame(&mut self) -> Result<Option<ClientFrame>, FrameError> {
        loop {
            while let Some(frame) = wsframe::parse_client_frame(&mut self.buf, self.max_frame)? {
                match frame.opcode {
                    OpCode::Data(Data::Continue) => {
                        self.fragments.extend_from_slice(&frame.payload);
                        if self.fragments.len() > self.max_frame {
                            return Err(FrameError::TooBig(self.fragments.len() as u64));
                        }
                        if frame.is_final {
                            let opcode = self.fragment_opcode.take().ok_or(FrameError::Malformed)?;
                            let payload = std::mem::take(&mut self.fragments);
                            return Ok(Some(ClientFrame { opcode, is_final: true, payload }));
                        }
                    }
                    OpCode::Data(_) if !frame.is_final => {
                        self.fragment_opcode = Some(frame.opcode);
                        self.fragments = frame.payload;
                    }
                    _ => return Ok(Some(frame)),
                }
            }
            match read_some(&self.socket, &mut self.buf).await {
                Ok(0) | Err(_) => return Ok(None),
                Ok(_) => {}
            }
        }
    }
}

/// Writes the queue to the socket: one frame as is, several copied into one buffer and written
/// with one call (glommio 0.9 has no vectored send).
pub(super) async fn write_loop(socket: Socket, queue: OutQueue) {
    let mut scratch: Vec<u8> = Vec::new();
    loop {
        let (written, last) = match queue.next_batch().await {
            Batch::Frames(frames) if frames.len() == 1 => match frames.first() {
                Some(frame) => (write_all(&socket, &queue, frame).await, false),
                None => (Ok(()), false),
            },
            Batch::Frames(frames) => {
                scratch.clear();
                for frame in &frames {
                    scratch.extend_from_slice(frame);
                }
                (write_all(&socket, &queue, &scratch).await, false)
            }
            Batch::Close(frame) => (write_all(&socket, &queue, &frame).await, true),
        };
        if written.is_err() || last {
            // SAFETY: shutdown(2) on this connection's socket, still open; the reader then ends.
            unsafe { libc::shutdown(socket.borrow().as_raw_fd(), libc::SHUT_RDWR) };
            return;
        }
    }
}
