"""A fault-injecting HTTP proxy on loopback, put between a store client and an emulator.

Each test programs it: ``proxy.inject("status", 503, times=2, match=reads("00001.tar"))`` answers
the first two matching requests with a 503; the others go through to the emulator untouched.
Faults: ``status`` (any code, e.g. 500, 503, 403), ``reset`` (a TCP reset halfway through the
body), ``truncate`` (headers promise more bytes than come before the connection closes),
``delay`` (answer after a pause) and ``blackhole`` (read the request, never answer).

Every request travels on its own upstream connection, and every answer closes the client's
connection (``Connection: close``), so no fault leaks from one request into the next. The
proxy also counts the body bytes it passes per object, for checking how much a verb reads.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

FAULT_KINDS = ("status", "reset", "truncate", "delay", "blackhole")
_REASONS = {403: "Forbidden", 500: "Internal Server Error", 503: "Service Unavailable", 401: "Unauthorized"}


@dataclass
class Request:
    method: str
    target: str  # path and query, as sent
    headers: dict[str, str]  # lower-case names

    @property
    def path(self) -> str:
        """The target's path, percent-decoded (GCS puts object names there encoded)."""
        return urllib.parse.unquote(self.target.split("?", 1)[0])

    @property
    def query(self) -> str:
        return self.target.split("?", 1)[1] if "?" in self.target else ""


def reads(name: str) -> Callable[[Request], bool]:
    """Requests that download the bytes of an object whose name ends with ``name`` (S3 and Azure:
    a GET of the object; GCS: a GET with ``alt=media``)."""

    def match(req: Request) -> bool:
        if req.method != "GET" or not req.path.endswith(name):
            return False
        gcs = "/storage/v1/" in req.path or req.path.startswith("/download/")
        return not gcs or "alt=media" in req.query

    return match


def touches(name: str) -> Callable[[Request], bool]:
    """Every request about an object whose name ends with ``name`` (reads, metadata, writes)."""
    return lambda req: req.path.endswith(name)


def anything(req: Request) -> bool:
    return True


@dataclass
class Fault:
    kind: str
    status: int = 503
    times: int | None = None  # the first N matching requests; None: all of them
    match: Callable[[Request], bool] = anything
    seconds: float = 0.0  # for "delay"
    hits: int = 0

    def take(self, req: Request) -> bool:
        if (self.times is not None and self.hits >= self.times) or not self.match(req):
            return False
        self.hits += 1
        return True


