"""A stand-alone SDK worker used by the disconnect tests.

Usage: python worker_proc.py <engine-url> <prefix>

Registers ``<prefix>::ping`` (returns "pong") and ``<prefix>::block`` (prints
``ENTERED <json data>`` and then blocks forever). Prints ``READY <worker id>``
once connected. On SIGTERM it calls ``worker.shutdown()`` (a graceful close of
the WebSocket) and exits; SIGKILL is the abrupt variant.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

os.environ.setdefault("OTEL_ENABLED", "false")

from iii import InitOptions, register_worker  # noqa: E402


def main() -> None:
    url, prefix = sys.argv[1], sys.argv[2]
    stop = threading.Event()
    never = threading.Event()

    worker = register_worker(url, InitOptions(enable_metrics_reporting=False, otel={"enabled": False}))

    def block(data):
        print("ENTERED " + json.dumps(data), flush=True)
        never.wait()

    worker.register_function(f"{prefix}::block", block)
    worker.register_function(f"{prefix}::ping", lambda data: "pong")

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"READY {worker.worker_id}", flush=True)
    while not stop.wait(0.05):
        pass
    print("SHUTTING DOWN", flush=True)
    try:
        worker.shutdown()
    finally:
        print("SHUT DOWN", flush=True)
        os._exit(0)


if __name__ == "__main__":
    main()
