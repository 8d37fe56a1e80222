//! `limit`: this machine's delivery ceiling. An in-process bare writer feeds pre-built stream
//! frames to S loopback sockets read by the same receive loops `fanout` uses; no engine runs.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use crate::caller::Phase;
use crate::conn::{Conn, Mode, Role};
use crate::report::{Progress, Report};
use crate::runloop::{self, LoopCfg, Shared};
use crate::sys::{self, now_ns, Epoll, Rng, NS};
use crate::ws;
use crate::Common;

/// The frame a server would send for one `stream::set` of this payload size.
fn prebuilt_stream_frame(payload: usize) -> Vec<u8> {
    let pad = "x".repeat(payload.saturating_sub(50));
    let text = format!(
        r#"{{"type":"stream","timestamp":1718000000000,"streamName":"loadtest","groupId":"g0","id":"i0","event":{{"type":"create","data":{{"t":1234567890123,"seq":1234567,"pad":"{pad}"}}}}}}"#
    );
    let mut f = Vec::with_capacity(text.len() + 10);
    ws::encode_server_frame(&mut f, ws::OP_TEXT, text.as_bytes());
    f
}

/// Runs the bare writer against `n` loopback receivers for `--duration`, and reports.
pub fn run(c: &Common, n: usize, payload: usize) -> Result<Report, String> {
    sys::check_fd_limit(2 * n + 4)?;
    let mut rng = Rng::seeded();
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let frame = prebuilt_stream_frame(payload);
    let batch: Vec<u8> = frame.repeat(64);
    let threads = c.threads.min(n).max(1);
    let mut buckets: Vec<Vec<Conn>> = (0..threads).map(|_| Vec::new()).collect();
    let mut servers: Vec<TcpStream> = Vec::with_capacity(n);
    for j in 0..n {
        let cl = TcpStream::connect(addr).map_err(|e| e.to_string())?;
        let (sv, _) = listener.accept().map_err(|e| e.to_string())?;
        sv.set_nodelay(true).ok();
        sv.set_nonblocking(true).map_err(|e| e.to_string())?;
        servers.push(sv);
        buckets[j % threads].push(Conn::new(
            cl,
            Vec::new(),
            Mode::Count {
                sample_every: u32::MAX,
                latency: false,
                first: None,
            },
            rng.mask(),
            Role::Sub,
        ));
    }
    let shared = Shared::default();
    shared.phase.store(Phase::Publish as u8, Relaxed);
    let dur_ns = (c.duration * 1e9) as u64;
    let warm_ns = NS / 2;
    let deadline = now_ns() + warm_ns + dur_ns + 5 * NS;
    let mut window = (0u64, 0u64, 0f64, 0f64, 0u64, 0u64); // (d0, d1, cpu0, cpu1, t0, t1)
    let mut written = 0u64;
    let writer_stop = &AtomicBool::new(false);
    let outs = std::thread::scope(|s| {
        let shared = &shared;
        let writer = std::thread::Builder::new()
            .name("limit-writer".into())
            .spawn_scoped(s, || bare_writer(servers, &batch, writer_stop))
            .expect("spawn");
        let loops: Vec<_> = buckets
            .into_iter()
            .map(|b| {
                s.spawn(move || {
                    runloop::run_loop(
                        b,
                        shared,
                        LoopCfg {
                            stop_when_synced: None,
                            deadline_ns: Some(deadline),
                        },
                    )
                })
            })
            .collect();
        let mut prog = Progress::new();
        std::thread::sleep(Duration::from_nanos(warm_ns));
        window.0 = shared.delivered.load(Relaxed);
        window.2 = sys::self_cpu_secs();
        window.4 = now_ns();
        let mut last = (window.4, window.0);
        while now_ns() < window.4 + dur_ns && !shared.stop.load(Relaxed) {
            std::thread::sleep(Duration::from_millis(50).min(Duration::from_nanos(
                (window.4 + dur_ns).saturating_sub(now_ns()),
            )));
            let now = now_ns();
            if now - last.0 >= NS {
                let d = shared.delivered.load(Relaxed);
                prog.line(&format!(
                    "[limit] {:>5.1}s delivered {} ({:.0}/s)",
                    (now - window.4) as f64 / 1e9,
                    d,
                    (d - last.1) as f64 / ((now - last.0) as f64 / 1e9)
                ));
                last = (now, d);
            }
        }
        window.1 = shared.delivered.load(Relaxed);
        window.3 = sys::self_cpu_secs();
        window.5 = now_ns();
        prog.done();
        writer_stop.store(true, Relaxed);
        written = writer.join().expect("writer panicked");
        // let the receivers drain what is still in the socket buffers, then stop them
        let drain_end = now_ns() + 2 * NS;
        while shared.delivered.load(Relaxed) < written
            && now_ns() < drain_end
            && !shared.stop.load(Relaxed)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        shared.stop.store(true, Relaxed);
        loops
            .into_iter()
            .map(|h| h.join().expect("loop panicked"))
            .collect::<Vec<_>>()
    });
    let (st, _) = runloop::merged_stats(&outs);
    let secs = (window.5 - window.4) as f64 / 1e9;
    let frames = window.1 - window.0;
    let cpu = window.3 - window.2;
    let mut r = Report::new("limit");
    r.int("subscribers", n as u64);
    r.int("payload_bytes", payload as u64);
    r.int("frame_bytes", frame.len() as u64);
    r.int("receiver_threads", threads as u64);
    r.int("writer_threads", 1);
    r.num("duration_s", secs, 2, "s");
    r.int("frames_received", frames);
    r.rate("deliveries_per_s", frames as f64, secs, 0, "frames/s");
    r.rate(
        "rx_mb_per_s",
        frames as f64 * frame.len() as f64 / 1e6,
        secs,
        1,
        "MB/s",
    );
    r.rate(
        "harness_cpu_cores",
        cpu,
        secs,
        2,
        "cores (writer + receivers)",
    );
    r.per_unit_cpu(
        "harness_cpu_ns_per_delivery",
        cpu,
        frames,
        "ns (writer + receivers)",
    );
    r.int("frames_written_total", written);
    r.int("frames_received_total", st.delivered);
    let unaccounted = written as i64 - st.delivered as i64;
    r.add("frames_unaccounted", unaccounted, unaccounted.to_string());
    if unaccounted != 0 {
        r.note("frames_unaccounted ≠ 0: the receive path miscounted (or did not drain in 2 s)");
    }
    r.note("ceiling = a writer that does nothing but write() pre-built frames, 64 per call; pass deliveries_per_s to `fanout --ceiling`");
    Ok(r)
}

