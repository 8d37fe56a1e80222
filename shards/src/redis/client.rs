//! A small RESP2 client over glommio's `TcpStream`, for the shard cores: commands are appended
//! to one output buffer and written together (pipelining: everything queued while a write was
//! under way leaves in the next one), replies are matched to callbacks in order. No command ever
//! blocks the core; a command issued while Redis is unreachable fails at once.
//!
//! Two modes share the connection code: `Commands` (each reply goes to the callback of its
//! command) and `PubSub` (pushed messages and subscription confirmations go to one handler).
//! The connection is re-established with a growing pause (50 ms to 1 s) after any loss, and the
//! mode's `on_connect` / `on_disconnect` notifications let the owner resubscribe and resync.
//!
//! Ownership of what is in flight: the callbacks of the commands written on a connection belong
//! to that connection; when it ends (EOF, RST, read/write error, a reply that is not RESP2, or no
//! reply for `REPLY_TIMEOUT` while commands wait) every one of them is called with `Lost`.

use super::resp::{self, Parsed, Resp};
use super::scripts::Script;
use super::url::RedisUrl;
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// Limit on connecting (and the handshake) to Redis.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Commands waiting this long with no reply at all end the connection (a server that vanished
/// without RST); their callers get `Lost`.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(3);
/// A pub/sub connection that has received nothing this long is pinged.
pub const PUBSUB_PING_AFTER: Duration = Duration::from_secs(1);
/// Bytes of commands that may wait to be written; past it commands fail with `Overloaded`.
pub const MAX_OUTPUT_BYTES: usize = 64 << 20;
/// Commands that may wait for their replies on one connection.
pub const MAX_PENDING: usize = 1 << 20;
const READ_CHUNK: usize = 64 << 10;
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Why a command got no usable reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedisError {
    #[error("redis at {0} is not reachable")]
    Unavailable(String),
    #[error("the connection to redis at {0} was lost before it answered (the command may or may not have been applied)")]
    Lost(String),
    #[error("redis refused the command: {0}")]
    Server(String),
    #[error("unexpected reply from redis: {0}")]
    Reply(String),
    #[error("too many commands waiting for redis at {0}")]
    Overloaded(String),
}

/// Called with the reply of one command.
pub type Callback = Box<dyn FnOnce(Result<Resp, RedisError>)>;

/// What a pub/sub connection reports.
#[derive(Debug)]
pub enum PubSubEvent {
    /// (Re)connected: nothing is subscribed on it yet.
    Connected,
    /// The connection ended; every subscription with it.
    Disconnected,
    /// Redis confirmed a `SUBSCRIBE` of this channel.
    Subscribed(bytes::Bytes),
    /// A message published on a subscribed channel.
    Message { channel: bytes::Bytes, payload: bytes::Bytes },
}

/// Receives what a pub/sub connection reports (called with no borrow of the client held).
pub type PubSubHandler = Rc<dyn Fn(PubSubEvent)>;
/// Told when a command connection is (re)established.
pub type ConnectHandler = Rc<dyn Fn()>;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Commands,
    PubSub,
}

struct State {
    /// The current connection is up and its handshake done.
    live: bool,
    /// Encoded commands waiting for the writer.
    out: Vec<u8>,
    /// Callbacks of the commands written or queued, in order (command mode).
    pending: VecDeque<Callback>,
    writer: Option<Waker>,
    /// When a reply last arrived, or the first command started waiting since.
    progress: Instant,
}

/// One Redis connection with its reconnect loop.
pub struct Client {
    url: RedisUrl,
    addr: SocketAddr,
    name: &'static str,
    mode: Mode,
    /// Command mode: told after each (re)connect.
    on_connect: RefCell<Option<ConnectHandler>>,
    /// Pub/sub mode: gets every event.
    on_event: RefCell<Option<PubSubHandler>>,
    state: RefCell<State>,
    /// SHA1 of each script as `SCRIPT LOAD` answered, by `Script::index`.
    shas: RefCell<Vec<String>>,
    /// Set once the client is dropped by its owner: the loop ends.
    stopped: Cell<bool>,
    /// Counters of the shard it serves (commands, writes), when set.
    metrics: RefCell<Option<(crate::metrics::AllShardMetrics, usize)>>,
}

impl Client {
    /// A command connection (`name` for log lines); `start` connects it.
    pub fn commands(url: RedisUrl, addr: SocketAddr, name: &'static str) -> Rc<Client> {
        Client::new(url, addr, name, Mode::Commands)
    }

    /// A pub/sub connection; `set_on_event` says where its events go.
    pub fn pubsub(url: RedisUrl, addr: SocketAddr, name: &'static str) -> Rc<Client> {
        Client::new(url, addr, name, Mode::PubSub)
    }

