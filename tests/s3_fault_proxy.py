"""Fault injection for tests: an HTTP proxy that makes an S3 endpoint misbehave on purpose.

:class:`FaultProxy` listens on 127.0.0.1 and forwards every request to an upstream S3 endpoint (the
moto server of the tests), except those a :class:`FaultRule` picks: those get an S3-style error reply
(503 SlowDown, 500 InternalError, ...) without reaching the upstream. Rules are deterministic (every
k-th matching request, up to a bounded count), so a test knows how many faults it injected and can
assert that they were. The proxy is bounded: after ``max_requests`` requests or ``max_seconds`` it
answers 503 to everything and stops by itself, so a client that loops forever fails a test instead of
hanging it.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

# Hop-by-hop headers are the proxy's own business, never forwarded (RFC 9110 section 7.6.1).
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "expect",
}


@dataclass
class FaultRule:
    """Reply ``status``/``code`` to every ``every``-th request matching ``method`` and ``path_contains``.

    ``max_faults`` bounds how many faults the rule injects (None: no bound, a persistent outage).
    """

    method: str
    every: int = 1
    status: int = 503
    code: str = "SlowDown"
    path_contains: str | None = None
    max_faults: int | None = None
    matched: int = 0
    injected: int = 0

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and (self.path_contains is None or self.path_contains in path)

    def should_fail(self) -> bool:
        """Called once per matching request (under the proxy's lock)."""
        self.matched += 1
        if self.max_faults is not None and self.injected >= self.max_faults:
            return False
        if self.matched % self.every:
            return False
        self.injected += 1
        return True


@dataclass
class InjectedFault:
    method: str
    path: str
    status: int
    code: str


@dataclass
class ProxyStats:
    requests: Counter = field(default_factory=Counter)  # method -> requests seen
    forwarded: Counter = field(default_factory=Counter)  # method -> requests sent upstream
    faults: list[InjectedFault] = field(default_factory=list)


class FaultProxy:
    """A fault-injecting HTTP proxy in front of ``upstream`` (e.g. ``http://127.0.0.1:5000``).

    Use as a context manager; ``endpoint_url`` is what clients use instead of the upstream. Rules can
    be changed while it runs (``proxy.rules = [...]``); the first matching rule decides.
    """

    def __init__(
        self,
        upstream: str,
        rules: list[FaultRule] | None = None,
        *,
        max_requests: int = 20_000,
        max_seconds: float = 600.0,
    ):
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be an http:// URL, got {upstream!r}")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        self.rules = list(rules or [])
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.stats = ProxyStats()
        self.exhausted = False  # set once a bound was hit: every later request got a 503
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None

    @property
    def endpoint_url(self) -> str:
        if self._server is None:
            raise RuntimeError("the proxy is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def injected(self, method: str | None = None, path_contains: str | None = None) -> int:
        with self._lock:
            return sum(
                1
                for f in self.stats.faults
                if (method is None or f.method == method)
                and (path_contains is None or path_contains in f.path)
            )

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive and 100-continue, as S3 clients expect

            def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
                pass  # quiet: tests count requests through ``stats`` instead

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                length = str(len(body))
                for name, value in headers:
                    if name.lower() == "content-length":
                        if self.command == "HEAD":
                            length = value  # a HEAD reply has no body but tells the object's size
                    elif name.lower() not in _HOP_BY_HOP:
                        self.send_header(name, value)
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self) -> None:
                body = self._read_body()
                fault = proxy._decide(self.command, self.path)
                if fault is not None:
                    status, code = fault
                    xml = (
                        '<?xml version="1.0" encoding="UTF-8"?>\n'
                        f"<Error><Code>{code}</Code><Message>injected by FaultProxy</Message>"
                        "<RequestId>fault</RequestId></Error>"
                    ).encode()
                    self._reply(status, [("Content-Type", "application/xml")], xml)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                    self._reply(response.status, response.getheaders(), data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle  # noqa: N815 - http.server's names

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        # Stops by itself: a test that forgets it (or a client that never gives up) cannot hang.
        self._timer = threading.Timer(self.max_seconds, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def _decide(self, method: str, path: str) -> tuple[int, str] | None:
        with self._lock:
            self.stats.requests[method] += 1
            total = sum(self.stats.requests.values())
            if total > self.max_requests or time.monotonic() - self._started > self.max_seconds:
                self.exhausted = True
                return 503, "ServiceUnavailable"
            for rule in self.rules:
                if rule.matches(method, path):
                    if rule.should_fail():
                        self.stats.faults.append(InjectedFault(method, path, rule.status, rule.code))
                        return rule.status, rule.code
                    break
            self.stats.forwarded[method] += 1
            return None

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
