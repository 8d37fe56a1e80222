//! `channel`: channel throughput and its cost to RPC latency.
//!
//! (a) Moves `--bytes` through one channel (`engine::channels::create`, a writer and a reader
//! socket on `/ws/channels/{id}`) in `--frame`-byte binary frames and reports MB/s, next to a
//! plain loopback TCP copy of the same bytes with the same write size, measured in the same run.
//! (b) Runs the `rpc` scenario twice for `--duration`: alone, then while channel transfers of
//! `--bytes` each run back to back, and reports both latency distributions.
//!
//! The writer masks with a zero key (legal, and it keeps the harness's own work out of the
//! figure); the reader walks frame headers without copying payloads.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::report::Report;
use crate::rpc::{self, RpcArgs};
use crate::sys::Rng;
use crate::ws::{self, FrameSink, FrameWalker, WsUrl};
use crate::Common;

/// The `channel` subcommand's options.
pub struct ChannelArgs {
    /// bytes per transfer
    pub bytes: u64,
    /// binary frame size (the SDKs send 64 KiB)
    pub frame: usize,
    /// the channel's `buffer_size` (frames)
    pub buffer_size: u64,
    /// calls in flight in the RPC phases
    pub rpc_inflight: u64,
}

const OP_TEXT: u8 = 1;
const OP_BINARY: u8 = 2;
const OP_CLOSE: u8 = 8;
/// Frames per socket write.
const FRAMES_PER_WRITE: usize = 16;
const TIMEOUT: Duration = Duration::from_secs(10);

pub fn run(c: &Common, args: ChannelArgs) -> Result<Report, String> {
    let url = c.parsed_worker_url()?;
    let mut rng = Rng::seeded();
    let mut r = Report::new("channel");
    r.int("transfer_bytes", args.bytes);
    r.int("frame_bytes", args.frame as u64);

    let copy_secs = loopback_copy(args.bytes, args.frame * FRAMES_PER_WRITE).map_err(|e| format!("loopback copy: {e}"))?;
    let mut control = Control::open(&url, &mut rng)?;
    let (moved, channel_secs) = transfer(&url, &mut control, &mut rng, &args, None)?;
    if moved != args.bytes {
        return Err(format!("channel delivered {moved} of {} bytes", args.bytes));
    }
    let mb = |bytes: u64, secs: f64| bytes as f64 / 1e6 / secs.max(1e-9);
    r.num("loopback_copy_mb_per_s", mb(args.bytes, copy_secs), 0, "MB/s");
    r.num("channel_mb_per_s", mb(args.bytes, channel_secs), 0, "MB/s");
    r.num("channel_vs_copy", channel_secs.recip() / copy_secs.recip(), 2, "×");

    let rpc_args = |function: &str| RpcArgs {
        inflight: args.rpc_inflight,
        payload: 64,
        rate: 0.0,
        function: function.to_string(),
    };
    let idle = rpc::run(c, rpc_args("loadtest::channel-echo-idle"))?;
    // The same RPC run while channel transfers go on back to back.
    let stop = Arc::new(AtomicBool::new(false));
    let moved_busy = Arc::new(AtomicU64::new(0));
    let mover = {
        let (url, stop, moved_busy) = (url.clone(), stop.clone(), moved_busy.clone());
        let args = ChannelArgs { ..args };
        std::thread::spawn(move || -> Result<(u64, f64), String> {
            let mut rng = Rng::seeded();
            let mut control = Control::open(&url, &mut rng)?;
            let started = Instant::now();
            let mut transfers = 0;
            while !stop.load(Ordering::Relaxed) {
                let (moved, _) = transfer(&url, &mut control, &mut rng, &args, Some(&stop))?;
                moved_busy.fetch_add(moved, Ordering::Relaxed);
                transfers += 1;
            }
            Ok((transfers, started.elapsed().as_secs_f64()))
        })
    };
    // Let the first transfer get going before the calls start.
    let warm = Instant::now();
    while moved_busy.load(Ordering::Relaxed) == 0 && mover_busy_hint(&warm) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let busy = rpc::run(c, rpc_args("loadtest::channel-echo-busy"));
    stop.store(true, Ordering::Relaxed);
    let mover = mover.join().map_err(|_| "transfer thread panicked".to_string())?;
    let busy = busy?;
    let (transfers, mover_secs) = mover?;
    for (phase, report) in [("idle", &idle), ("during_transfer", &busy)] {
        for key in ["calls_per_s", "call_latency_p50_us", "call_latency_p99_us", "call_latency_p999_us", "call_latency_max_us"] {
            let value = report.get(key).cloned().unwrap_or(Value::Null);
            let human = value.as_f64().map(|v| format!("{v}")).unwrap_or_else(|| "-".into());
            r.add(&format!("rpc_{phase}_{key}"), value, human);
        }
    }
    let total = moved_busy.load(Ordering::Relaxed);
    r.int("transfers_during_rpc", transfers);
    r.num("channel_mb_per_s_during_rpc", mb(total, mover_secs), 0, "MB/s");
    r.note(format!(
        "rpc: {} in flight, 64-byte payloads; the second run overlaps channel transfers of {} bytes each",
        args.rpc_inflight, args.bytes
    ));
    r.note("loopback copy: one TCP connection, same write size; the channel path is two sockets and the engine's relay");
    Ok(r)
}