    fn new(url: RedisUrl, addr: SocketAddr, name: &'static str, mode: Mode) -> Rc<Client> {
        Rc::new(Client {
            url,
            addr,
            name,
            mode,
            on_connect: RefCell::new(None),
            on_event: RefCell::new(None),
            state: RefCell::new(State { live: false, out: Vec::new(), pending: VecDeque::new(), writer: None, progress: Instant::now() }),
            shas: RefCell::new(Vec::new()),
            stopped: Cell::new(false),
            metrics: RefCell::new(None),
        })
    }

    /// Sets what a command connection calls after each (re)connect.
    pub fn set_on_connect(&self, handler: ConnectHandler) {
        *self.on_connect.borrow_mut() = Some(handler);
    }

    /// Counts its commands and writes in shard `index`'s counters.
    pub fn set_metrics(&self, metrics: crate::metrics::AllShardMetrics, index: usize) {
        *self.metrics.borrow_mut() = Some((metrics, index));
    }

    fn count(&self, field: fn(&crate::metrics::ShardMetrics) -> &std::sync::atomic::AtomicU64) {
        if let Some((metrics, index)) = &*self.metrics.borrow() {
            if let Some(m) = metrics.get(*index) {
                field(m).fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// Sets where a pub/sub connection reports its events.
    pub fn set_on_event(&self, handler: PubSubHandler) {
        *self.on_event.borrow_mut() = Some(handler);
    }

    fn event(&self, event: PubSubEvent) {
        let handler = self.on_event.borrow().clone();
        if let Some(handler) = handler {
            handler(event);
        }
    }

    /// Starts the connect/reconnect loop on the current executor.
    pub fn start(self: &Rc<Client>) {
        let weak = Rc::downgrade(self);
        glommio::spawn_local(run(weak)).detach();
    }

    /// Ends the loop (and the connection) at its next step.
    pub fn stop(&self) {
        self.stopped.set(true);
        if let Some(w) = self.state.borrow_mut().writer.take() {
            w.wake();
        }
    }

    pub fn is_live(&self) -> bool {
        self.state.borrow().live
    }

    /// `host:port` of the server, for messages.
    pub fn address(&self) -> String {
        self.url.address()
    }

    /// Queues a command; `callback` gets its reply. Fails at once (and drops `callback`) when
    /// the connection is down or too much is waiting; the callback then never runs.
    pub fn send(&self, args: &[&[u8]], callback: Callback) -> Result<(), RedisError> {
        let mut state = self.state.borrow_mut();
        if !state.live {
            return Err(RedisError::Unavailable(self.url.address()));
        }
        if state.out.len() > MAX_OUTPUT_BYTES || state.pending.len() >= MAX_PENDING {
            return Err(RedisError::Overloaded(self.url.address()));
        }
        if state.pending.is_empty() {
            state.progress = Instant::now();
        }
        resp::encode_command(&mut state.out, args);
        state.pending.push_back(callback);
        self.count(|m| &m.redis_commands_total);
        if let Some(w) = state.writer.take() {
            w.wake();
        }
        Ok(())
    }

    /// Runs a loaded script with `EVALSHA`.
    pub fn eval(&self, script: Script, keys: &[&[u8]], args: &[&[u8]], callback: Callback) -> Result<(), RedisError> {
        let sha = self.shas.borrow().get(script.index()).cloned().unwrap_or_default();
        let nkeys = keys.len().to_string();
        let mut all: Vec<&[u8]> = Vec::with_capacity(3 + keys.len() + args.len());
        all.extend_from_slice(&[b"EVALSHA", sha.as_bytes(), nkeys.as_bytes()]);
        all.extend_from_slice(keys);
        all.extend_from_slice(args);
        self.send(&all, callback)
    }

    /// Queues a pub/sub command (`SUBSCRIBE`/`UNSUBSCRIBE`); its confirmations arrive as events.
    /// Returns whether it was queued (false while disconnected: `Connected` comes later).
    pub fn pubsub_command(&self, command: &[u8], channel: &[u8]) -> bool {
        let mut state = self.state.borrow_mut();
        if !state.live {
            return false;
        }
        resp::encode_command(&mut state.out, &[command, channel]);
        if let Some(w) = state.writer.take() {
            w.wake();
        }
        true
    }
}

/// Sets TCP keepalive (finds a vanished server even when nothing waits) on a connected socket.
fn keepalive(fd: std::os::fd::RawFd) {
    let options = [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 10),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 5),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3),
    ];
    for (level, name, value) in options {
        let value: libc::c_int = value;
        // SAFETY: setsockopt(2) on a socket this client owns, with an int-sized option value.
        unsafe {
            libc::setsockopt(fd, level, name, (&value as *const libc::c_int).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t);
        }
    }
}

