"""Frame-level checks with a raw WebSocket client next to SDK workers (spec §1.5, §3.6, §4.5)."""

from __future__ import annotations

import json
import threading
import time
import uuid

from websockets.sync.client import connect

from conftest import call_when_registered


class RawClient:
    def __init__(self, url: str) -> None:
        self.ws = connect(url, max_size=64 * 1024 * 1024, open_timeout=5)
        self.frames: list[dict] = []

    def send(self, msg: dict) -> None:
        self.ws.send(json.dumps(msg))

    def recv(self, timeout: float) -> dict:
        raw = self.ws.recv(timeout=timeout)
        assert isinstance(raw, str), f"engine sent a binary frame: {raw[:80]!r}"
        frame = json.loads(raw)
        self.frames.append(frame)
        return frame

    def recv_until(self, pred, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no matching frame within {timeout}s; got {self.frames!r}")
            try:
                frame = self.recv(remaining)
            except TimeoutError:
                continue
            if pred(frame):
                return frame

    def close(self) -> None:
        self.ws.close()


def _is_uuid(value) -> bool:
    try:
        return str(uuid.UUID(value)) == value
    except (TypeError, ValueError):
        return False


def test_first_frame_is_workerregistered(engine):
    raw = RawClient(engine.url)
    try:
        first = raw.recv(timeout=5)
        assert first.get("type") == "workerregistered", first
        assert _is_uuid(first.get("worker_id")), first
        assert _is_uuid(first.get("reattach_token")), first
    finally:
        raw.close()


def test_void_call_produces_no_invocationresult(engine, make_worker):
    b = make_worker("b")
    ran = threading.Event()
    seen: list = []

    def sink(data):
        seen.append(data)
        ran.set()
        return "ignored"

    b.register_function("b::sink", sink)
    b.register_function("b::ping", lambda data: "pong")
    a = make_worker("a")
    call_when_registered(a, "b::ping")

    raw = RawClient(engine.url)
    try:
        hello = raw.recv(timeout=5)
        assert hello.get("type") == "workerregistered", hello
        raw.send({"type": "invokefunction", "function_id": "b::sink", "data": {"token": "raw-void"},
                  "action": {"type": "void"}})
        # Void to a function nobody registered: silently dropped, no reply either.
        raw.send({"type": "invokefunction", "function_id": "nobody::home", "data": {},
                  "action": {"type": "void"}})
        assert ran.wait(5.0), "void call never reached the target handler"
        assert seen[0]["token"] == "raw-void"

        # Barrier: a synchronous call to the same owner, answered after the void one ran.
        inv = str(uuid.uuid4())
        raw.send({"type": "invokefunction", "invocation_id": inv, "function_id": "b::ping", "data": None})
        reply = raw.recv_until(lambda f: f.get("type") == "invocationresult" and f.get("invocation_id") == inv, 5)
        assert reply.get("result") == "pong", reply
        assert reply.get("function_id") == "b::ping", reply
        results = [f for f in raw.frames if f.get("type") == "invocationresult"]
        assert results == [reply], f"unexpected extra frames for void calls: {results!r}"
    finally:
        raw.close()


def test_missing_data_key_is_null(engine, make_worker):
    b = make_worker("b")
    seen: list = []

    def probe(data):
        seen.append(data)
        return {"was_none": data is None}

    b.register_function("b::probe", probe)
    b.register_function("b::ping", lambda data: "pong")
    a = make_worker("a")
    call_when_registered(a, "b::ping")

    raw = RawClient(engine.url)
    try:
        raw.recv(timeout=5)
        inv = str(uuid.uuid4())
        raw.send({"type": "invokefunction", "invocation_id": inv, "function_id": "b::probe"})
        reply = raw.recv_until(lambda f: f.get("type") == "invocationresult" and f.get("invocation_id") == inv, 5)
        assert reply.get("result") == {"was_none": True}, reply
        assert "error" not in reply or not reply["error"], reply
        assert seen == [None]
    finally:
        raw.close()
