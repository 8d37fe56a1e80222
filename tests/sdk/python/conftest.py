"""Fixtures for the ringcast Python SDK compatibility suite.

Every test gets its own engine process (fresh ports, fresh temp config) and a
factory for SDK workers (published PyPI ``iii-sdk`` 0.25.0) connected to it.
The engine's stdout/stderr are captured to a file and attached to the report of
any failing test.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import json
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest

HERE = Path(__file__).resolve().parent
DEFAULT_BIN = (HERE / ".." / ".." / ".." / "target" / "release" / "ringcast").resolve()

# The SDK lets III_WORKER_NAME override any name we pass; each worker here
# must carry its own name, so never inherit one from the environment.
os.environ.pop("III_WORKER_NAME", None)
os.environ.pop("III_NAMESPACE", None)
os.environ.pop("III_URL", None)
os.environ.pop("III_TOKEN", None)
# OpenTelemetry in iii-sdk is process-global and bound to the first worker's
# engine; with one engine per test that would leave it dialling dead engines.
os.environ["OTEL_ENABLED"] = "false"

from iii import InitOptions, InvocationError, register_worker  # noqa: E402

ENGINE_READY_TIMEOUT_S = 10.0
ENGINE_POLL_S = 0.05
STDERR_TAIL_CHARS = 20_000


def engine_bin() -> Path:
    raw = os.environ.get("RINGCAST_BIN")
    return Path(raw).resolve() if raw else DEFAULT_BIN


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll ``cond`` until it returns a truthy value; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = cond()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - remembered for the failure message
            last_exc = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last error: {last_exc!r}")
        time.sleep(interval)


def call_when_registered(worker, function_id: str, payload: Any = None, timeout: float = 10.0, **extra: Any) -> Any:
    """Call ``function_id`` until it stops answering ``function_not_found``.

    Registrations are fire-and-forget in the protocol, so a test observes that
    one took effect by calling it. Any other error is raised immediately.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return worker.trigger({"function_id": function_id, "payload": payload, "timeout_ms": 3000, **extra})
        except InvocationError as err:
            if err.code != "function_not_found" or time.monotonic() >= deadline:
                raise
        time.sleep(0.05)