type Socket = Rc<RefCell<TcpStream>>;

async fn write_all(socket: &Socket, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        let n = std::future::poll_fn(|cx| Pin::new(&mut *socket.borrow_mut()).poll_write(cx, data)).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        data = data.get(n..).unwrap_or_default();
    }
    Ok(())
}

/// Reads once into `buf`; `Ok(0)` at end of stream.
async fn read_some(socket: &Socket, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let start = buf.len();
    buf.resize(start + READ_CHUNK, 0);
    let result = std::future::poll_fn(|cx| Pin::new(&mut *socket.borrow_mut()).poll_read(cx, buf.get_mut(start..).unwrap_or_default())).await;
    let n = *result.as_ref().unwrap_or(&0);
    buf.truncate(start + n);
    result
}

/// Reads replies until `count` have arrived (for the handshake).
async fn read_replies(socket: &Socket, buf: &mut Vec<u8>, count: usize) -> Result<Vec<Resp>, String> {
    let mut replies = Vec::with_capacity(count);
    while replies.len() < count {
        match resp::parse(buf).map_err(|e| e.to_string())? {
            Parsed::Reply(reply, used) => {
                buf.drain(..used);
                replies.push(reply);
            }
            Parsed::Incomplete(_) => {
                if read_some(socket, buf).await.map_err(|e| e.to_string())? == 0 {
                    return Err("the server closed the connection".into());
                }
            }
        }
    }
    Ok(replies)
}

/// `AUTH` and `SELECT` as the URL asks, then `extra`; returns the replies to `extra`.
async fn handshake(socket: &Socket, url: &RedisUrl, extra: &[Vec<Vec<u8>>], buf: &mut Vec<u8>) -> Result<Vec<Resp>, String> {
    let mut out = Vec::new();
    let mut count = 0;
    if let Some(password) = &url.password {
        match &url.username {
            Some(user) => resp::encode_command(&mut out, &[b"AUTH", user.as_bytes(), password.as_bytes()]),
            None => resp::encode_command(&mut out, &[b"AUTH", password.as_bytes()]),
        }
        count += 1;
    }
    if url.db != 0 {
        resp::encode_command(&mut out, &[b"SELECT", url.db.to_string().as_bytes()]);
        count += 1;
    }
    for command in extra {
        let args: Vec<&[u8]> = command.iter().map(Vec::as_slice).collect();
        resp::encode_command(&mut out, &args);
    }
    write_all(socket, &out).await.map_err(|e| e.to_string())?;
    let mut replies = read_replies(socket, buf, count + extra.len()).await?;
    for reply in &replies {
        if let Resp::Error(e) = reply {
            return Err(format!("redis refused the connection set-up: {e}"));
        }
    }
    Ok(replies.split_off(count))
}

/// Connects, runs the handshake (loading the scripts on a command connection), and returns the
/// socket with any bytes read past the handshake.
async fn connect(client: &Client) -> Result<(Socket, Vec<u8>), String> {
    let stream = TcpStream::connect_timeout(client.addr, CONNECT_TIMEOUT).await.map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    keepalive(stream.as_raw_fd());
    let socket: Socket = Rc::new(RefCell::new(stream));
    let mut buf = Vec::new();
    let loads: Vec<Vec<Vec<u8>>> = match client.mode {
        Mode::Commands => Script::ALL.iter().map(|s| vec![b"SCRIPT".to_vec(), b"LOAD".to_vec(), s.source().as_bytes().to_vec()]).collect(),
        Mode::PubSub => Vec::new(),
    };
    let shake = handshake(&socket, &client.url, &loads, &mut buf);
    let replies = match futures_lite::future::or(async { Some(shake.await) }, async {
        glommio::timer::sleep(CONNECT_TIMEOUT).await;
        None
    })
    .await
    {
        Some(r) => r?,
        None => return Err("no answer to the connection set-up".into()),
    };
    if !loads.is_empty() {
        let shas: Option<Vec<String>> = replies.iter().map(|r| r.as_str().map(str::to_owned)).collect();
        *client.shas.borrow_mut() = shas.ok_or("SCRIPT LOAD did not answer a SHA1")?;
    }
    Ok((socket, buf))
}

