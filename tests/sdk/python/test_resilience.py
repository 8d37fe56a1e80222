"""Owner disconnect during a call (spec §4.6) and SDK reconnect after an engine restart (§1.7, §4.8)."""

from __future__ import annotations

import json
import threading
import time

import pytest
from iii import InvocationError

from conftest import call_when_registered, wait_until


@pytest.mark.parametrize("how", ["sigkill", "graceful_shutdown"])
def test_owner_disconnect_stops_in_flight_call(make_worker, spawn_worker_process, how):
    owner = spawn_worker_process("blk")
    owner.wait_for_line("READY", timeout=20)
    a = make_worker("caller")
    assert call_when_registered(a, "blk::ping", timeout=10) == "pong"

    outcome: dict = {}

    def call():
        try:
            # The engine must answer long before any SDK timeout (default 30 s;
            # 15 s here only to keep a failing run short).
            outcome["result"] = a.trigger({"function_id": "blk::block", "payload": {"n": 1}, "timeout_ms": 15000})
        except BaseException as exc:  # noqa: BLE001
            outcome["error"] = exc
        outcome["done_at"] = time.monotonic()

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    entered = owner.wait_for_line("ENTERED", timeout=10)
    assert json.loads(entered.split(" ", 1)[1])["n"] == 1

    stopped_at = time.monotonic()
    if how == "sigkill":
        owner.proc.kill()
    else:
        owner.proc.terminate()  # worker_proc.py calls worker.shutdown() on SIGTERM
    owner.proc.wait(timeout=15)
    caller.join(timeout=20)
    assert not caller.is_alive(), "the call never completed"

    assert "error" in outcome, f"call unexpectedly returned {outcome.get('result')!r}"
    err = outcome["error"]
    assert isinstance(err, InvocationError), repr(err)
    assert err.code == "invocation_stopped", f"{err.code}: {err.message}"
    elapsed = outcome["done_at"] - stopped_at
    assert elapsed < 5.0, f"invocation_stopped arrived {elapsed:.1f}s after the owner went away"

    # The owner's functions are gone with it.
    with pytest.raises(InvocationError) as info:
        a.trigger({"function_id": "blk::ping", "payload": {}, "timeout_ms": 5000})
    assert info.value.code == "function_not_found", f"{info.value.code}: {info.value.message}"


def test_sdk_reconnects_after_engine_restart(engine, make_worker, engine_factory):
    w = make_worker("survivor")
    w.register_function("survivor::hello", lambda data: {"hello": data.get("name")})
    probe = make_worker("probe1")
    assert call_when_registered(probe, "survivor::hello", {"name": "one"}) == {"hello": "one"}
    old_worker_id = w.worker_id

    assert engine.terminate(timeout=5.0), "engine did not exit within 5 s of SIGTERM"
    wait_until(lambda: w.get_connection_state() != "connected", timeout=5.0, what="the SDK to notice the engine is gone")

    engine2 = engine_factory(port=engine.port, stream_port=engine.stream_port)
    assert engine2.url == engine.url

    wait_until(lambda: w.get_connection_state() == "connected", timeout=15.0, what="the SDK to reconnect by itself")
    fresh = make_worker("probe2", url=engine2.url)
    # The reconnected worker replays its registration (after a `reattach` naming
    # a worker id this engine never issued, which must be ignored).
    assert call_when_registered(fresh, "survivor::hello", {"name": "two"}, timeout=15.0) == {"hello": "two"}
    wait_until(lambda: w.worker_id and w.worker_id != old_worker_id, timeout=5.0, what="a new worker id")
    # And the reconnected worker can call out again.
    fresh.register_function("probe2::echo", lambda data: data["v"])
    assert call_when_registered(w, "probe2::echo", {"v": 9}, timeout=10.0) == 9
