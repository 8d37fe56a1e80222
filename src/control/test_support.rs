//! In-process harness for unit tests of the control core (no sockets): an engine on a glommio
//! executor, fake workers whose outbox is a channel the test reads, and worker frames fed in as
//! JSON through the real decoder.

use super::engine::Engine;
use super::outbox::{OutFrame, Outbox};
use super::wire;
use super::workers::WorkerConnId;
use crate::config::WorkerManagerConfig;
use futures_channel::mpsc::{unbounded, UnboundedReceiver};
use serde_json::Value;
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

/// Runs `test` on a fresh glommio executor (the engine spawns tasks on it).
pub(crate) fn on_executor<F: std::future::Future<Output = ()> + 'static>(test: impl FnOnce() -> F + 'static) {
    glommio::LocalExecutorBuilder::default().make().expect("a test executor").run(async move { test().await });
}

/// An engine with the engine's own builtins installed, as the boot code installs them.
pub(crate) fn engine() -> Rc<RefCell<Engine>> {
    let engine = Engine::new(WorkerManagerConfig::default(), crate::metrics::Metrics::new(1));
    super::builtins::install(&mut engine.borrow_mut());
    engine
}

/// Lets spawned tasks (deferred builtin answers, trigger fires) run.
pub(crate) async fn settle() {
    glommio::timer::sleep(Duration::from_millis(5)).await;
}

/// A worker connection whose outbound frames the test reads.
pub(crate) struct FakeWorker {
    pub conn: WorkerConnId,
    pub worker_id: String,
    outbox: Rc<Outbox>,
    frames: UnboundedReceiver<OutFrame>,
}

impl FakeWorker {
    /// Connects a worker and takes its `workerregistered` frame.
    pub fn connect(engine: &Rc<RefCell<Engine>>) -> FakeWorker {
        let (tx, frames) = unbounded();
        let outbox = Rc::new(Outbox::new(tx, 1 << 20));
        let conn = engine.borrow_mut().connect(outbox.clone(), "127.0.0.1".into());
        let mut worker = FakeWorker { conn, worker_id: String::new(), outbox, frames };
        let registered = worker.next("workerregistered");
        worker.worker_id = registered["worker_id"].as_str().unwrap_or_default().to_string();
        worker
    }

    /// Feeds one frame from this worker to the engine, through the real decoder.
    pub fn send(&self, engine: &Rc<RefCell<Engine>>, frame: Value) {
        let message = wire::decode(frame.to_string().as_bytes(), 64).expect("a well-formed test frame");
        engine.borrow_mut().handle(self.conn, message);
    }

    /// Every text frame queued so far, decoded.
    pub fn drain(&mut self) -> Vec<Value> {
        let mut out = Vec::new();
        while let Ok(frame) = self.frames.try_recv() {
            if let OutFrame::Text(text) = frame {
                self.outbox.taken(text.len());
                out.push(serde_json::from_str(&text).expect("the engine sends JSON"));
            }
        }
        out
    }

    /// The next queued text frame, which must be of type `kind`.
    pub fn next(&mut self, kind: &str) -> Value {
        let frames = self.drain();
        let [frame] = &frames[..] else { panic!("expected one {kind} frame, got {frames:?}") };
        assert_eq!(frame["type"], kind, "{frame}");
        frame.clone()
    }

    /// Registers function `id` from this worker.
    pub fn register_function(&mut self, engine: &Rc<RefCell<Engine>>, id: &str) {
        self.send(engine, serde_json::json!({ "type": "registerfunction", "id": id }));
    }

    /// Answers an `invokefunction` this worker got with `result`.
    pub fn answer(&self, engine: &Rc<RefCell<Engine>>, invocation: &Value, result: Value) {
        self.send(
            engine,
            serde_json::json!({
                "type": "invocationresult",
                "invocation_id": invocation["invocation_id"],
                "function_id": invocation["function_id"],
                "result": result,
            }),
        );
    }
}
