"""
A webhook receiver for Alertmanager's notifications, run by the test process on the bench
network's gateway address: the project's own containers reach it, nothing else does.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class AlertReceiver:
    """Collects every notification POSTed to it, with the time it arrived."""

    def __init__(self, address: str) -> None:
        self.notifications: list[tuple[float, dict]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.notifications.append((time.monotonic(), json.loads(body or b"{}")))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer((address, 0), Handler)
        self.url = f"http://{address}:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alerts(self, since: float = 0.0) -> list[tuple[float, dict]]:
        """(arrival time, alert) of every alert in the notifications received after ``since``."""
        with self.lock:
            return [(at, alert) for at, body in self.notifications if at >= since for alert in body.get("alerts", [])]

    def received(self, alertname: str, status: str, since: float = 0.0) -> list[tuple[float, dict]]:
        """(arrival time, alert) of each ``alertname`` in ``status`` ("firing" or "resolved")
        received after ``since``."""
        return [
            (at, alert)
            for at, alert in self.alerts(since)
            if alert["labels"]["alertname"] == alertname and alert["status"] == status
        ]

    def firing(self, alertname: str, since: float = 0.0) -> list[tuple[float, dict]]:
        """(arrival time, alert) of each firing ``alertname`` received after ``since``."""
        return self.received(alertname, "firing", since)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
