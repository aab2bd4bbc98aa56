"""A fault injector in front of a real S3 server: an HTTP proxy that answers the first
``fail_first`` requests ``503 SlowDown`` (as S3 does when it sheds load) and forwards the
rest unchanged, so signatures still check; ``mangle_etag_heads`` HEAD answers about an
object report another ETag (a store that holds different bytes than were sent).

It forwards each request whole (the body by ``Content-Length``) and keeps the ``Host``
header, which SigV4 signs, as the client sent it.
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import urlparse

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "expect",
               "te", "trailer", "upgrade"}
_SLOW_DOWN = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code>"
              b"<Message>Please reduce your request rate.</Message></Error>")
WRONG_ETAG = '"00000000000000000000000000000000"'


class FaultyS3Proxy:
    """``endpoint_url`` reaches ``upstream`` through the faults; counters say what it did."""

    def __init__(self, upstream: str, *, fail_first: int = 0, mangle_etag_heads: int = 0,
                 ) -> None:
        parsed = urlparse(upstream)
        self._upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self._lock = threading.Lock()
        self.fail_first = fail_first
        self.mangle_etag_heads = mangle_etag_heads
        self.requests = 0
        self.failed = 0
        self.mangled = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy._lock:
                    proxy.requests += 1
                    fail = proxy.failed < proxy.fail_first
                    if fail:
                        proxy.failed += 1
                if fail:
                    self._answer(503, {"Content-Type": "application/xml"}, _SLOW_DOWN)
                    return
                status, headers, data = proxy._forward(self.command, self.path,
                                                       dict(self.headers), body)
                if self.command == "HEAD" and "/outputs/" in self.path and status == 200:
                    with proxy._lock:
                        mangle = proxy.mangled < proxy.mangle_etag_heads
                        if mangle:
                            proxy.mangled += 1
                    if mangle:
                        headers = {k: (WRONG_ETAG if k.lower() == "etag" else v)
                                   for k, v in headers.items()}
                self._answer(status, headers, data)

            def _answer(self, status: int, headers: dict[str, str], data: bytes) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                declared = headers.get("Content-Length") or headers.get("content-length")
                if self.command == "HEAD" and declared is not None:
                    self.send_header("Content-Length", declared)
                else:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

            def log_message(self, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.endpoint_url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True,
                                        name="s3-fault-proxy")

    def _forward(self, method: str, path: str, headers: dict[str, str], body: bytes,
                 ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(*self._upstream, timeout=30)
        try:
            out = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}
            conn.request(method, path, body=body or None, headers=out)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, dict(resp.getheaders()), data
        finally:
            conn.close()

    def __enter__(self) -> FaultyS3Proxy:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