class Engine:
    """One ringcast engine process."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        stream_port: int | None = None,
        shards: int = 1,
        stream_config: dict[str, Any] | None = None,
        extra_yaml: str = "",
    ) -> None:
        self.workdir = workdir
        # More worker blocks after iii-stream (e.g. an iii-queue block), as YAML text.
        self.extra_yaml = extra_yaml
        self.shards = shards
        # Extra keys for the iii-stream config block, e.g. {"auth_function": "auth::check"}.
        self.stream_config = dict(stream_config or {})
        self.port = port or free_port()
        self.stream_port = stream_port or free_port()
        while self.stream_port == self.port:
            self.stream_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.log_paths: list[Path] = []
        self.last_exit_code: int | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def stream_url(self) -> str:
        """Subscriber WebSocket of iii-stream."""
        return f"ws://127.0.0.1:{self.stream_port}"

    def config_text(self) -> str:
        return (
            "workers:\n"
            "  - name: iii-worker-manager\n"
            "    config:\n"
            "      host: 127.0.0.1\n"
            f"      port: {self.port}\n"
            "  - name: iii-stream\n"
            "    config:\n"
            "      host: 127.0.0.1\n"
            f"      port: {self.stream_port}\n"
            # JSON scalars are valid YAML.
            + "".join(f"      {k}: {json.dumps(v)}\n" for k, v in self.stream_config.items())
            + self.extra_yaml
        )

    def start(self) -> "Engine":
        binary = engine_bin()
        if not binary.is_file():
            pytest.fail(f"engine binary not found: {binary} (set RINGCAST_BIN)", pytrace=False)
        self.starts += 1
        cfg = self.workdir / f"engine-{self.port}-{self.starts}.yaml"
        cfg.write_text(self.config_text())
        log_path = self.workdir / f"engine-{self.port}-{self.starts}.log"
        self.log_paths.append(log_path)
        log = open(log_path, "wb")
        try:
            self.proc = subprocess.Popen(
                [str(binary), "--config", str(cfg), "--shards", str(self.shards)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            log.close()
        deadline = time.monotonic() + ENGINE_READY_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                self.last_exit_code = self.proc.returncode
                pytest.fail(
                    f"engine exited with code {self.proc.returncode} before listening on {self.port}\n"
                    f"--- engine output ---\n{self.output()}",
                    pytrace=False,
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
                with socket.create_connection(("127.0.0.1", self.stream_port), timeout=0.5):
                    return self
            except OSError:
                pass
            if time.monotonic() >= deadline:
                self.kill()
                pytest.fail(
                    f"engine did not accept TCP connections on {self.port} and {self.stream_port}"
                    f" within {ENGINE_READY_TIMEOUT_S}s\n"
                    f"--- engine output ---\n{self.output()}",
                    pytrace=False,
                )
            time.sleep(ENGINE_POLL_S)

    def terminate(self, timeout: float = 5.0) -> bool:
        """SIGTERM and wait. Returns True when it exited within ``timeout``."""
        if self.proc is None:
            return True
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                self.last_exit_code = proc.returncode
                return False
        self.last_exit_code = proc.returncode
        return True

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        parts = []
        for p in self.log_paths:
            try:
                text = p.read_text(errors="replace")
            except OSError:
                continue
            parts.append(f"[{p.name}]\n{text}")
        joined = "\n".join(parts)
        if len(joined) > STDERR_TAIL_CHARS:
            joined = "...(truncated)...\n" + joined[-STDERR_TAIL_CHARS:]
        return joined


# RINGCAST_STREAM_ADAPTER=redis runs the suite's engines on the redis adapter (one redis-server
# for the session, emptied before each engine), so the stream scenarios also prove the adapter.
STREAM_ADAPTER = os.environ.get("RINGCAST_STREAM_ADAPTER", "kv")


def _redis_command(port: int, *args: str) -> bytes:
    """One RESP command to the loopback redis-server on `port`; its first reply line."""
    request = f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(request.encode())
        return conn.makefile("rb").readline()


@pytest.fixture(scope="session")
def redis_port():
    """A redis-server of this session on a free loopback port (only with RINGCAST_STREAM_ADAPTER=redis)."""
    if STREAM_ADAPTER != "redis":
        yield None
        return
    import shutil
    binary = shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if os.path.exists(p)), None)
    if binary is None:
        pytest.fail("RINGCAST_STREAM_ADAPTER=redis but redis-server is not installed (tests/install_redis.sh)", pytrace=False)
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: _try_ping(port), 10.0, what="redis-server to answer PING")
    yield port
    proc.kill()
    proc.wait()


def _try_ping(port: int) -> bool:
    try:
        return _redis_command(port, "PING").startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture
def engine_factory(request, tmp_path, redis_port):
    """Start engines on demand; every engine is stopped at teardown."""
    engines: list[Engine] = []
    request.node._ringcast_engines = engines

    def make(
        port: int | None = None,
        stream_port: int | None = None,
        start: bool = True,
        shards: int = 1,
        stream_config: dict[str, Any] | None = None,
        extra_yaml: str = "",
    ) -> Engine:
        if redis_port is not None and "adapter" not in (stream_config or {}):
            if not engines:  # engines of one test share the store, as nodes of one deployment do
                assert _redis_command(redis_port, "FLUSHALL").startswith(b"+OK")
            adapter = {"name": "redis", "config": {"redis_url": f"redis://127.0.0.1:{redis_port}"}}
            stream_config = {**(stream_config or {}), "adapter": adapter}
        eng = Engine(tmp_path, port=port, stream_port=stream_port, shards=shards, stream_config=stream_config, extra_yaml=extra_yaml)
        engines.append(eng)
        if start:
            eng.start()
        return eng

    yield make
    for eng in engines:
        eng.terminate()


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "engine(**kwargs): options for the test's `engine` fixture (shards=, stream_config=)",
    )


@pytest.fixture
def engine(engine_factory, request) -> Engine:
    marker = request.node.get_closest_marker("engine")
    return engine_factory(**(marker.kwargs if marker else {}))


@pytest.fixture
def make_worker(engine):
    """Factory for connected SDK workers; all are shut down at teardown."""
    workers: list[Any] = []

    def make(label: str, url: str | None = None, **options: Any):
        opts = InitOptions(
            worker_name=f"pytest-{label}-{uuid.uuid4().hex[:8]}",
            enable_metrics_reporting=False,
            otel={"enabled": False},
            **options,
        )
        worker = register_worker(url or engine.url, opts)
        workers.append(worker)
        assert worker.get_connection_state() == "connected", (
            f"worker {label} did not connect to {url or engine.url}: {worker.get_connection_state()}"
        )
        return worker

    yield make
    for w in reversed(workers):
        shutdown_worker(w)


def shutdown_worker(worker, timeout: float = 10.0) -> None:
    """``worker.shutdown()`` bounded in time (a hung close must not hang the suite).

    Idempotent: a second ``shutdown()`` of an iii-sdk client blocks forever on
    its stopped loop, so it is only ever called once per worker.
    """
    if getattr(worker, "_pytest_shut_down", False):
        return
    worker._pytest_shut_down = True
    t = threading.Thread(target=_quiet_shutdown, args=(worker,), daemon=True)
    t.start()
    t.join(timeout)


def _quiet_shutdown(worker) -> None:
    try:
        worker.shutdown()
    except Exception:  # noqa: BLE001 - already shut down / loop gone
        pass


class WorkerProcess:
    """An SDK worker in its own Python process (see worker_proc.py)."""

    def __init__(self, url: str, prefix: str) -> None:
        env = dict(os.environ)
        env["III_WORKER_NAME"] = f"pytest-proc-{prefix}-{uuid.uuid4().hex[:8]}"
        env["OTEL_ENABLED"] = "false"
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "worker_proc.py"), url, prefix],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.transcript: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.transcript.append(line)
            self.lines.put(line)

    def wait_for_line(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"worker process never printed {prefix!r}; output so far:\n" + "\n".join(self.transcript)
                )
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line.startswith(prefix):
                return line

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def spawn_worker_process(engine, request):
    procs: list[WorkerProcess] = []
    request.node._ringcast_worker_procs = procs

    def spawn(prefix: str) -> WorkerProcess:
        p = WorkerProcess(engine.url, prefix)
        procs.append(p)
        return p

    yield spawn
    for p in procs:
        p.stop()


# --- reporting -------------------------------------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for eng in getattr(item, "_ringcast_engines", []):
            report.sections.append((f"ringcast engine output (port {eng.port})", eng.output() or "<empty>"))
        for wp in getattr(item, "_ringcast_worker_procs", []):
            report.sections.append(("worker process output", "\n".join(wp.transcript) or "<empty>"))
        for sub in getattr(item, "_ringcast_stream_subs", []):
            frames = "\n".join(repr(f) for f in sub.frames[-40:])
            report.sections.append((f"frames received by stream subscriber {sub.label}", frames or "<none>"))


def pytest_sessionfinish(session, exitstatus):
    session.config._ringcast_exitstatus = int(exitstatus)


def pytest_unconfigure(config):
    # iii-sdk runs each worker's event loop on a non-daemon thread. If the
    # engine misbehaves a worker may never finish closing, which would keep the
    # interpreter alive forever after the summary line (and asyncio prints
    # "Task was destroyed" noise at exit). The summary is already printed here.
    status = getattr(config, "_ringcast_exitstatus", None)
    if status is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