/// Writes the 64-frame batch to every writable socket until told to stop. Returns frames
/// completely written (per socket: bytes / frame size).
fn bare_writer(socks: Vec<TcpStream>, batch: &[u8], stop: &AtomicBool) -> u64 {
    use std::os::fd::AsRawFd;
    let mut ep = Epoll::new(1024).expect("epoll");
    for (i, s) in socks.iter().enumerate() {
        ep.add(s.as_raw_fd(), i as u64, sys::EV_OUT)
            .expect("epoll_ctl");
    }
    let mut off = vec![0usize; socks.len()];
    let mut dead = vec![false; socks.len()];
    let mut bytes = vec![0u64; socks.len()];
    let frame_len = (batch.len() / 64) as u64;
    while !stop.load(Relaxed) {
        let n = ep.wait(20);
        for k in 0..n {
            let (tok, _) = ep.event(k);
            let i = tok as usize;
            if dead[i] {
                continue;
            }
            match (&socks[i]).write(&batch[off[i]..]) {
                Ok(w) => {
                    bytes[i] += w as u64;
                    off[i] = (off[i] + w) % batch.len();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    dead[i] = true;
                    ep.del(socks[i].as_raw_fd());
                }
            }
        }
    }
    bytes.iter().map(|b| b / frame_len).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prebuilt_frame_is_countable_and_timed() {
        let f = prebuilt_stream_frame(256);
        struct S(u32, Vec<u8>);
        impl ws::FrameSink for S {
            fn frame_start(&mut self, _: u8, _: bool, _: u64) -> bool {
                true
            }
            fn payload(&mut self, c: &[u8]) {
                self.1.extend_from_slice(c)
            }
            fn frame_end(&mut self) {
                self.0 += 1
            }
        }
        let mut s = S(0, vec![]);
        let mut w = ws::FrameWalker::new();
        w.feed(&f.repeat(3), &mut s);
        assert_eq!(s.0, 3);
        let one = &s.1[..s.1.len() / 3];
        assert_eq!(ws::extract_t(one), Some(1234567890123));
        let v: serde_json::Value = serde_json::from_slice(one).unwrap();
        let data_len = v["event"]["data"].to_string().len();
        assert!((240..=270).contains(&data_len), "{data_len}");
    }

    #[test]
    fn bare_writer_counts_whole_frames_written() {
        use std::io::Read;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut readers = Vec::new();
        let mut writers = Vec::new();
        for _ in 0..2 {
            readers.push(TcpStream::connect(listener.local_addr().unwrap()).unwrap());
            let (w, _) = listener.accept().unwrap();
            w.set_nonblocking(true).unwrap();
            writers.push(w);
        }
        let batch = prebuilt_stream_frame(100).repeat(64);
        let frame_len = batch.len() / 64;
        let stop = AtomicBool::new(false);
        let (written, read) = std::thread::scope(|s| {
            let writer = s.spawn(|| bare_writer(writers, &batch, &stop));
            let mut read = 0usize;
            let mut buf = vec![0u8; 1 << 16];
            for r in readers.iter_mut() {
                let mut got = 0;
                while got < 4 * batch.len() {
                    got += r.read(&mut buf).unwrap();
                }
                read += got;
            }
            stop.store(true, Relaxed);
            (writer.join().unwrap(), read)
        });
        assert!(
            written as usize >= read / frame_len - 2,
            "{written} < {read} / {frame_len}"
        );
        assert!(written >= 2 * 4 * 64);
    }
}
