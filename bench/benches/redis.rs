//! The `redis` adapter's commands against a real `redis-server` (started here on a free
//! loopback port; skipped, saying so, when it is not installed): `set`, `get`, `update` and
//! `list` as the adapter sends them, one at a time and 64 in flight (pipelined on one
//! connection, as a shard does). Plain throughput rows, not criterion: the client runs on a
//! glommio executor. `cargo bench -p ringcast-bench --bench redis`.

use futures_channel::oneshot;
use ringcast_shards::redis::client::{Client, RedisError};
use ringcast_shards::redis::resp::Resp;
use ringcast_shards::redis::scripts::{self, Script};
use ringcast_shards::redis::RedisUrl;
use std::cell::Cell;
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

const RUN: Duration = Duration::from_secs(2);
const VALUE: &str = r#"{"counter":0,"name":"bench-item","tags":["alpha","beta"]}"#;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_redis() -> Option<(Server, u16)> {
    let port = TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some((server, port))
}

type Reply = Result<Resp, RedisError>;

async fn call(client: &Client, args: &[&[u8]]) -> Reply {
    let (tx, rx) = oneshot::channel();
    client.send(args, Box::new(move |r| drop(tx.send(r))))?;
    rx.await.unwrap_or(Err(RedisError::Lost("dropped".into())))
}

async fn eval(client: &Client, script: Script, keys: &[&[u8]], args: &[&[u8]]) -> Reply {
    let (tx, rx) = oneshot::channel();
    client.eval(script, keys, args, Box::new(move |r| drop(tx.send(r))))?;
    rx.await.unwrap_or(Err(RedisError::Lost("dropped".into())))
}

/// One operation as the adapter sends it.
async fn op(client: &Client, kind: &str, n: u64) {
    let (stream, group) = ("bench", "g");
    let items = scripts::items_key(stream, group);
    let seq = scripts::seq_key(stream, group);
    let groups = scripts::groups_key(stream);
    let channel = scripts::channel(stream, group);
    let keys: [&[u8]; 4] = [&items, &seq, &groups, scripts::STREAMS_KEY];
    let item = format!("i{}", n % 1000);
    let ts = "1700000000000";
    let result = match kind {
        "set" => eval(client, Script::Write, &keys, &[item.as_bytes(), b"any", b"", VALUE.as_bytes(), &channel, ts.as_bytes(), b"bench", b"g"]).await,
        "get" => call(client, &[b"HGET", &items, item.as_bytes()]).await,
        // update: read, then compare-and-set of the result (the ops themselves run in Rust).
        "update" => match call(client, &[b"HGET", &items, item.as_bytes()]).await {
            Ok(current) => {
                let expected = current.as_bytes().unwrap_or_default().to_vec();
                let mode: &[u8] = if current == Resp::Bulk(None) { b"0" } else { b"1" };
                eval(client, Script::Write, &keys, &[item.as_bytes(), mode, &expected, VALUE.as_bytes(), &channel, ts.as_bytes(), b"bench", b"g"]).await
            }
            Err(e) => Err(e),
        },
        _ => call(client, &[b"HVALS", &scripts::items_key("bench", "list100")]).await,
    };
    if let Err(e) = result {
        panic!("{kind}: {e}");
    }
}

async fn measure(client: Rc<Client>, kind: &'static str, inflight: u64) -> f64 {
    let done = Rc::new(Cell::new(0u64));
    let started = Instant::now();
    let tasks: Vec<_> = (0..inflight)
        .map(|k| {
            let (client, done) = (client.clone(), done.clone());
            glommio::spawn_local(async move {
                let mut n = k;
                while started.elapsed() < RUN {
                    op(&client, kind, n).await;
                    n += inflight;
                    done.set(done.get() + 1);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await;
    }
    done.get() as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` / listing: nothing to run
    }
    let Some((_server, port)) = start_redis() else {
        println!("redis bench: SKIPPED: redis-server not found or did not start");
        return;
    };
    let url = RedisUrl::parse(&format!("redis://127.0.0.1:{port}")).expect("url");
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    glommio::LocalExecutorBuilder::default()
        .spawn(move || async move {
            let client = Client::commands(url, addr, "bench");
            client.start();
            while !client.is_live() {
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
            for n in 0..100 {
                let (k, v) = (format!("i{n}"), VALUE);
                call(&client, &[b"HSET", &scripts::items_key("bench", "list100"), k.as_bytes(), v.as_bytes()]).await.expect("fill");
            }
            println!("{:<34} {:>14}", "redis adapter (loopback)", "ops/s");
            for kind in ["set", "get", "update", "list"] {
                for inflight in [1, 64] {
                    let rate = measure(client.clone(), kind, inflight).await;
                    let label = if kind == "list" { "list (100 items)".to_string() } else { kind.to_string() };
                    println!("{:<34} {:>14.0}", format!("{label}, {inflight} in flight"), rate);
                }
            }
            client.stop();
        })
        .expect("executor")
        .join()
        .expect("bench run");
}