/// Keeps waiting for the first transfer bytes for at most two seconds.
fn mover_busy_hint(since: &Instant) -> bool {
    since.elapsed() < Duration::from_secs(2)
}

/// Seconds to copy `bytes` over one loopback TCP connection in `write`-byte writes.
fn loopback_copy(bytes: u64, write: usize) -> io::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> io::Result<u64> {
        let (mut sock, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = sock.read(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            total += n as u64;
        }
    });
    let mut sock = TcpStream::connect(addr)?;
    let chunk = vec![0x5au8; write];
    let started = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(write as u64) as usize;
        sock.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    sock.shutdown(Shutdown::Write)?;
    let got = reader.join().map_err(|_| io::Error::other("reader panicked"))??;
    if got != bytes {
        return Err(io::Error::other(format!("copied {got} of {bytes} bytes")));
    }
    Ok(started.elapsed().as_secs_f64())
}

/// A worker connection that creates channels.
struct Control {
    sock: TcpStream,
    pending: Vec<u8>,
}

impl Control {
    fn open(url: &WsUrl, rng: &mut Rng) -> Result<Control, String> {
        let (sock, pending) = ws::connect(url, key(rng), TIMEOUT).map_err(|e| format!("{url}: {e}"))?;
        sock.set_read_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
        Ok(Control { sock, pending })
    }

    /// `engine::channels::create`: the channel id and access key.
    fn create(&mut self, rng: &mut Rng, buffer_size: u64) -> Result<(String, String), String> {
        let id = format!("00000000-0000-4000-8000-{:012x}", rng.next_u64() & 0xffff_ffff_ffff);
        let call = serde_json::json!({"type": "invokefunction", "invocation_id": id,
            "function_id": "engine::channels::create", "data": {"buffer_size": buffer_size}});
        send_frame(&mut self.sock, OP_TEXT, call.to_string().as_bytes()).map_err(|e| e.to_string())?;
        loop {
            let (op, payload) = read_frame(&mut self.sock, &mut self.pending).map_err(|e| format!("create: {e}"))?;
            if op != OP_TEXT {
                continue;
            }
            let v: Value = serde_json::from_slice(&payload).map_err(|e| e.to_string())?;
            if v["type"] != "invocationresult" || v["invocation_id"] != id.as_str() {
                continue;
            }
            let w = &v["result"]["writer"];
            return match (w["channel_id"].as_str(), w["access_key"].as_str()) {
                (Some(c), Some(k)) => Ok((c.to_string(), k.to_string())),
                _ => Err(format!("engine::channels::create answered {v}")),
            };
        }
    }
}

fn key(rng: &mut Rng) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
    k[8..].copy_from_slice(&rng.next_u64().to_le_bytes());
    k
}

fn send_frame(sock: &mut TcpStream, op: u8, payload: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    ws::encode_client_frame(&mut out, op, payload, [0; 4]);
    sock.write_all(&out)
}

