//! The built-in queue on the control core: `TriggerAction.Enqueue` calls that no worker's
//! `engine::queue::enqueue` takes go to the shard that owns the queue (see
//! `ringcast_shards::queue`), which stores and delivers them. The control core only forwards:
//! enqueues and dead-letter requests to that shard, its deliveries to the function's worker,
//! and each outcome back. Also the `iii::queue::*` redrive functions and the
//! `engine::queue::*` listings of the reference's queue module.

pub mod config;

use crate::control::engine::Engine;
use crate::control::functions::{decode_input, reply_now, BuiltinReply};
use crate::control::invocations::{Call, Outcome, Reply};
use crate::control::wire::{ErrorBody, Payload};
use futures_channel::{mpsc, oneshot};
use futures_util::StreamExt;
use ringcast_shards::queue::{queue_shard, CallOutcome, NewMessage, QueueCall, QueueMsg, QueueSender};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

/// The shards' queue inboxes, as the control core reaches them.
pub struct QueueService {
    shards: Vec<QueueSender>,
}

impl QueueService {
    pub fn new(shards: Vec<QueueSender>) -> QueueService {
        QueueService { shards }
    }

    /// Sends `msg` to the shard owning `queue`; `false` when that shard is gone.
    fn send(&self, queue: &str, msg: QueueMsg) -> bool {
        match self.shards.get(queue_shard(queue, self.shards.len())) {
            Some(inbox) => inbox.unbounded_send(msg).is_ok(),
            None => false,
        }
    }
}

type QueueFn = fn(&Rc<QueueService>, &mut Engine, Value) -> BuiltinReply;

const FUNCTIONS: &[(&str, &str, QueueFn)] = &[
    ("iii::queue::redrive", "Moves every dead-lettered message of a queue back to it", redrive_all),
    ("iii::queue::redrive_message", "Moves one dead-lettered message, by id, back to its queue", redrive_message),
    ("iii::queue::discard_message", "Deletes one dead-lettered message by id", discard_message),
    ("engine::queue::dlq_messages", "Lists a queue's dead-lettered messages", dlq_messages),
    ("engine::queue::list_topics", "Lists the queues with their depth, in-flight and dead-letter counts", list_topics),
];

/// Registers the queue functions and makes `service` the engine's built-in queue.
pub fn install(engine: &mut Engine, service: QueueService) {
    let service = Rc::new(service);
    for (id, description, run) in FUNCTIONS {
        let (service, run) = (service.clone(), *run);
        engine.register_builtin(id, description, Rc::new(move |engine: &mut Engine, data: Value| run(&service, engine, data)));
    }
    engine.set_builtin_queue(service);
}

/// An enqueue that no worker's `engine::queue::enqueue` takes: stored by the queue's shard,
/// answered with the receipt once stored.
pub fn enqueue(service: &QueueService, engine: &mut Engine, message: NewMessage, reply: Reply) {
    let (tx, rx) = oneshot::channel();
    let receipt = message.id.clone();
    let queue = message.queue.clone();
    if !service.send(&queue, QueueMsg::Enqueue { message, reply: tx }) {
        engine.complete(reply, Err(ErrorBody::new("enqueue_error", "the queue's shard is gone")), None, None);
        return;
    }
    let weak = engine.weak_self();
    engine.spawn(async move {
        let outcome = match rx.await {
            Ok(Ok(())) => Ok(Some(json!({ "messageReceiptId": receipt }))),
            Ok(Err(e)) => Err(ErrorBody::new("enqueue_error", format!("cannot enqueue to queue {queue:?}: {e}"))),
            Err(_) => Err(ErrorBody::new("enqueue_error", "the queue's shard is gone")),
        };
        if let Some(engine) = weak.upgrade() {
            engine.borrow_mut().complete(reply, outcome, None, None);
        }
    });
}

/// What a delivery's outcome means for the queue.
fn call_outcome(outcome: Outcome) -> CallOutcome {
    match outcome {
        Ok(_) => CallOutcome::Done,
        // No worker has the function, or its worker left during the call: wait for one.
        Err(e) if matches!(e.code.as_str(), "function_not_found" | "invocation_stopped" | "channel_send_failed") => CallOutcome::NoOwner,
        Err(e) if e.code == "engine_shutdown" => CallOutcome::Shutdown,
        Err(e) => CallOutcome::Failed(e.code, e.message),
    }
}

/// Runs the shards' deliveries: each is an ordinary engine-internal call of the function,
/// whose outcome goes back to the shard.
pub async fn serve_calls(engine: Rc<RefCell<Engine>>, calls: mpsc::UnboundedReceiver<QueueCall>) {
    let mut calls = calls;
    while let Some(call) = calls.next().await {
        let QueueCall { queue: _, namespace, function_id, data, traceparent, baggage, reply } = call;
        let data = match RawValue::from_string(data.to_string()) {
            Ok(raw) => Payload::Raw(raw),
            Err(e) => {
                let _ = reply.send(CallOutcome::Failed("invalid_payload".into(), format!("stored payload is not JSON: {e}")));
                continue;
            }
        };
        let (tx, rx) = oneshot::channel();
        let call = Call { namespace, function_id, data, metadata: None, traceparent, baggage, forward_id: None };
        engine.borrow_mut().invoke(call, Reply::Internal(tx));
        ringcast_shards::runtime::spawn_deferred(async move {
            let outcome = rx.await.map_or(CallOutcome::Shutdown, call_outcome);
            let _ = reply.send(outcome);
        });
    }
}

#[derive(Deserialize)]
struct QueueInput {
    queue: String,
}

#[derive(Deserialize)]
struct MessageInput {
    queue: String,
    message_id: String,
}