/// The reconnect loop of one client.
async fn run(weak: Weak<Client>) {
    let mut pause = BACKOFF_MIN;
    let mut reported_down = false;
    loop {
        let Some(client) = weak.upgrade().filter(|c| !c.stopped.get()) else { return };
        match connect(&client).await {
            Ok((socket, buf)) => {
                pause = BACKOFF_MIN;
                if reported_down {
                    tracing::warn!("redis {} ({}): connected again", client.address(), client.name);
                } else {
                    tracing::debug!("redis {} ({}): connected", client.address(), client.name);
                }
                reported_down = false;
                {
                    let mut state = client.state.borrow_mut();
                    state.live = true;
                    state.progress = Instant::now();
                }
                notify_connected(&client);
                let why = serve(&client, &socket, buf).await;
                drop(socket);
                if !client.stopped.get() {
                    tracing::warn!("redis {} ({}): connection lost ({why}); reconnecting", client.address(), client.name);
                    reported_down = true;
                }
                fail_all(&client);
            }
            Err(why) => {
                if !reported_down {
                    tracing::warn!("redis {} ({}): cannot connect ({why}); retrying", client.address(), client.name);
                    reported_down = true;
                }
            }
        }
        drop(client);
        glommio::timer::sleep(pause).await;
        pause = (pause * 2).min(BACKOFF_MAX);
    }
}

fn notify_connected(client: &Rc<Client>) {
    match client.mode {
        Mode::Commands => {
            let handler = client.on_connect.borrow().clone();
            if let Some(handler) = handler {
                handler();
            }
        }
        Mode::PubSub => client.event(PubSubEvent::Connected),
    }
}

/// The connection ended: every waiting command fails, and a pub/sub owner hears of it.
fn fail_all(client: &Rc<Client>) {
    let pending = {
        let mut state = client.state.borrow_mut();
        state.live = false;
        state.out.clear();
        state.writer = None;
        std::mem::take(&mut state.pending)
    };
    for callback in pending {
        callback(Err(RedisError::Lost(client.address())));
    }
    if client.mode == Mode::PubSub {
        client.event(PubSubEvent::Disconnected);
    }
}

/// Runs the writer, the reader and the reply watchdog of a live connection until one ends;
/// returns why.
async fn serve(client: &Rc<Client>, socket: &Socket, buf: Vec<u8>) -> String {
    let writer = async {
        let mut spare = Vec::new();
        loop {
            std::future::poll_fn(|cx| {
                let mut state = client.state.borrow_mut();
                if client.stopped.get() {
                    return Poll::Ready(());
                }
                if state.out.is_empty() {
                    state.writer = Some(cx.waker().clone());
                    Poll::Pending
                } else {
                    std::mem::swap(&mut state.out, &mut spare);
                    Poll::Ready(())
                }
            })
            .await;
            if client.stopped.get() {
                return "stopped".to_string();
            }
            client.count(|m| &m.redis_writes_total);
            if let Err(e) = write_all(socket, &spare).await {
                return format!("write failed: {e}");
            }
            spare.clear();
            if spare.capacity() > READ_CHUNK * 4 {
                spare = Vec::new();
            }
        }
    };
    let reader = async {
        let mut buf = buf;
        let mut need = 0;
        loop {
            if buf.len() >= need {
                loop {
                    match resp::parse(&buf) {
                        Err(e) => return format!("not RESP2: {e}"),
                        Ok(Parsed::Incomplete(hint)) => {
                            need = hint;
                            break;
                        }
                        Ok(Parsed::Reply(reply, used)) => {
                            buf.drain(..used);
                            if let Err(why) = dispatch(client, reply) {
                                return why;
                            }
                        }
                    }
                }
            }
            match read_some(socket, &mut buf).await {
                Ok(0) => return "closed by the server".to_string(),
                // Bytes of a long reply still arriving are progress too.
                Ok(_) => client.state.borrow_mut().progress = Instant::now(),
                Err(e) => return format!("read failed: {e}"),
            }
            if buf.capacity() > READ_CHUNK * 16 && buf.len() < READ_CHUNK {
                buf.shrink_to(READ_CHUNK * 2);
            }
        }
    };
    let watchdog = async {
        loop {
            glommio::timer::sleep(Duration::from_millis(500)).await;
            let mut state = client.state.borrow_mut();
            if client.stopped.get() {
                return "stopped".to_string();
            }
            let idle = state.progress.elapsed();
            match client.mode {
                Mode::Commands => {
                    if !state.pending.is_empty() && idle >= REPLY_TIMEOUT {
                        return format!("no reply for {} s", REPLY_TIMEOUT.as_secs());
                    }
                }
                // A pub/sub connection can be silent for long: after a quiet second it is
                // pinged, and one that answers nothing for REPLY_TIMEOUT is given up (and the
                // groups resynced after reconnecting) instead of waiting for TCP keepalive.
                Mode::PubSub => {
                    if idle >= REPLY_TIMEOUT {
                        return format!("no reply to PING for {} s", REPLY_TIMEOUT.as_secs());
                    }
                    if idle >= PUBSUB_PING_AFTER {
                        resp::encode_command(&mut state.out, &[b"PING"]);
                        if let Some(w) = state.writer.take() {
                            w.wake();
                        }
                    }
                }
            }
        }
    };
    futures_lite::future::or(writer, futures_lite::future::or(reader, watchdog)).await
}

