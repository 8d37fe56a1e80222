"""Function registration and invocation through the engine (spec §3.4–§3.7, §4)."""

from __future__ import annotations

import asyncio
import random
import string
import threading
import time

import pytest
from iii import InvocationError, TriggerAction

from conftest import call_when_registered


def test_two_workers_call_each_other(make_worker):
    a = make_worker("a")
    b = make_worker("b")

    b.register_function("math::add", lambda data: data["a"] + data["b"])
    a.register_function("a::mul", lambda data: data["a"] * data["b"])

    def nested(data):
        # B's handler calls back into A while A is still waiting for B.
        inner = b.trigger({"function_id": "a::mul", "payload": {"a": data["x"], "b": data["y"]}, "timeout_ms": 10000})
        return {"product": inner, "from": "b"}

    b.register_function("b::nested", nested)

    assert call_when_registered(a, "math::add", {"a": 2, "b": 3}) == 5
    assert a.trigger({"function_id": "math::add", "payload": {"a": 40, "b": 2}, "timeout_ms": 10000}) == 42

    # And the other direction: B calls A.
    assert call_when_registered(b, "a::mul", {"a": 6, "b": 7}) == 42

    # A -> B -> A, nested synchronous calls.
    assert call_when_registered(a, "b::nested", {"x": 3, "y": 4}) == {"product": 12, "from": "b"}


def test_caller_worker_id_is_injected(make_worker):
    a = make_worker("a")
    b = make_worker("b")
    b.register_function("b::who", lambda data: data)

    got = call_when_registered(a, "b::who", {"k": "v"})
    assert a.worker_id, "caller never received workerregistered.worker_id"
    assert got == {"k": "v", "_caller_worker_id": a.worker_id}


def test_void_call_runs_target_and_returns_nothing(make_worker):
    a = make_worker("a")
    b = make_worker("b")
    ran = threading.Event()
    seen: list = []

    def sink(data):
        seen.append(data)
        ran.set()
        return "this result must not reach anyone"

    b.register_function("b::sink", sink)
    b.register_function("b::ping", lambda data: "pong")
    # b::ping answering means B's registrations (sink first) are live.
    assert call_when_registered(a, "b::ping") == "pong"

    started = time.monotonic()
    result = a.trigger({"function_id": "b::sink", "payload": {"token": "void-1"}, "action": TriggerAction.Void()})
    assert result is None
    assert time.monotonic() - started < 2.0, "a void trigger must not wait for the handler"
    assert ran.wait(5.0), "void call never reached the target handler"
    assert seen[0]["token"] == "void-1"
    # The caller got nothing back: the SDK had no pending entry to settle.
    assert a._pending == {}


def test_unknown_function_is_function_not_found(make_worker):
    a = make_worker("a")
    started = time.monotonic()
    with pytest.raises(InvocationError) as info:
        a.trigger({"function_id": "nobody::home", "payload": {"x": 1}, "timeout_ms": 5000})
    assert info.value.code == "function_not_found", f"{info.value.code}: {info.value.message}"
    assert "nobody::home" in info.value.message
    assert time.monotonic() - started < 3.0


def test_handler_error_is_invocation_failed_with_message(make_worker):
    a = make_worker("a")
    b = make_worker("b")
    message = "kaboom: bad input 123 \u00e4\u00f6\u00fc \u2603"

    def fail(data):
        raise RuntimeError(message)

    b.register_function("b::fail", fail)
    b.register_function("b::ping", lambda data: "pong")
    call_when_registered(a, "b::ping")

    with pytest.raises(InvocationError) as info:
        a.trigger({"function_id": "b::fail", "payload": {"x": 1}, "timeout_ms": 10000})
    err = info.value
    assert err.code == "invocation_failed", f"{err.code}: {err.message}"
    assert err.message == message
    assert err.stacktrace and "RuntimeError" in err.stacktrace


def _random_text(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choices(string.ascii_letters + string.digits + " {}[]\"\\/:,", k=n))


@pytest.mark.parametrize("size", [1 << 20, 5 << 20], ids=["1MiB", "5MiB"])
def test_large_payload_round_trip(make_worker, size):
    a = make_worker("a")
    b = make_worker("b")
    b.register_function("b::echo", lambda data: {"echo": data["s"], "len": len(data["s"])})
    b.register_function("b::ping", lambda data: "pong")
    call_when_registered(a, "b::ping")

    s = _random_text(size, seed=size)
    result = a.trigger({"function_id": "b::echo", "payload": {"s": s}, "timeout_ms": 20000})
    assert result["len"] == size
    assert result["echo"] == s


def test_500_concurrent_calls(make_worker):
    n = 500
    a = make_worker("a")
    b = make_worker("b")
    state = {"in_flight": 0, "peak": 0}
    all_in: asyncio.Event | None = None

    async def add(data):
        # Runs on B's SDK loop. Every call waits (bounded) until all n are in
        # flight at once, which proves the engine dispatches them concurrently.
        nonlocal all_in
        if all_in is None:
            all_in = asyncio.Event()
        state["in_flight"] += 1
        state["peak"] = max(state["peak"], state["in_flight"])
        if state["in_flight"] >= n:
            all_in.set()
        try:
            await asyncio.wait_for(all_in.wait(), timeout=10)
        except asyncio.TimeoutError:
            pass
        state["in_flight"] -= 1
        return {"i": data["i"], "sum": data["a"] + data["b"]}

    b.register_function("b::add", add)
    b.register_function("b::ping", lambda data: "pong")
    call_when_registered(a, "b::ping")

    async def run_all():
        calls = [
            a.trigger_async({"function_id": "b::add", "payload": {"i": i, "a": i, "b": 1000 * i}, "timeout_ms": 30000})
            for i in range(n)
        ]
        return await asyncio.gather(*calls, return_exceptions=True)

    started = time.monotonic()
    results = asyncio.run(run_all())
    elapsed = time.monotonic() - started

    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} of {n} calls failed, first: {errors[0]!r}"
    for i, r in enumerate(results):
        assert r == {"i": i, "sum": 1001 * i}, f"call {i} got {r!r}"
    assert len({r["sum"] for r in results}) == n
    assert state["peak"] == n, f"only {state['peak']} of {n} calls were in flight at once (took {elapsed:.1f}s)"


def test_none_payload(make_worker):
    a = make_worker("a")
    b = make_worker("b")
    seen: list = []

    def probe(data):
        seen.append(data)
        return {"was_none": data is None}

    b.register_function("b::probe", probe)
    b.register_function("b::ping", lambda data: "pong")
    call_when_registered(a, "b::ping")

    # iii-sdk 0.25.0 leaves the "data" key out of the frame for a None payload.
    result = a.trigger({"function_id": "b::probe", "payload": None, "timeout_ms": 5000})
    assert result == {"was_none": True}
    assert seen == [None]


def test_handler_returning_none(make_worker):
    a = make_worker("a")
    b = make_worker("b")
    b.register_function("b::nothing", lambda data: None)
    b.register_function("b::ping", lambda data: "pong")
    call_when_registered(a, "b::ping")
    assert a.trigger({"function_id": "b::nothing", "payload": {"x": 1}, "timeout_ms": 5000}) is None
