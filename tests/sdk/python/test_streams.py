"""iii-stream through the Python SDK and a raw subscriber WebSocket (spec stream.md §1–§4)."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from typing import Any, Callable

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from iii import InvocationError

from conftest import call_when_registered

DOC_URL = "https://iii.dev/docs/workers/iii-state#error-codes"
FRAME_KEYS = {"type", "timestamp", "streamName", "groupId", "id", "event"}
U1 = {"userId": "u1"}
_MISSING = object()

pytestmark = pytest.mark.timeout(30)


# --- helpers ---------------------------------------------------------------------------------


def now_ms() -> int:
    return int(time.time() * 1000)


def call(worker, fn: str, payload: Any) -> Any:
    return worker.trigger({"function_id": f"stream::{fn}", "payload": payload, "timeout_ms": 5000})


def barrier(worker) -> None:
    """Frames of one worker are applied in order: once this function answers, every
    registration the worker sent before it has been applied."""
    fid = f"ready::{uuid.uuid4().hex[:8]}"
    worker.register_function(fid, lambda data: "ready")
    assert call_when_registered(worker, fid) == "ready"


class Recorder:
    """A function whose invocations are recorded; ``next(pred)`` waits for a matching one."""

    def __init__(self, worker, function_id: str, reply: Callable[[Any], Any] = lambda d: {"ok": True}) -> None:
        self.function_id = function_id
        self.calls: list[Any] = []
        self._cv = threading.Condition()

        def handler(data):
            with self._cv:
                self.calls.append(data)
                self._cv.notify_all()
            return reply(data)

        worker.register_function(function_id, handler)

    def snapshot(self) -> list[Any]:
        with self._cv:
            return list(self.calls)

    def next(self, pred: Callable[[Any], bool] = lambda p: True, timeout: float = 5.0, what: str | None = None) -> Any:
        def hit():
            return next((c for c in self.calls if pred(c)), None)

        with self._cv:
            if not self._cv.wait_for(lambda: hit() is not None, timeout):
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what or 'a call of ' + self.function_id}; "
                    f"calls so far: {json.dumps(self.calls)[-1500:]}"
                )
            return hit()


class StreamSub:
    """Raw subscriber connection (websockets sync client); frames are kept in order."""

    def __init__(self, url: str, label: str = "subscriber", subprotocols: list[str] | None = None) -> None:
        self.label = label
        self.url = url
        self.frames: list[Any] = []
        self.binary_frames = 0
        self.closed = False
        self.ws = connect(url, subprotocols=subprotocols, open_timeout=5, proxy=None, close_timeout=2)

    def send(self, obj: Any) -> None:
        self.ws.send(json.dumps(obj))

    def join(self, stream: str, group: str, item: Any = _MISSING, sub_id: str | None = None) -> str:
        sub_id = sub_id or str(uuid.uuid4())
        data = {"subscriptionId": sub_id, "streamName": stream, "groupId": group}
        if item is not _MISSING:
            data["id"] = item
        self.send({"type": "join", "data": data})
        return sub_id

    def leave(self, sub_id: str, stream: str, group: str) -> None:
        self.send({"type": "leave", "data": {"subscriptionId": sub_id, "streamName": stream, "groupId": group}})

    def wait_for(self, pred: Callable[[Any], bool], timeout: float = 5.0, what: str = "frame") -> Any:
        for f in self.frames:
            if pred(f):
                return f
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"{self.label}: timed out after {timeout}s waiting for {what}; "
                    f"frames so far: {json.dumps(self.frames)[-1500:]}"
                )
            try:
                raw = self.ws.recv(timeout=remaining)
            except TimeoutError:
                continue
            if isinstance(raw, bytes):
                self.binary_frames += 1
                raw = raw.decode()
            try:
                msg = json.loads(raw)
            except ValueError:
                msg = {"__unparsed": raw}
            self.frames.append(msg)
            if pred(msg):
                return msg

    def wait_sync(self, stream: str, group: str, item: Any = None, timeout: float = 5.0) -> Any:
        return self.wait_for(
            lambda f: isinstance(f, dict)
            and (f.get("event") or {}).get("type") == "sync"
            and f.get("streamName") == stream
            and f.get("groupId") == group
            and f.get("id") == item,
            timeout,
            f"sync frame for {stream}/{group}/{item}",
        )

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.ws.close()
            except Exception:  # noqa: BLE001
                pass

    def drop(self) -> None:
        """End the TCP connection without a WebSocket close handshake."""
        self.closed = True
        try:
            self.ws.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.ws.socket.close()
        except OSError:
            pass


@pytest.fixture
def subscribe(request):
    subs: list[StreamSub] = []
    request.node._ringcast_stream_subs = subs  # reported by conftest on failure

    def make(engine, path: str = "/", label: str = "subscriber", subprotocols: list[str] | None = None) -> StreamSub:
        s = StreamSub(f"{engine.stream_url}{path}", label=label, subprotocols=subprotocols)
        subs.append(s)
        return s

    yield make
    for s in subs:
        s.close()


def assert_frame(frame: Any, expected: dict, not_before: int | None = None, what: str = "frame") -> None:
    """Exact §1.5 frame: keys, type "stream", integer epoch-ms timestamp, the rest equal."""
    assert isinstance(frame, dict), f"{what}: not an object: {frame!r}"
    assert set(frame) == FRAME_KEYS, f"{what}: keys of {frame}"
    ts = frame["timestamp"]
    assert isinstance(ts, int) and not isinstance(ts, bool), f"{what}: timestamp not an integer: {ts!r}"
    now = now_ms()
    lo = (not_before if not_before is not None else now - 60_000) - 1000
    assert lo <= ts <= now + 1000, f"{what}: timestamp {ts} is not epoch milliseconds in [{lo}, {now + 1000}]"
    rest = {k: v for k, v in frame.items() if k != "timestamp"}
    assert rest == {"type": "stream", **expected}, f"{what}: {frame}"


def ev(frame: Any) -> dict:
    return (frame.get("event") or {}) if isinstance(frame, dict) else {}


# --- 1. stream functions through trigger() -----------------------------------------------------


@pytest.mark.engine(shards=2)
def test_stream_functions_through_trigger(make_worker):
    w = make_worker("fn")
    m1 = {"id": "m1", "text": "hi"}
    m1b = {"id": "m1", "text": "edited"}
    m1c = {"id": "m1", "text": "edited again"}
    m2 = {"id": "m2", "text": "yo"}
    m0 = {"id": "m0", "text": "last"}
    k = {"stream_name": "chat", "group_id": "room-1"}

    assert call(w, "set", {**k, "item_id": "m1", "data": m1}) == {"old_value": None, "new_value": m1}
    assert call(w, "set", {**k, "item_id": "m1", "data": m1b}) == {"old_value": m1, "new_value": m1b}
    call(w, "set", {**k, "item_id": "m2", "data": m2})
    call(w, "set", {**k, "item_id": "m0", "data": m0})
    # Overwriting keeps the item's position.
    assert call(w, "set", {**k, "item_id": "m1", "data": m1c}) == {"old_value": m1b, "new_value": m1c}
    assert call(w, "set", {"stream_name": "chat", "group_id": "room-2", "item_id": "num", "data": 42}) == {
        "old_value": None,
        "new_value": 42,
    }
    call(w, "set", {"stream_name": "ns", "group_id": "a", "item_id": "x", "data": {"v": 1}})
    call(w, "set", {"stream_name": "ns:feed", "group_id": "g1", "item_id": "y", "data": {"v": 2}})

    # get: bare value; missing → None.
    assert call(w, "get", {**k, "item_id": "m1"}) == m1c
    assert call(w, "get", {"stream_name": "chat", "group_id": "room-2", "item_id": "num"}) == 42
    assert call(w, "get", {"stream_name": "ns:feed", "group_id": "g1", "item_id": "y"}) == {"v": 2}
    assert call(w, "get", {**k, "item_id": "nope"}) is None

    # list: bare array in insertion order; missing group → [].
    assert call(w, "list", k) == [m1c, m2, m0]
    assert call(w, "list", {"stream_name": "chat", "group_id": "no-such-group"}) == []

    # list_groups: bare array, order unspecified; no prefix bleed between 'ns' and 'ns:feed'.
    groups = call(w, "list_groups", {"stream_name": "chat"})
    assert isinstance(groups, list) and sorted(groups) == ["room-1", "room-2"], groups
    assert call(w, "list_groups", {"stream_name": "ns"}) == ["a"]
    assert call(w, "list_groups", {"stream_name": "ns:feed"}) == ["g1"]
    assert call(w, "list_groups", {"stream_name": "nothing-here"}) == []

    # delete: {old_value}; deleting again finds nothing.
    assert call(w, "delete", {**k, "item_id": "m2"}) == {"old_value": m2}
    assert call(w, "delete", {**k, "item_id": "m2"}) == {"old_value": None}
    assert call(w, "list", k) == [m1c, m0]

    # Emptied groups disappear.
    assert call(w, "delete", {"stream_name": "chat", "group_id": "room-2", "item_id": "num"}) == {"old_value": 42}
    assert call(w, "list_groups", {"stream_name": "chat"}) == ["room-1"]

    # send: null result; nothing stored.
    assert call(w, "send", {"stream_name": "ephemeral", "group_id": "g", "type": "typing", "data": {"user": "al"}}) is None

    assert call(w, "list_all", {}) == {
        "stream": [
            {"id": "chat", "groups": ["room-1"]},
            {"id": "ns", "groups": ["a"]},
            {"id": "ns:feed", "groups": ["g1"]},
        ],
        "count": 3,
    }


@pytest.mark.engine(shards=2)
def test_stream_update_ops_and_errors(make_worker):
    w = make_worker("upd")
    key = {"stream_name": "counters", "group_id": "g", "item_id": "c1"}
    call(w, "set", {**key, "data": {"count": 1, "name": "c"}})
    res = call(
        w,
        "update",
        {
            **key,
            "ops": [
                {"type": "increment", "path": "count", "by": 1},
                {"type": "set", "path": "__proto__", "value": 1},
                {"type": "merge", "path": ["meta", "last"], "value": {"by": "alice"}},
                {"type": "append", "path": "log", "value": "x"},
                {"type": "decrement", "path": "name", "by": 2},
            ],
        },
    )
    expected_new = {"count": 2, "name": "c", "log": "x", "meta": {"last": {"by": "alice"}}}
    assert set(res) == {"old_value", "new_value", "errors"}, res
    assert res["old_value"] == {"count": 1, "name": "c"}
    assert res["new_value"] == expected_new
    errors = res["errors"]
    assert isinstance(errors, list) and len(errors) == 2, errors
    for e in errors:
        assert set(e) == {"op_index", "code", "message", "doc_url"}, e
        assert e["doc_url"] == DOC_URL
        assert isinstance(e["message"], str) and e["message"]
    assert errors[0]["op_index"] == 1 and errors[0]["code"] == "set.path.proto_polluted"
    assert "__proto__" in errors[0]["message"]
    assert errors[1]["op_index"] == 4 and errors[1]["code"] == "decrement.not_number"
    assert call(w, "get", key) == expected_new

    created = call(
        w, "update", {"stream_name": "counters", "group_id": "g", "item_id": "c2", "ops": [{"type": "increment", "path": "n", "by": 5}]}
    )
    assert created == {"old_value": None, "new_value": {"n": 5}}

    with pytest.raises(InvocationError) as info:
        call(w, "update", {**key, "ops": [{"type": "increment", "path": "count", "by": 1.5}]})
    assert info.value.code == "deserialization_error", f"{info.value.code}: {info.value.message}"
    assert call(w, "get", key) == expected_new


# --- 2. raw subscriber frames ------------------------------------------------------------------


@pytest.mark.engine(shards=2)
def test_group_subscriber_sync_then_live_frames(engine, make_worker, subscribe):
    w = make_worker("ws")
    s, g = "chat-ws", f"room-{uuid.uuid4().hex[:8]}"
    a1, a2 = {"id": "a1", "text": "first"}, {"id": "a2", "text": "second"}
    call(w, "set", {"stream_name": s, "group_id": g, "item_id": "a1", "data": a1})
    call(w, "set", {"stream_name": s, "group_id": g, "item_id": "a2", "data": a2})

    c = subscribe(engine, label="group-sub")
    t0 = now_ms()
    c.join(s, g)
    sync = c.wait_sync(s, g)
    assert c.frames[0] is sync, f"the sync frame must come first: {c.frames}"
    assert_frame(sync, {"streamName": s, "groupId": g, "id": None, "event": {"type": "sync", "data": [a1, a2]}}, t0, "sync")

    x1, x2 = {"id": "x", "text": "new"}, {"id": "x", "text": "edited"}
    t1 = now_ms()
    base = {"stream_name": s, "group_id": g}
    call(w, "set", {**base, "item_id": "x", "data": x1})
    call(w, "set", {**base, "item_id": "x", "data": x2})
    call(w, "send", {**base, "type": "typing", "data": {"user": "alice"}})
    call(w, "send", {**base, "type": "poke", "data": [1, 2], "id": "x"})
    call(w, "delete", {**base, "item_id": "x"})
    call(w, "delete", {**base, "item_id": "x"})  # nothing removed → no frame
    call(w, "update", {**base, "item_id": "u", "ops": [{"type": "set", "path": "k", "value": 1}]})
    call(w, "update", {**base, "item_id": "u", "ops": [{"type": "increment", "path": "k", "by": 2}]})
    call(w, "set", {**base, "item_id": "end", "data": "end"})
    c.wait_for(lambda f: f.get("id") == "end", 5.0, 'the create frame of item "end"')

    expected = [
        {"id": "x", "event": {"type": "create", "data": x1}},
        {"id": "x", "event": {"type": "update", "data": x2}},
        {"id": None, "event": {"type": "event", "event": {"type": "typing", "data": {"user": "alice"}}}},
        {"id": "x", "event": {"type": "event", "event": {"type": "poke", "data": [1, 2]}}},
        {"id": "x", "event": {"type": "delete", "data": x2}},
        {"id": "u", "event": {"type": "create", "data": {"k": 1}}},
        {"id": "u", "event": {"type": "update", "data": {"k": 3}}},
        {"id": "end", "event": {"type": "create", "data": "end"}},
    ]
    live = c.frames[1:]
    assert len(live) == len(expected), f"live frames: {live}"
    prev = sync["timestamp"]
    for i, (f, exp) in enumerate(zip(live, expected)):
        assert_frame(f, {"streamName": s, "groupId": g, **exp}, t1, f"live frame #{i}")
        assert f["timestamp"] >= prev, f"timestamps must not go backwards: {live}"
        prev = f["timestamp"]
    assert c.binary_frames == 0, "frames must be text frames"


@pytest.mark.engine(shards=2)
def test_item_subscription_only_gets_its_item(engine, make_worker, subscribe):
    w = make_worker("item")
    s, g = "items", f"g-{uuid.uuid4().hex[:8]}"
    base = {"stream_name": s, "group_id": g}
    c = subscribe(engine, label="item-sub")
    t0 = now_ms()
    c.join(s, g, "it1")
    sync = c.wait_sync(s, g, "it1")
    assert_frame(sync, {"streamName": s, "groupId": g, "id": "it1", "event": {"type": "sync", "data": None}}, t0, "item sync")

    call(w, "set", {**base, "item_id": "other", "data": {"n": 0}})
    call(w, "set", {**base, "item_id": "it1", "data": {"n": 1}})
    call(w, "send", {**base, "type": "to-group", "data": 1})
    call(w, "send", {**base, "type": "to-other", "data": 2, "id": "other"})
    call(w, "send", {**base, "type": "to-it1", "data": 3, "id": "it1"})
    call(w, "set", {**base, "item_id": "other", "data": {"n": 10}})
    call(w, "delete", {**base, "item_id": "it1"})
    c.wait_for(lambda f: ev(f).get("type") == "delete", 5.0, "the delete frame of it1")

    live = c.frames[1:]
    expected = [
        {"event": {"type": "create", "data": {"n": 1}}},
        {"event": {"type": "event", "event": {"type": "to-it1", "data": 3}}},
        {"event": {"type": "delete", "data": {"n": 1}}},
    ]
    assert len(live) == len(expected), f"item subscriber got: {live}"
    for i, (f, exp) in enumerate(zip(live, expected)):
        assert_frame(f, {"streamName": s, "groupId": g, "id": "it1", **exp}, t0, f"item frame #{i}")

    c.join(s, g, "other")
    sync2 = c.wait_sync(s, g, "other")
    assert_frame(sync2, {"streamName": s, "groupId": g, "id": "other", "event": {"type": "sync", "data": {"n": 10}}}, t0, "item sync (existing)")


@pytest.mark.engine(shards=2)
def test_leave_stops_delivery(engine, make_worker, subscribe):
    w = make_worker("leave")
    s, g = "leaving", f"g-{uuid.uuid4().hex[:8]}"
    base = {"stream_name": s, "group_id": g}
    c1 = subscribe(engine, label="leaver")
    c2 = subscribe(engine, label="stayer")
    sub1 = c1.join(s, g)
    c2.join(s, g)
    c1.wait_sync(s, g)
    c2.wait_sync(s, g)
    call(w, "set", {**base, "item_id": "before", "data": 1})
    c1.wait_for(lambda f: f.get("id") == "before", 5.0, 'frame for "before" (c1)')
    c2.wait_for(lambda f: f.get("id") == "before", 5.0, 'frame for "before" (c2)')

    c1.leave(sub1, s, g)
    # One socket's frames are handled in order: this sync means the leave was processed.
    c1.join(s, g, "marker")
    c1.wait_sync(s, g, "marker")

    call(w, "set", {**base, "item_id": "after", "data": 2})
    call(w, "set", {**base, "item_id": "marker", "data": 3})
    c1.wait_for(lambda f: f.get("id") == "marker" and ev(f).get("type") == "create", 5.0, "marker create (c1)")
    c2.wait_for(lambda f: f.get("id") == "marker", 5.0, "marker create (c2)")
    assert any(f.get("id") == "after" for f in c2.frames), "the remaining group subscriber must get 'after'"
    assert [f for f in c1.frames if f.get("id") == "after"] == [], "frame for 'after' reached the connection that left"


# --- 3. stream triggers ------------------------------------------------------------------------


@pytest.mark.engine(shards=2)
def test_stream_triggers_payload_filters_and_condition(make_worker):
    w = make_worker("trig")
    s = f"trig-{uuid.uuid4().hex[:8]}"
    all_ = Recorder(w, "strig::all")
    g1 = Recorder(w, "strig::g1")
    item = Recorder(w, "strig::item")
    foreign = Recorder(w, "strig::foreign")
    conditional = Recorder(w, "strig::conditional")
    is_allowed = Recorder(w, "strig::is_allowed", lambda p: p.get("id") != "skip")
    w.register_trigger({"type": "stream", "function_id": "strig::all", "config": {"stream_name": s}})
    w.register_trigger({"type": "stream", "function_id": "strig::g1", "config": {"stream_name": s, "group_id": "g1"}})
    w.register_trigger({"type": "stream", "function_id": "strig::item", "config": {"stream_name": s, "item_id": "ok"}})
    w.register_trigger(
        {
            "type": "stream",
            "function_id": "strig::conditional",
            "config": {"stream_name": s, "condition_function_id": "strig::is_allowed"},
        }
    )
    w.register_trigger({"type": "stream", "function_id": "strig::foreign", "config": {"stream_name": f"{s}-other"}})
    barrier(w)

    t0 = now_ms()
    call(w, "set", {"stream_name": s, "group_id": "g1", "item_id": "skip", "data": {"v": "skip"}})
    call(w, "set", {"stream_name": s, "group_id": "g1", "item_id": "ok", "data": {"v": 1}})
    call(w, "set", {"stream_name": s, "group_id": "g2", "item_id": "other", "data": {"v": 2}})
    call(w, "send", {"stream_name": s, "group_id": "g2", "type": "ping", "data": {"p": True}})
    call(w, "set", {"stream_name": s, "group_id": "g1", "item_id": "ok", "data": {"v": 3}})

    created = all_.next(lambda p: p.get("id") == "ok" and ev(p).get("type") == "create")
    assert_frame(created, {"streamName": s, "groupId": "g1", "id": "ok", "event": {"type": "create", "data": {"v": 1}}}, t0, "payload (create)")
    updated = all_.next(lambda p: p.get("id") == "ok" and ev(p).get("type") == "update")
    assert_frame(updated, {"streamName": s, "groupId": "g1", "id": "ok", "event": {"type": "update", "data": {"v": 3}}}, t0, "payload (update)")
    sent = all_.next(lambda p: ev(p).get("type") == "event")
    assert_frame(
        sent,
        {"streamName": s, "groupId": "g2", "id": None, "event": {"type": "event", "event": {"type": "ping", "data": {"p": True}}}},
        t0,
        "payload (send)",
    )
    all_.next(lambda p: p.get("id") == "skip")
    all_.next(lambda p: p.get("id") == "other")

    cond_skip = is_allowed.next(lambda p: p.get("id") == "skip", what='the condition to be asked about "skip"')
    assert_frame(cond_skip, {"streamName": s, "groupId": "g1", "id": "skip", "event": {"type": "create", "data": {"v": "skip"}}}, t0, "condition payload")
    # Every expected invocation, awaited one by one (no ordering between events is assumed).
    conditional.next(lambda p: p.get("id") == "ok" and ev(p).get("type") == "create")
    conditional.next(lambda p: p.get("id") == "ok" and ev(p).get("type") == "update")
    conditional.next(lambda p: p.get("id") == "other")
    conditional.next(lambda p: ev(p).get("type") == "event")
    g1.next(lambda p: p.get("id") == "skip")
    g1.next(lambda p: p.get("id") == "ok" and ev(p).get("type") == "create")
    g1.next(lambda p: p.get("id") == "ok" and ev(p).get("type") == "update")
    item.next(lambda p: ev(p).get("type") == "create")
    item.next(lambda p: ev(p).get("type") == "update")

    # Settle on one more event that every trigger of the stream sees.
    call(w, "set", {"stream_name": s, "group_id": "g1", "item_id": "ok", "data": {"v": "final"}})
    final = lambda p: (ev(p).get("data") or {}).get("v") == "final"  # noqa: E731
    for r in (all_, g1, item, conditional):
        r.next(final, what=f"the final event at {r.function_id}")

    assert len(all_.snapshot()) == 6, all_.snapshot()
    assert sorted(p["id"] for p in g1.snapshot()) == ["ok", "ok", "ok", "skip"], g1.snapshot()
    assert all(p["groupId"] == "g1" for p in g1.snapshot())
    assert [p["id"] for p in item.snapshot()] == ["ok", "ok", "ok"], item.snapshot()
    assert [p for p in conditional.snapshot() if p.get("id") == "skip"] == [], "condition returned false but the handler ran"
    assert len(conditional.snapshot()) == 5, conditional.snapshot()
    assert foreign.snapshot() == [], "a trigger for another stream fired"


# --- 4. stream:join / stream:leave, auth --------------------------------------------------------


class AuthEnv:
    def __init__(self, engine, worker) -> None:
        self.engine = engine
        self.worker = worker
        self.auth = Recorder(
            worker,
            "sauth::check",
            lambda i: {"context": U1} if (i.get("query_params") or {}).get("token") == ["abc"] else {"note": "no context"},
        )
        self.joins = Recorder(
            worker, "sjoin::on_join", lambda p: {"unauthorized": True} if p.get("group_id") == "forbidden" else {"ok": True}
        )
        self.leaves = Recorder(worker, "sjoin::on_leave")
        worker.register_trigger({"type": "stream:join", "function_id": "sjoin::on_join", "config": {}})
        worker.register_trigger({"type": "stream:leave", "function_id": "sjoin::on_leave", "config": {}})
        barrier(worker)


@pytest.fixture
def auth_env(engine, make_worker) -> AuthEnv:
    return AuthEnv(engine, make_worker("auth"))


AUTH_ENGINE = pytest.mark.engine(stream_config={"auth_function": "sauth::check"})


@AUTH_ENGINE
def test_join_leave_triggers_with_auth_context_and_unauthorized(auth_env, subscribe):
    env = auth_env
    eng = env.engine
    c1 = subscribe(eng, "/?token=abc", label="auth-sub", subprotocols=["Authorization", "tok"])
    assert c1.ws.subprotocol == "Authorization"
    calls = env.auth.snapshot()
    assert len(calls) == 1, calls
    inp = calls[0]
    assert set(inp) == {"headers", "path", "query_params", "addr"}, inp
    assert inp["path"] == "/"
    assert inp["query_params"] == {"token": ["abc"]}
    assert inp["addr"].startswith("127.0.0.1:") and inp["addr"].split(":")[1].isdigit(), inp["addr"]
    headers = inp["headers"]
    assert headers.get("upgrade", "").lower() == "websocket"
    assert headers.get("sec-websocket-version") == "13"
    assert headers.get("host") == f"127.0.0.1:{eng.stream_port}"
    assert headers.get("sec-websocket-protocol", "").replace(" ", "") == "Authorization,tok", headers

    s = "room"
    sub1 = c1.join(s, "g")
    c1.wait_sync(s, "g")
    assert env.joins.next(lambda p: p["subscription_id"] == sub1) == {
        "subscription_id": sub1, "stream_name": s, "group_id": "g", "id": None, "context": U1,
    }
    sub2 = c1.join(s, "g", "i1")
    c1.wait_sync(s, "g", "i1")
    assert env.joins.next(lambda p: p["subscription_id"] == sub2) == {
        "subscription_id": sub2, "stream_name": s, "group_id": "g", "id": "i1", "context": U1,
    }

    # Refused join: `unauthorized` frame, no sync, socket open.
    t0 = now_ms()
    c1.join(s, "forbidden")
    unauth = c1.wait_for(lambda f: ev(f).get("type") == "unauthorized", 5.0, "unauthorized frame")
    assert_frame(unauth, {"streamName": s, "groupId": "forbidden", "id": None, "event": {"type": "unauthorized"}}, t0, "unauthorized")
    c1.join(s, "g2")
    c1.wait_sync(s, "g2")  # also proves the socket is still open and served
    call(env.worker, "set", {"stream_name": s, "group_id": "forbidden", "item_id": "z", "data": 1})
    call(env.worker, "set", {"stream_name": s, "group_id": "g2", "item_id": "z", "data": 2})
    c1.wait_for(lambda f: f.get("groupId") == "g2" and f.get("id") == "z", 5.0, "g2 create frame")
    stray = [f for f in c1.frames if f.get("groupId") == "forbidden" and ev(f).get("type") != "unauthorized"]
    assert stray == [], f"frames after a refused join: {stray}"

    c1.leave(sub1, s, "g")
    assert env.leaves.next(lambda p: p["subscription_id"] == sub1) == {
        "subscription_id": sub1, "stream_name": s, "group_id": "g", "id": None, "context": U1,
    }

    # Auth result without `context` → context null.
    c2 = subscribe(eng, label="no-token-sub")
    sub5 = c2.join(s, "g")
    c2.wait_sync(s, "g")
    assert env.joins.next(lambda p: p["subscription_id"] == sub5) == {
        "subscription_id": sub5, "stream_name": s, "group_id": "g", "id": None, "context": None,
    }
    c2.leave(sub5, s, "g")
    assert env.leaves.next(lambda p: p["subscription_id"] == sub5) == {
        "subscription_id": sub5, "stream_name": s, "group_id": "g", "id": None, "context": None,
    }


def _subscribed_client(env: AuthEnv, subscribe, label: str) -> dict:
    c = subscribe(env.engine, "/?token=abc", label=label)
    g = f"g-{uuid.uuid4().hex[:8]}"
    group = c.join("room", g)
    c.wait_sync("room", g)
    item = c.join("room", g, "i1")
    c.wait_sync("room", g, "i1")
    refused = c.join("room", "forbidden")
    c.wait_for(lambda f: ev(f).get("type") == "unauthorized", 5.0, "unauthorized frame")
    left = c.join("room", g, "i2")
    c.wait_sync("room", g, "i2")
    c.leave(left, "room", g)
    env.leaves.next(lambda p: p["subscription_id"] == left, what="leave of the explicitly left subscription")
    return {"c": c, "g": g, "group": group, "item": item, "refused": refused, "left": left}


def _assert_leaves_on_disconnect(env: AuthEnv, sc: dict) -> None:
    lg = env.leaves.next(lambda p: p["subscription_id"] == sc["group"], what=f"stream:leave of group subscription {sc['group']} on disconnect")
    li = env.leaves.next(lambda p: p["subscription_id"] == sc["item"], what=f"stream:leave of item subscription {sc['item']} on disconnect")
    assert lg == {"subscription_id": sc["group"], "stream_name": "room", "group_id": sc["g"], "id": None, "context": U1}
    assert li == {"subscription_id": sc["item"], "stream_name": "room", "group_id": sc["g"], "id": "i1", "context": U1}
    leaves = env.leaves.snapshot()
    assert [p for p in leaves if p["subscription_id"] == sc["refused"]] == [], "a refused join must not produce a leave"
    assert len([p for p in leaves if p["subscription_id"] == sc["left"]]) == 1, "a subscription that left must not leave again"


@AUTH_ENGINE
def test_leave_fires_on_clean_close(auth_env, subscribe):
    sc = _subscribed_client(auth_env, subscribe, "clean-close")
    sc["c"].close()
    _assert_leaves_on_disconnect(auth_env, sc)


@AUTH_ENGINE
def test_leave_fires_on_tcp_drop(auth_env, subscribe):
    sc = _subscribed_client(auth_env, subscribe, "tcp-drop")
    sc["c"].drop()
    _assert_leaves_on_disconnect(auth_env, sc)


@pytest.mark.engine(stream_config={"auth_function": "sauth::strict", "auth_required": True})
def test_auth_required_refuses_with_401(engine, make_worker, subscribe):
    # No auth function registered yet: the call fails → 401.
    with pytest.raises(InvalidStatus) as info:
        subscribe(engine, "/?token=good", label="strict-missing")
    assert info.value.response.status_code == 401

    w = make_worker("strict")

    def strict(inp):
        if (inp.get("query_params") or {}).get("token") != ["good"]:
            raise RuntimeError("denied")
        return {"context": {"userId": "u2"}}

    w.register_function("sauth::strict", strict)
    barrier(w)
    with pytest.raises(InvalidStatus) as info:
        subscribe(engine, "/?token=bad", label="strict-bad")
    assert info.value.response.status_code == 401
    c = subscribe(engine, "/?token=good", label="strict-ok")
    c.join("s", "g")
    c.wait_sync("s", "g")


# --- 5. subprotocol and URL form -----------------------------------------------------------------


@pytest.mark.engine(shards=2)
def test_subprotocol_authorization_selected(engine, subscribe):
    c = subscribe(engine, label="subprotocol", subprotocols=["Authorization", "tok"])
    assert c.ws.subprotocol == "Authorization"
    g = f"g-{uuid.uuid4().hex[:8]}"
    c.join("proto", g)
    assert_frame(c.wait_sync("proto", g), {"streamName": "proto", "groupId": g, "id": None, "event": {"type": "sync", "data": []}})


@pytest.mark.engine(shards=2)
def test_url_form_is_implicit_join(engine, make_worker, subscribe):
    w = make_worker("url")
    s, g = "urlform", f"g-{uuid.uuid4().hex[:8]}"
    base = {"stream_name": s, "group_id": g}
    call(w, "set", {**base, "item_id": "k1", "data": {"k": 1}})
    call(w, "set", {**base, "item_id": "k2", "data": {"k": 2}})

    t0 = now_ms()
    cg = subscribe(engine, f"/stream/{s}/{g}/", label="url-group")
    ci = subscribe(engine, f"/stream/{s}/{g}/k1", label="url-item")
    cg.wait_sync(s, g)
    ci.wait_sync(s, g, "k1")
    assert_frame(cg.frames[0], {"streamName": s, "groupId": g, "id": None, "event": {"type": "sync", "data": [{"k": 1}, {"k": 2}]}}, t0, "first frame (group URL)")
    assert_frame(ci.frames[0], {"streamName": s, "groupId": g, "id": "k1", "event": {"type": "sync", "data": {"k": 1}}}, t0, "first frame (item URL)")

    call(w, "set", {**base, "item_id": "k2", "data": {"k": 22}})
    call(w, "set", {**base, "item_id": "k1", "data": {"k": 11}})
    f = cg.wait_for(lambda x: x.get("id") == "k1" and ev(x).get("type") == "update", 5.0, "k1 update (group URL)")
    assert_frame(f, {"streamName": s, "groupId": g, "id": "k1", "event": {"type": "update", "data": {"k": 11}}}, t0, "update (group URL)")
    assert [x["id"] for x in cg.frames[1:]] == ["k2", "k1"]
    fi = ci.wait_for(lambda x: ev(x).get("type") == "update", 5.0, "k1 update (item URL)")
    assert_frame(fi, {"streamName": s, "groupId": g, "id": "k1", "event": {"type": "update", "data": {"k": 11}}}, t0, "update (item URL)")
    assert len(ci.frames) == 2, f"item URL subscriber got: {ci.frames}"
