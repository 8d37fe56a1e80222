"""Custom trigger types provided by a worker, bindings, parking and replay (spec §3.8–§3.12, §5)."""

from __future__ import annotations

import queue
import uuid

from iii import TriggerAction
from iii.triggers import TriggerConfig, TriggerHandler

from conftest import call_when_registered, shutdown_worker


class RecordingTriggerHandler(TriggerHandler):
    """Provider-side handler: remembers every binding the engine hands over."""

    def __init__(self) -> None:
        self.registered: "queue.Queue[TriggerConfig]" = queue.Queue()
        self.unregistered: "queue.Queue[TriggerConfig]" = queue.Queue()

    async def register_trigger(self, config: TriggerConfig) -> None:
        self.registered.put(config)

    async def unregister_trigger(self, config: TriggerConfig) -> None:
        self.unregistered.put(config)


def _get(q: "queue.Queue", timeout: float, what: str):
    try:
        return q.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


def _target(worker, function_id: str) -> "queue.Queue[tuple]":
    """Register a target function that records (data, metadata)."""
    calls: "queue.Queue[tuple]" = queue.Queue()

    def handler(data, metadata=None):
        calls.put((data, metadata))
        return {"ok": True}

    worker.register_function(function_id, handler)
    return calls


def _fire(provider, binding: TriggerConfig, payload) -> None:
    """What a provider does when its event happens: call the bound function."""
    provider.trigger(
        {
            "function_id": binding.function_id,
            "payload": payload,
            "metadata": binding.metadata,
            "action": TriggerAction.Void(),
        }
    )


def test_custom_trigger_type_binding_and_fire(make_worker):
    type_id = f"pytest-hook-{uuid.uuid4().hex[:6]}"
    a = make_worker("a")
    b = make_worker("b")

    provider = RecordingTriggerHandler()
    b.register_trigger_type({"id": type_id, "description": "pytest webhook"}, provider)
    b.register_function("b::ping", lambda data: "pong")
    # B's frames are applied in order: once b::ping answers, the type exists.
    call_when_registered(a, "b::ping")

    calls = _target(a, "a::on_hook")
    config = {"path": "/hooks/x", "n": 1, "nested": {"list": [1, 2, 3]}}
    trigger = a.register_trigger(
        {"type": type_id, "function_id": "a::on_hook", "config": config, "metadata": {"route": "r1"}}
    )

    binding = _get(provider.registered, 5.0, "the provider's register_trigger callback")
    assert binding.function_id == "a::on_hook"
    assert binding.config == config
    assert binding.metadata == {"route": "r1"}
    assert binding.id in a._triggers, "binding id must be the id the registering SDK chose"

    _fire(b, binding, {"event": "delivered", "n": 7})
    data, metadata = _get(calls, 5.0, "the bound function to be invoked")
    assert data["event"] == "delivered" and data["n"] == 7
    assert metadata == {"route": "r1"}

    trigger.unregister()
    gone = _get(provider.unregistered, 5.0, "the provider's unregister_trigger callback")
    assert gone.id == binding.id


def test_trigger_registered_before_provider_is_replayed(make_worker):
    type_id = f"pytest-late-{uuid.uuid4().hex[:6]}"
    a = make_worker("a")
    calls = _target(a, "a::late_target")
    a.register_function("a::ping", lambda data: "pong")
    config = {"topic": "late", "k": [True, None, 1.5]}
    a.register_trigger({"type": type_id, "function_id": "a::late_target", "config": config})
    # The registertrigger frame went out before this call; the engine has parked it.
    call_when_registered(a, "a::ping", dispatch="remote")

    b = make_worker("b")
    provider = RecordingTriggerHandler()
    b.register_trigger_type({"id": type_id, "description": "registered late"}, provider)

    binding = _get(provider.registered, 5.0, "the parked binding to be replayed to the new provider")
    assert binding.function_id == "a::late_target"
    assert binding.config == config

    _fire(b, binding, {"late": "payload"})
    data, _ = _get(calls, 5.0, "the bound function to be invoked")
    assert data["late"] == "payload"


def test_binding_moves_to_next_provider_after_provider_disconnects(make_worker):
    type_id = f"pytest-move-{uuid.uuid4().hex[:6]}"
    a = make_worker("a")
    b1 = make_worker("b1")
    first = RecordingTriggerHandler()
    b1.register_trigger_type({"id": type_id, "description": "first provider"}, first)
    b1.register_function("b1::ping", lambda data: "pong")
    call_when_registered(a, "b1::ping")

    calls = _target(a, "a::moved_target")
    a.register_trigger({"type": type_id, "function_id": "a::moved_target", "config": {"v": 1}})
    binding = _get(first.registered, 5.0, "the first provider's register_trigger callback")

    shutdown_worker(b1)

    b2 = make_worker("b2")
    second = RecordingTriggerHandler()
    b2.register_trigger_type({"id": type_id, "description": "second provider"}, second)
    replayed = _get(second.registered, 5.0, "the binding to be replayed to the second provider")
    assert replayed.id == binding.id
    assert replayed.function_id == "a::moved_target"
    assert replayed.config == {"v": 1}

    _fire(b2, replayed, {"via": "b2"})
    data, _ = _get(calls, 5.0, "the bound function to be invoked")
    assert data["via"] == "b2"