/// Reads one whole unfragmented server frame (opcode, payload).
fn read_frame(sock: &mut TcpStream, pending: &mut Vec<u8>) -> io::Result<(u8, Vec<u8>)> {
    loop {
        if let Some((op, start, len)) = parse_header(pending) {
            if pending.len() >= start + len {
                let payload = pending[start..start + len].to_vec();
                pending.drain(..start + len);
                return Ok((op, payload));
            }
        }
        let mut buf = [0u8; 65536];
        let n = sock.read(&mut buf)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        pending.extend_from_slice(&buf[..n]);
    }
}

fn parse_header(b: &[u8]) -> Option<(u8, usize, usize)> {
    let (&b0, &b1) = (b.first()?, b.get(1)?);
    let op = b0 & 0x0f;
    match b1 & 0x7f {
        126 => Some((op, 4, u16::from_be_bytes([*b.get(2)?, *b.get(3)?]) as usize)),
        127 => {
            let len: [u8; 8] = b.get(2..10)?.try_into().ok()?;
            Some((op, 10, u64::from_be_bytes(len) as usize))
        }
        n => Some((op, 2, n as usize)),
    }
}

/// Counts binary payload bytes and notices the close frame, without copying payloads.
#[derive(Default)]
struct Counter {
    bytes: u64,
    closed: bool,
}

impl FrameSink for Counter {
    fn frame_start(&mut self, opcode: u8, _fin: bool, len: u64) -> bool {
        match opcode {
            OP_BINARY => self.bytes += len,
            OP_CLOSE => self.closed = true,
            _ => {}
        }
        false
    }
    fn payload(&mut self, _chunk: &[u8]) {}
    fn frame_end(&mut self) {}
}

/// One channel transfer of `args.bytes` (cut short when `stop` is set): the bytes the reader
/// got and the seconds from the first write to the reader's close.
fn transfer(
    url: &WsUrl,
    control: &mut Control,
    rng: &mut Rng,
    args: &ChannelArgs,
    stop: Option<&AtomicBool>,
) -> Result<(u64, f64), String> {
    let (id, access_key) = control.create(rng, args.buffer_size)?;
    let end_url = |dir: &str| WsUrl { path: format!("/ws/channels/{id}?key={access_key}&dir={dir}"), ..url.clone() };
    let (mut reader, first) = ws::connect(&end_url("read"), key(rng), TIMEOUT).map_err(|e| format!("reader: {e}"))?;
    let (mut writer, _) = ws::connect(&end_url("write"), key(rng), TIMEOUT).map_err(|e| format!("writer: {e}"))?;
    reader.set_read_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
    let reading = std::thread::spawn(move || -> io::Result<u64> {
        let mut walker = FrameWalker::new();
        let mut counter = Counter::default();
        walker.feed(&first, &mut counter);
        let mut buf = vec![0u8; 1 << 20];
        while !counter.closed {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            walker.feed(&buf[..n], &mut counter);
        }
        Ok(counter.bytes)
    });
    let mut batch = Vec::new();
    let frame = vec![0xa5u8; args.frame];
    for _ in 0..FRAMES_PER_WRITE {
        ws::encode_client_frame(&mut batch, OP_BINARY, &frame, [0; 4]);
    }
    let started = Instant::now();
    let per_batch = (args.frame * FRAMES_PER_WRITE) as u64;
    let mut left = args.bytes;
    while left > 0 && !stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
        if left >= per_batch {
            writer.write_all(&batch).map_err(|e| format!("writer: {e}"))?;
            left -= per_batch;
        } else {
            let mut tail = Vec::new();
            let mut rest = left as usize;
            while rest > 0 {
                let n = rest.min(args.frame);
                ws::encode_client_frame(&mut tail, OP_BINARY, &frame[..n], [0; 4]);
                rest -= n;
            }
            writer.write_all(&tail).map_err(|e| format!("writer: {e}"))?;
            left = 0;
        }
    }
    send_frame(&mut writer, OP_CLOSE, &1000u16.to_be_bytes()).map_err(|e| format!("writer close: {e}"))?;
    let got = reading.join().map_err(|_| "reader panicked".to_string())?.map_err(|e| format!("reader: {e}"))?;
    Ok((got, started.elapsed().as_secs_f64()))
}