fn required(code: &str, what: &str) -> BuiltinReply {
    reply_now(Err(ErrorBody::new(code, format!("{what} is required"))))
}

/// Sends a request to the queue's shard and answers with `answer` of its reply.
fn ask<T: 'static>(
    service: &QueueService,
    queue: &str,
    msg: impl FnOnce(oneshot::Sender<T>) -> QueueMsg,
    answer: impl FnOnce(T) -> Outcome + 'static,
) -> BuiltinReply {
    let (tx, rx) = oneshot::channel();
    if !service.send(queue, msg(tx)) {
        return reply_now(Err(ErrorBody::new("queue_unavailable", "the queue's shard is gone")));
    }
    BuiltinReply::Later(Box::pin(async move {
        match rx.await {
            Ok(reply) => answer(reply),
            Err(_) => Err(ErrorBody::new("queue_unavailable", "the queue's shard is gone")),
        }
    }))
}

fn redrive_all(service: &Rc<QueueService>, _: &mut Engine, data: Value) -> BuiltinReply {
    let input: QueueInput = match decode_input("iii::queue::redrive", data) {
        Ok(i) => i,
        Err(e) => return reply_now(Err(e)),
    };
    if input.queue.is_empty() {
        return required("queue_not_set", "queue");
    }
    let queue = input.queue.clone();
    ask(service, &input.queue, |reply| QueueMsg::Redrive { queue: input.queue.clone(), id: None, reply }, move |r: Result<u64, String>| {
        r.map(|n| Some(json!({ "queue": queue, "redriven": n })))
            .map_err(|e| ErrorBody::new("redrive_failed", format!("Failed to redrive DLQ for queue '{queue}': {e}")))
    })
}

fn redrive_message(service: &Rc<QueueService>, _: &mut Engine, data: Value) -> BuiltinReply {
    let input: MessageInput = match decode_input("iii::queue::redrive_message", data) {
        Ok(i) => i,
        Err(e) => return reply_now(Err(e)),
    };
    if input.queue.is_empty() {
        return required("queue_not_set", "queue");
    }
    if input.message_id.is_empty() {
        return required("message_id_not_set", "message_id");
    }
    let (queue, id) = (input.queue.clone(), input.message_id.clone());
    ask(service, &queue.clone(), |reply| QueueMsg::Redrive { queue: input.queue, id: Some(input.message_id), reply }, move |r: Result<u64, String>| {
        r.map(|n| Some(json!({ "queue": queue, "message_id": id, "redriven": n })))
            .map_err(|e| ErrorBody::new("redrive_message_failed", format!("Failed to redrive DLQ message '{id}' for queue '{queue}': {e}")))
    })
}

fn discard_message(service: &Rc<QueueService>, _: &mut Engine, data: Value) -> BuiltinReply {
    let input: MessageInput = match decode_input("iii::queue::discard_message", data) {
        Ok(i) => i,
        Err(e) => return reply_now(Err(e)),
    };
    if input.queue.is_empty() {
        return required("queue_not_set", "queue");
    }
    if input.message_id.is_empty() {
        return required("message_id_not_set", "message_id");
    }
    let (queue, id) = (input.queue.clone(), input.message_id.clone());
    ask(service, &queue.clone(), |reply| QueueMsg::Discard { queue: input.queue, id: input.message_id, reply }, move |r: Result<u64, String>| {
        r.map(|n| Some(json!({ "queue": queue, "message_id": id, "redriven": n, "discarded": n })))
            .map_err(|e| ErrorBody::new("discard_message_failed", format!("Failed to discard DLQ message: {e}")))
    })
}

#[derive(Deserialize)]
struct DlqInput {
    topic: String,
    offset: Option<u64>,
    limit: Option<u64>,
}

fn dlq_messages(service: &Rc<QueueService>, _: &mut Engine, data: Value) -> BuiltinReply {
    let input: DlqInput = match decode_input("engine::queue::dlq_messages", data) {
        Ok(i) => i,
        Err(e) => return reply_now(Err(e)),
    };
    if input.topic.is_empty() {
        return required("topic_required", "topic");
    }
    let offset = usize::try_from(input.offset.unwrap_or(0)).unwrap_or(usize::MAX);
    let limit = usize::try_from(input.limit.unwrap_or(50).min(1000)).unwrap_or(1000);
    ask(service, &input.topic, |reply| QueueMsg::DeadLetters { queue: input.topic.clone(), offset, limit, reply }, |list: Vec<Value>| {
        Ok(Some(Value::Array(list)))
    })
}

fn list_topics(service: &Rc<QueueService>, _: &mut Engine, _: Value) -> BuiltinReply {
    let replies: Vec<_> = service
        .shards
        .iter()
        .filter_map(|inbox| {
            let (tx, rx) = oneshot::channel();
            inbox.unbounded_send(QueueMsg::Stats { reply: tx }).ok().map(|()| rx)
        })
        .collect();
    BuiltinReply::Later(Box::pin(async move {
        let mut topics = Vec::new();
        for rx in replies {
            for s in rx.await.unwrap_or_default() {
                topics.push(json!({
                    "name": s["queue"],
                    "broker_type": "function_queue",
                    "subscriber_count": s["concurrency"],
                    "depth": s["depth"],
                    "in_flight": s["in_flight"],
                    "dead_letters": s["dead_letters"],
                }));
            }
        }
        topics.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        Ok(Some(Value::Array(topics)))
    }))
}

/// A new message's payload text: the caller's data as it arrived.
pub fn payload_text(data: &Payload) -> Arc<str> {
    match data {
        Payload::Raw(raw) => Arc::from(raw.get()),
        Payload::Value(v) => Arc::from(v.to_string()),
    }
}
