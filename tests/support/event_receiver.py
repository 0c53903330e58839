"""A CloudEvents receiver of our own on loopback: keeps each event's headers and body and answers as
it is told (a status, a redirect)."""

from __future__ import annotations

import json
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


class Loopback(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # a sender's posts at once all get in, none waits for a SYN retry


@dataclass
class EventReceiver:
    host: str = "127.0.0.1"  # the plane's tests listen on the pod bridge's host address
    status: int = 202
    location: str | None = None
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: Loopback | None = None
    tls: tuple[Path, Path] | None = None  # (certificate, key): serve https

    @property
    def url(self) -> str:
        assert self.server is not None, "not started"
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.server.server_address[1]}/events"

    def start(self) -> EventReceiver:
        self.server = Loopback((self.host, 0), _handler_for(self))
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def __enter__(self) -> EventReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def of(self, request_id: str) -> dict[str, tuple[dict[str, str], Any]]:
        """The events of one request by `ce-type`: headers, and the body as JSON."""
        with self.lock:
            return {
                h["ce-type"]: (h, json.loads(b)) for h, b in self.received if h.get("ce-id") == request_id
            }


def _handler_for(receiver: EventReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with receiver.lock:
                receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(receiver.status)
            if receiver.location is not None:
                self.send_header("Location", receiver.location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
