"""A stand-alone SDK worker with OpenTelemetry ON (the SDK default) for test_telemetry.py.

Usage: python telemetry_worker.py <engine-url> <worker-name> <function-id>

Logs ``worker <name> starting`` through the SDK's ``Logger`` (PyPI iii-sdk 0.25.0 ships it in
its ``iii_helpers`` dependency), then registers ``<function-id>``, which logs one line at each
level (debug, info, warn, error) tagged with the call's ``tag``. Prints ``READY`` once
connected; on SIGTERM it shuts the worker down and exits.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from iii import InitOptions, register_worker
from iii_helpers.observability import Logger


def main() -> None:
    url, name, function_id = sys.argv[1], sys.argv[2], sys.argv[3]
    stop = threading.Event()
    worker = register_worker(url, InitOptions(worker_name=name, enable_metrics_reporting=False))
    logger = Logger()
    logger.info(f"worker {name} starting")

    def log(data):
        tag = (data or {}).get("tag", "untagged")
        logger.debug(f"debug line {tag}", {"step": 1})
        logger.info(f"info line {tag}", {"order_id": "ord_123", "status": "completed"})
        logger.warn(f"warn line {tag}", {"attempt": 3})
        logger.error(f"error line {tag}", {"error_code": "card_declined"})
        return {"logged": tag}

    worker.register_function(function_id, log)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("READY", flush=True)
    while not stop.wait(0.05):
        pass
    try:
        worker.shutdown()
    finally:
        os._exit(0)


if __name__ == "__main__":
    main()
