"""Worker telemetry (spec §10.1): a Python SDK worker with OpenTelemetry on (the SDK default)
logs through its Logger; the records travel as ``LOGS`` frames on its /otel socket and the
engine logs them under target ``worker`` with the level, the worker's name and the message."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid

from iii import InitOptions, register_worker

from conftest import HERE, call_when_registered, shutdown_worker, wait_until


def worker_line(engine, level: str, text: str) -> str | None:
    """The engine log line of target ``worker`` at ``level`` that contains ``text``."""
    return next((l for l in engine.output().splitlines() if f" {level} worker: " in l and text in l), None)


def test_logger_lines_of_a_worker_with_telemetry_on_reach_the_engine_log(engine_factory, monkeypatch):
    # This engine shows worker lines down to debug (the default filter is info).
    monkeypatch.setenv("RUST_LOG", "info,worker=debug")
    engine = engine_factory()
    name = f"pytest-telemetry-{uuid.uuid4().hex[:8]}"
    function_id = f"telemetry::log::{name}"

    # The suite runs with OTEL_ENABLED=false; this worker process gets the SDK default (on).
    env = {k: v for k, v in os.environ.items() if k not in ("OTEL_ENABLED", "OTEL_SERVICE_NAME", "RUST_LOG")}
    env["PYTHONUNBUFFERED"] = "1"
    child = subprocess.Popen(
        [sys.executable, str(HERE / "telemetry_worker.py"), engine.url, name, function_id],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    caller = register_worker(
        engine.url,
        InitOptions(worker_name=f"pytest-telemetry-caller-{uuid.uuid4().hex[:8]}", enable_metrics_reporting=False, otel={"enabled": False}),
    )
    try:
        tag = f"tag-{os.getpid()}"
        assert call_when_registered(caller, function_id, {"tag": tag}, timeout=20) == {"logged": tag}

        lines = {}
        for level in ("DEBUG", "INFO", "WARN", "ERROR"):
            text = f"{level.lower()} line {tag}"
            lines[level] = wait_until(lambda: worker_line(engine, level, text), 10, what=f"the engine's {level} line {text!r}")
            # The worker's registered name, not the SDK's default OTel service name (iii-python-sdk).
            assert re.search(rf"worker={re.escape(name)}( |$)", lines[level]), lines[level]
        assert 'data={"order_id":"ord_123","status":"completed"}' in lines["INFO"], lines["INFO"]
        assert 'data={"error_code":"card_declined"}' in lines["ERROR"], lines["ERROR"]
        # Logged inside the call's span: one trace id on all four lines.
        trace_ids = {m.group(1) if (m := re.search(r"trace_id=([0-9a-f]{32})( |$)", l)) else None for l in lines.values()}
        assert len(trace_ids) == 1 and None not in trace_ids, trace_ids
        startup = wait_until(lambda: worker_line(engine, "INFO", f"worker {name} starting"), 10, what="the start-up line")
        # It may reach the engine before the worker's registration does: then it carries the
        # SDK's OTel service name.
        assert re.search(rf"worker=({re.escape(name)}|iii-python-sdk)( |$)", startup), startup
        assert "trace_id=" not in startup, startup
        assert "malformed worker telemetry frame" not in engine.output()
    finally:
        shutdown_worker(caller)
        child.terminate()
        try:
            out, _ = child.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            out, _ = child.communicate()
        print(out.decode(errors="replace"))
