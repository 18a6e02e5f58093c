"""Small receivers on 127.0.0.1 for audit sinks: syslog (UDP, TCP) and HTTP."""

from __future__ import annotations

import json
import socketserver
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any


class SyslogReceiver:
    """Collects syslog messages over UDP (one per datagram) or TCP (octet counting)."""

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        self.messages: list[bytes] = []
        receiver = self

        class UdpHandler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                receiver.messages.append(self.request[0])

        class TcpHandler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                while True:
                    length = b""
                    while not length.endswith(b" "):
                        char = self.rfile.read(1)
                        if not char:
                            return
                        length += char
                    receiver.messages.append(self.rfile.read(int(length)))

        server_class: Any = (
            socketserver.ThreadingUDPServer
            if protocol == "udp"
            else socketserver.ThreadingTCPServer
        )
        handler = UdpHandler if protocol == "udp" else TcpHandler
        server_class.daemon_threads = True
        self.server = server_class(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def address(self) -> str:
        return f"{self.protocol}://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> SyslogReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class WebhookReceiver:
    """Accepts JSON POSTs; answers 500 to the first `failures` of them."""

    def __init__(self, failures: int = 0) -> None:
        self.bodies: list[Any] = []
        self.attempts = 0
        self.failures = failures
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.attempts += 1
                if receiver.attempts <= receiver.failures:
                    self.send_response(500)
                else:
                    receiver.bodies.append(json.loads(body))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def __enter__(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def wait_until(condition: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