@dataclass
class FaultProxy:
    upstream_port: int
    upstream_host: str = "127.0.0.1"
    faults: list[Fault] = field(default_factory=list)
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, what happened)
    body_bytes: Counter = field(default_factory=Counter)  # object path -> body bytes passed to the client
    port: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept_loop, daemon=True, name="faultproxy").start()

    # -- programming ---------------------------------------------------------------------------

    def inject(self, kind: str, status: int = 503, *, times: int | None = None,
               match: Callable[[Request], bool] = anything, seconds: float = 0.0) -> Fault:
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {FAULT_KINDS}")
        fault = Fault(kind, status, times, match, seconds)
        with self._lock:
            self.faults.append(fault)
        return fault

    def reset(self) -> None:
        """No faults, no counts (black-holed connections are let go)."""
        with self._lock:
            self.faults.clear()
            self.requests.clear()
            self.body_bytes.clear()
            conns, self._conns = self._conns, set()
        for c in conns:
            _close(c)

    def stop(self) -> None:
        self._stop.set()
        _close(self._listener)
        self.reset()

    def _pick(self, req: Request) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.take(req):
                    return fault
        return None

    # -- serving -------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._serve_one(conn)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            _close(conn)

    def _serve_one(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        got = _read_request(conn)
        if got is None:
            return
        req, raw = got
        fault = self._pick(req)
        what = fault.kind if fault else "pass"
        with self._lock:
            self.requests.append((req.method, req.path, what))
        if fault and fault.kind == "blackhole":
            self._stop.wait()  # or until reset() closes the connection
            return
        if fault and fault.kind == "status":
            conn.sendall(_status_response(fault.status, req.method))
            return
        if fault and fault.kind == "delay":
            time.sleep(fault.seconds)
        head, body = _forward(raw, self.upstream_host, self.upstream_port)
        if fault and fault.kind in ("reset", "truncate") and body:
            conn.sendall(head + body[: len(body) // 2])
            if fault.kind == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        if fault and fault.kind == "reset":  # nothing to cut: reset before the answer
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        conn.sendall(head + body)
        if req.method == "GET":
            with self._lock:
                self.body_bytes[req.path] += len(body)


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


def _read_until(conn: socket.socket, buf: bytearray, marker: bytes) -> int:
    while True:
        at = buf.find(marker)
        if at >= 0:
            return at
        chunk = conn.recv(65536)
        if not chunk:
            return -1
        buf += chunk


def _read_exact(conn: socket.socket, buf: bytearray, n: int) -> None:
    while len(buf) < n:
        chunk = conn.recv(max(65536, n - len(buf)))
        if not chunk:
            raise ConnectionError("client closed mid-body")
        buf += chunk


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers


def _read_request(conn: socket.socket) -> tuple[Request, bytes] | None:
    """One request from the client: (parsed, bytes to send upstream)."""
    buf = bytearray()
    end = _read_until(conn, buf, b"\r\n\r\n")
    if end < 0:
        return None
    first, headers = _parse_head(bytes(buf[:end]))
    method, target, _ = first.split(" ", 2)
    if headers.get("expect", "").lower() == "100-continue":
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    body_at = end + 4
    if "chunked" in headers.get("transfer-encoding", "").lower():
        pos = body_at
        while True:  # raw chunks, forwarded as they are
            line_end = _read_until_from(conn, buf, b"\r\n", pos)
            size = int(bytes(buf[pos:line_end]).split(b";")[0], 16)
            pos = line_end + 2 + size + 2
            _read_exact(conn, buf, pos)
            if size == 0:
                break
        body_end = pos
    else:
        body_end = body_at + int(headers.get("content-length", "0") or 0)
        _read_exact(conn, buf, body_end)
    lines = [first] + [f"{k}: {v}" for k, v in headers.items() if k not in ("connection", "expect", "keep-alive")]
    head = ("\r\n".join(lines + ["Connection: close"]) + "\r\n\r\n").encode("latin-1")
    return Request(method, target, headers), head + bytes(buf[body_at:body_end])


def _read_until_from(conn: socket.socket, buf: bytearray, marker: bytes, start: int) -> int:
    while True:
        at = buf.find(marker, start)
        if at >= 0:
            return at
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("client closed mid-request")
        buf += chunk


def _forward(raw: bytes, host: str, port: int) -> tuple[bytes, bytes]:
    """Send one request upstream and read the whole answer (the upstream closes after it):
    (head with ``Connection: close``, body)."""
    with socket.create_connection((host, port), timeout=60) as up:
        up.sendall(raw)
        data = bytearray()
        while True:
            chunk = up.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    end = data.find(b"\r\n\r\n")
    first, headers = _parse_head(bytes(data[:end]))
    lines = [first] + [f"{k}: {v}" for k, v in headers.items() if k not in ("connection", "keep-alive")]
    head = ("\r\n".join(lines + ["Connection: close"]) + "\r\n\r\n").encode("latin-1")
    return head, bytes(data[end + 4 :])


def _status_response(status: int, method: str) -> bytes:
    """An error answer every client parses: an S3-style XML body, Azure's error-code header."""
    code = {403: "AccessDenied", 401: "Unauthorized", 503: "SlowDown"}.get(status, "InternalError")
    body = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>injected</Message></Error>"
    payload = b"" if method == "HEAD" else body.encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: application/xml\r\n"
        f"x-ms-error-code: {code}\r\nContent-Length: {len(payload) if payload else 0}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + payload
