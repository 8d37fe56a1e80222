"""RBAC listener (spec §1.3) with the PyPI SDK as the untrusted client: a second
`iii-worker-manager` entry with an `rbac` block; a trusted SDK worker on the main port hosts the
auth function and the functions; SDK workers on the RBAC port authenticate with the bearer token
the SDK takes from ``III_TOKEN``."""

from __future__ import annotations

import threading
import uuid

import pytest
from iii import InitOptions, InvocationError, register_worker

from conftest import Engine, call_when_registered, free_port, shutdown_worker, wait_until

RBAC = (
    "        auth_function_id: app::auth\n"
    "        expose_functions:\n"
    '          - match("api::*")\n'
)


class RbacEngine(Engine):
    """An engine with a second worker listener that has an `rbac` block."""

    def __init__(self, workdir) -> None:
        super().__init__(workdir)
        self.rbac_port = free_port()
        while self.rbac_port in (self.port, self.stream_port):
            self.rbac_port = free_port()

    @property
    def rbac_url(self) -> str:
        return f"ws://127.0.0.1:{self.rbac_port}"

    def config_text(self) -> str:
        return super().config_text() + (
            "  - name: iii-worker-manager\n"
            "    config:\n"
            "      host: 127.0.0.1\n"
            f"      port: {self.rbac_port}\n"
            "      rbac:\n" + RBAC
        )


@pytest.fixture
def rbac_engine(tmp_path, request):
    eng = RbacEngine(tmp_path)
    request.node._ringcast_engines = [eng]
    eng.start()
    yield eng
    eng.terminate()


@pytest.fixture
def workers():
    made: list = []

    def make(url: str, label: str):
        worker = register_worker(
            url,
            InitOptions(
                worker_name=f"pytest-{label}-{uuid.uuid4().hex[:8]}",
                enable_metrics_reporting=False,
                otel={"enabled": False},
            ),
        )
        made.append(worker)
        return worker

    yield make
    for w in reversed(made):
        shutdown_worker(w)


def test_a_python_worker_authenticated_by_iii_token_calls_only_exposed_functions(rbac_engine, workers, monkeypatch):
    seen_auth: list = []
    trusted = workers(rbac_engine.url, "trusted")

    def auth(data):
        seen_auth.append(data)
        if data["headers"].get("authorization") != "Bearer py-secret":
            raise ValueError("bad token")
        return {"context": {"who": "python"}}

    trusted.register_function("app::auth", auth)
    trusted.register_function("api::echo", lambda data: {"echo": data["v"]})
    trusted.register_function("internal::secret", lambda data: "secret")
    call_when_registered(trusted, "internal::secret", {})

    monkeypatch.setenv("III_TOKEN", "py-secret")
    browser = workers(rbac_engine.rbac_url, "rbac")
    assert call_when_registered(browser, "api::echo", {"v": 7}) == {"echo": 7}
    assert any(a["headers"].get("authorization") == "Bearer py-secret" for a in seen_auth)

    with pytest.raises(InvocationError) as refused:
        browser.trigger({"function_id": "internal::secret", "payload": {}, "timeout_ms": 5000})
    assert refused.value.code == "FORBIDDEN", refused.value
    assert "expose_functions" in str(refused.value)

    # A worker with the wrong token is refused by the engine: its calls never run.
    monkeypatch.setenv("III_TOKEN", "wrong")
    asked = len(seen_auth)
    intruder_box: list = []
    # register_worker may wait for a connection the engine keeps refusing: make it off-thread.
    threading.Thread(target=lambda: intruder_box.append(workers(rbac_engine.rbac_url, "intruder")), daemon=True).start()
    wait_until(
        lambda: any(a["headers"].get("authorization") == "Bearer wrong" for a in seen_auth[asked:]),
        10,
        what="the auth function to be asked about the intruder",
    )
    wait_until(lambda: "worker refused by the auth function: bad token" in rbac_engine.output(), 10, what="the refusal in the log")
    listed = trusted.trigger({"function_id": "engine::workers::list", "payload": {}, "timeout_ms": 5000})
    assert not any(w.get("name", "").startswith("pytest-intruder") for w in listed["workers"]), listed