/// Hands one reply to its callback (command mode) or the handler (pub/sub mode).
fn dispatch(client: &Rc<Client>, reply: Resp) -> Result<(), String> {
    match client.mode {
        Mode::Commands => {
            let callback = {
                let mut state = client.state.borrow_mut();
                state.progress = Instant::now();
                state.pending.pop_front()
            };
            let Some(callback) = callback else { return Err("a reply nobody asked for".into()) };
            match reply {
                Resp::Error(e) if e.starts_with("NOSCRIPT") => {
                    // Someone flushed the script cache: the command that met it fails, and
                    // reconnecting loads the scripts again.
                    callback(Err(RedisError::Server(e)));
                    Err("the scripts were flushed from the server".into())
                }
                Resp::Error(e) => {
                    callback(Err(RedisError::Server(e)));
                    Ok(())
                }
                other => {
                    callback(Ok(other));
                    Ok(())
                }
            }
        }
        Mode::PubSub => {
            // `+PONG`: a PING while no channel is subscribed.
            if matches!(&reply, Resp::Simple(_)) {
                return Ok(());
            }
            let Some(mut parts) = reply.into_array() else { return Err("a pub/sub reply that is not an array".into()) };
            if parts.len() < 2 {
                return Err("a short pub/sub reply".into());
            }
            let kind = parts.first().and_then(Resp::as_bytes).map(<[u8]>::to_vec).unwrap_or_default();
            let take = |parts: &mut Vec<Resp>, at: usize| match parts.get_mut(at).map(|p| std::mem::replace(p, Resp::Bulk(None))) {
                Some(Resp::Bulk(Some(b))) => b,
                _ => bytes::Bytes::new(),
            };
            match kind.as_slice() {
                b"message" => {
                    let channel = take(&mut parts, 1);
                    let payload = take(&mut parts, 2);
                    client.event(PubSubEvent::Message { channel, payload });
                }
                b"subscribe" => client.event(PubSubEvent::Subscribed(take(&mut parts, 1))),
                _ => {}
            }
            Ok(())
        }
    }
}

/// Before the engine starts: connects to `url` (blocking, at most `timeout`) and checks that the
/// server answers `PING`, so an unreachable Redis is one clear start-up error.
pub fn check_reachable(url: &RedisUrl, timeout: Duration) -> Result<SocketAddr, String> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let address = url.address();
    let addrs: Vec<SocketAddr> = (url.host.as_str(), url.port).to_socket_addrs().map_err(|e| format!("cannot resolve {address}: {e}"))?.collect();
    let mut last = format!("cannot resolve {address}");
    for addr in addrs {
        let attempt = (|| -> Result<(), String> {
            let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
            stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
            let mut out = Vec::new();
            let mut expected = 1;
            if let Some(password) = &url.password {
                match &url.username {
                    Some(user) => resp::encode_command(&mut out, &[b"AUTH", user.as_bytes(), password.as_bytes()]),
                    None => resp::encode_command(&mut out, &[b"AUTH", password.as_bytes()]),
                }
                expected += 1;
            }
            if url.db != 0 {
                resp::encode_command(&mut out, &[b"SELECT", url.db.to_string().as_bytes()]);
                expected += 1;
            }
            resp::encode_command(&mut out, &[b"PING"]);
            stream.write_all(&out).map_err(|e| e.to_string())?;
            let mut buf = Vec::new();
            let mut got = 0;
            while got < expected {
                match resp::parse(&buf).map_err(|e| e.to_string())? {
                    Parsed::Reply(Resp::Error(e), _) => return Err(format!("redis refused: {e}")),
                    Parsed::Reply(_, used) => {
                        buf.drain(..used);
                        got += 1;
                    }
                    Parsed::Incomplete(_) => {
                        let mut chunk = [0u8; 4096];
                        let n = stream.read(&mut chunk).map_err(|e| e.to_string())?;
                        if n == 0 {
                            return Err("the server closed the connection".into());
                        }
                        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
                    }
                }
            }
            Ok(())
        })();
        match attempt {
            Ok(()) => return Ok(addr),
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(last)
}
