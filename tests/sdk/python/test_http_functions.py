"""HTTP-invoked functions (spec §2.4, §8) registered with the SDK's ``HttpInvocationConfig``."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from iii import InvocationError
from iii_helpers.http import HttpAuthApiKey, HttpAuthHmac, HttpInvocationConfig

from conftest import call_when_registered

SECRET = "py-hmac-secret"
API_KEY = "py-api-key"
# The engine reads secrets from its own environment (inherited from this process).
os.environ["RINGCAST_PY_HMAC_SECRET"] = SECRET
os.environ["RINGCAST_PY_API_KEY"] = API_KEY


class _Handler(BaseHTTPRequestHandler):
    seen: list = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _answer(self, status: int, value) -> None:
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        _Handler.seen.append((self.path, dict(self.headers), body))
        if self.path == "/signed":
            ts = self.headers["x-iii-Timestamp"]
            signed = f"{ts}:{base64.b64encode(body).decode()}".encode()
            expected = "sha256=" + hmac.new(SECRET.encode(), signed, hashlib.sha256).hexdigest()
            if self.headers.get("x-iii-Signature") != expected:
                return self._answer(401, {"error": {"code": "bad_signature", "message": "signature mismatch"}})
            data = json.loads(body)
            return self._answer(200, {"product": data["a"] * data["b"]})
        if self.path == "/keyed":
            if self.headers.get("x-api-key") != API_KEY:
                return self._answer(403, {"error": {"code": "bad_key", "message": "no"}})
            return self._answer(200, {"keyed": True})
        return self._answer(500, "not an error body")


@pytest.fixture
def http_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    _Handler.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_function_registered_with_http_invocation_config(make_worker, http_server):
    owner = make_worker("http-owner")
    caller = make_worker("http-caller")
    owner.register_function(
        "external::mul",
        HttpInvocationConfig(url=f"{http_server}/signed", method="POST", timeout_ms=5000, auth=HttpAuthHmac(secret_key="RINGCAST_PY_HMAC_SECRET")),
        description="Multiplies over HTTP",
    )
    owner.register_function(
        "external::keyed",
        HttpInvocationConfig(url=f"{http_server}/keyed", auth=HttpAuthApiKey(header="x-api-key", value_key="RINGCAST_PY_API_KEY")),
    )
    owner.register_function("external::broken", HttpInvocationConfig(url=f"{http_server}/broken"))

    assert call_when_registered(caller, "external::mul", {"a": 6, "b": 7}) == {"product": 42}
    path, headers, _ = _Handler.seen[0]
    assert path == "/signed"
    assert headers["x-iii-Function-Path"] == "external::mul"

    assert call_when_registered(caller, "external::keyed", {}) == {"keyed": True}

    with pytest.raises(InvocationError) as err:
        call_when_registered(caller, "external::broken", {})
    assert err.value.code == "http_error"
    assert "HTTP 500" in str(err.value)
