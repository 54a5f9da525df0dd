"""A real HTTP receiver of webhooks on loopback, and the receiver's side of Standard Webhooks
signatures (written from the convention, not with the sender's code)."""

import base64
import contextlib
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.support.processes import free_port


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    status: int
    at: float  # time.time() on arrival

    @property
    def event(self) -> dict:
        return json.loads(self.body)


def verify(secret: str, delivery: Delivery, tolerance_s: float = 300) -> bool:
    """What a receiver checks: the HMAC-SHA256 of `id.timestamp.body`, base64, under `v1,`
    (one of the space-separated signatures), and a fresh timestamp."""
    key = (
        base64.b64decode(secret.removeprefix("whsec_"))
        if secret.startswith("whsec_")
        else secret.encode()
    )
    msg_id = delivery.headers["webhook-id"]
    timestamp = delivery.headers["webhook-timestamp"]
    if abs(time.time() - int(timestamp)) > tolerance_s:
        return False
    signed = f"{msg_id}.{timestamp}.".encode() + delivery.body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    given = [s.partition(",")[2] for s in delivery.headers["webhook-signature"].split()]
    return any(hmac.compare_digest(expected, g) for g in given)


@dataclass
class Receiver:
    """Answers 200, or 500 for the event ids in `fail_ids`; records every request."""

    port: int = field(default_factory=free_port)
    fail_ids: set[str] = field(default_factory=set)
    deliveries: list[Delivery] = field(default_factory=list)
    on_delivery: Callable[[Delivery], None] | None = None  # called in the server's thread
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> "Receiver":
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                status = 500 if headers.get("webhook-id") in receiver.fail_ids else 200
                delivery = Delivery(headers, body, status, time.time())
                with receiver._lock:
                    receiver.deliveries.append(delivery)
                if receiver.on_delivery is not None:
                    receiver.on_delivery(delivery)
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(10)

    def accepted(self) -> list[Delivery]:
        with self._lock:
            return [d for d in self.deliveries if d.status == 200]

    def all(self) -> list[Delivery]:
        with self._lock:
            return list(self.deliveries)


@contextlib.contextmanager
def receiving(**kwargs):
    receiver = Receiver(**kwargs).start()
    try:
        yield receiver
    finally:
        receiver.stop()
