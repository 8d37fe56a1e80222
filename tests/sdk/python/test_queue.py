"""The built-in queue through the official Python SDK: TriggerAction.Enqueue(queue=...) gets a
receipt once the message is stored; the function runs every message in order on a
concurrency-1 queue, and a failing handler is retried, then dead-lettered and redriven by id."""

from __future__ import annotations

import re
import threading

import pytest
from iii import TriggerAction

from conftest import call_when_registered, wait_until

QUEUES = (
    "  - name: iii-queue\n"
    "    config:\n"
    "      queue_configs:\n"
    "        orders: {concurrency: 1}\n"
    "        flaky: {concurrency: 1, max_retries: 2, backoff_ms: 30}\n"
)
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


@pytest.mark.engine(extra_yaml=QUEUES)
def test_enqueue_returns_a_receipt_and_delivers_in_order(make_worker):
    producer = make_worker("producer")
    consumer = make_worker("consumer")
    seen: list = []
    lock = threading.Lock()

    def process(data):
        with lock:
            seen.append(data)
        return {"ok": True}

    consumer.register_function("orders::process", process)
    call_when_registered(producer, "orders::process", {"probe": True})
    seen.clear()
    receipts = []
    for i in range(15):
        r = producer.trigger(
            {"function_id": "orders::process", "payload": {"orderId": i}, "action": TriggerAction.Enqueue(queue="orders")}
        )
        assert UUID.match(r["messageReceiptId"]), r
        receipts.append(r["messageReceiptId"])
    assert len(set(receipts)) == 15
    wait_until(lambda: len(seen) == 15, timeout=10, what="15 deliveries")
    assert seen == [{"orderId": i} for i in range(15)]


@pytest.mark.engine(extra_yaml=QUEUES)
def test_a_failing_handler_is_dead_lettered_and_redriven_by_id(make_worker):
    producer = make_worker("producer")
    consumer = make_worker("consumer")
    attempts: list = []
    healthy = threading.Event()

    def flaky(data):
        attempts.append(data)
        if not healthy.is_set():
            raise RuntimeError("downstream is down")
        return "ok"

    consumer.register_function("jobs::flaky", flaky)
    call_when_registered(producer, "engine::queue::dlq_messages", {"topic": "flaky"})
    r = producer.trigger({"function_id": "jobs::flaky", "payload": {"job": 7}, "action": TriggerAction.Enqueue(queue="flaky")})
    receipt = r["messageReceiptId"]

    def dead():
        return producer.trigger({"function_id": "engine::queue::dlq_messages", "payload": {"topic": "flaky"}})

    wait_until(lambda: len(dead()) == 1, timeout=10, what="the dead letter")
    letter = dead()[0]
    assert letter["id"] == receipt
    assert letter["attempts"] == 2 and len(attempts) == 2
    assert "downstream is down" in letter["error"]

    healthy.set()
    r = producer.trigger({"function_id": "iii::queue::redrive_message", "payload": {"queue": "flaky", "message_id": receipt}})
    assert r == {"queue": "flaky", "message_id": receipt, "redriven": 1}
    wait_until(lambda: len(attempts) == 3, timeout=10, what="the redriven delivery")
    assert attempts[-1] == {"job": 7}
    assert dead() == []
