"""A fault-injecting HTTP proxy in front of the test S3 server (tests/s3server.py).

    with s3_server() as s3, faulty_proxy(s3, fraction=0.1, seed=0) as proxy:
        ...                      # AWS_ENDPOINT_URL points at the proxy meanwhile
        proxy.counts             # {"slowdown": 4, "error500": 3, "reset": 2, "delay": 1, ...}

Every request the client sends is read whole, then with probability `fraction` (seeded) one
fault is chosen among `kinds` (equally likely):
- "slowdown": answered 503 with S3's SlowDown XML body (the request never reaches the server);
- "error500": answered 500 InternalError (never reaches the server);
- "reset": a GET is forwarded and its answer cut mid-body, then the connection reset (RST);
  any other request is reset before it is forwarded;
- "delay": the request is held `delay_s` (longer than the client's request timeout), then the
  connection is closed without forwarding it.
The others are forwarded as they are (each on a fresh connection to the server) and their
answers returned on the client's kept-alive connection. `pause()` makes every request fail
(a store that stays down, as 503 SlowDown) until `resume()`.

For each fault it records whether the client sent the same request again (same method, path
and Range: "retried") and whether one of those got through ("survived"), so a drill can report
injected / retried / survived per kind (bench/storage_faults.py).
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

KINDS = ("slowdown", "error500", "reset", "delay")
_ERRORS = {
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "error500": (500, "Internal Server Error", "InternalError", "We encountered an internal "
                 "error. Please try again."),
}  # fmt: skip


@dataclass
class _Pending:
    kind: str
    retried: bool = False
    survived: bool = False


@dataclass
class FaultyProxy:
    upstream: tuple[str, int]
    fraction: float = 0.1
    seed: int = 0
    kinds: tuple[str, ...] = KINDS
    delay_s: float = 3.0
    # Faults only for requests whose path contains this (None: every request).
    only_path: str | None = None
    port: int = 0
    requests: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # injected, per kind
    _faults: list[_Pending] = field(default_factory=list)
    _open: dict[tuple, list[_Pending]] = field(default_factory=dict)  # faults awaiting a retry
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _down: bool = False
    _rng: random.Random = field(init=False)
    _sock: socket.socket | None = None
    _threads: list[threading.Thread] = field(default_factory=list)
    _closing: bool = False

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pause(self) -> None:
        self._down = True

    def resume(self) -> None:
        self._down = False

    def report(self) -> dict[str, dict[str, int]]:
        """kind -> {injected, retried, survived}."""
        out = {k: {"injected": 0, "retried": 0, "survived": 0} for k in self.kinds}
        with self._lock:
            for f in self._faults:
                row = out.setdefault(f.kind, {"injected": 0, "retried": 0, "survived": 0})
                row["retried"] += f.retried
                row["survived"] += f.survived
            for k, n in self.counts.items():
                out.setdefault(k, {"injected": 0, "retried": 0, "survived": 0})["injected"] = n
        return out

    # -- serving ---------------------------------------------------------------------------
    def start(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", self.port))
        self._sock.listen(128)
        self.port = self._sock.getsockname()[1]
        t = threading.Thread(target=self._accept, daemon=True, name="faulty-proxy")
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        self._closing = True
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _choose(self, method: str, target: str) -> str | None:
        with self._lock:
            self.requests += 1
            if self._down:
                kind = "slowdown"
            elif self.only_path is not None and self.only_path not in target:
                return None
            elif self._rng.random() < self.fraction:
                kind = self._rng.choice(self.kinds)
            else:
                return None
            self.counts[kind] = self.counts.get(kind, 0) + 1
            return kind

    def _note(self, key: tuple, kind: str | None) -> None:
        """Records a fault for `key`; the faults before it on `key` were retried (and, when this
        one goes through, survived)."""
        with self._lock:
            earlier = self._open.pop(key, [])
            for f in earlier:
                f.retried = True
                f.survived = kind is None
            if kind is not None:
                fault = _Pending(kind)
                self._faults.append(fault)
                self._open[key] = [*earlier, fault]

    def _serve(self, conn: socket.socket) -> None:
        f = conn.makefile("rb")
        try:
            while True:
                head = _read_head(f)
                if head is None:
                    return
                request_line, headers = head
                method, target, _ = request_line.split(" ", 2)
                if headers.get("expect", "").lower() == "100-continue":
                    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = _read_body(f, headers, method, is_request=True)
                key = (method, target, headers.get("range", ""))
                kind = self._choose(method, target)
                self._note(key, kind)
                if kind in _ERRORS:
                    status, reason, code, message = _ERRORS[kind]
                    xml = (
                        '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>'
                        f"{code}</Code><Message>{message}</Message><RequestId>proxy</RequestId>"
                        "</Error>"
                    ).encode()
                    conn.sendall(
                        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
                        f"Content-Length: {len(xml)}\r\n\r\n".encode()
                        + xml
                    )
                    continue
                if kind == "delay":
                    time.sleep(self.delay_s)
                    return
                if kind == "reset" and method != "GET":
                    _reset(conn)
                    return
                status_line, rheaders, rbody = self._forward(request_line, headers, body, method)
                out = [status_line]
                for k, v in rheaders:
                    if k.lower() not in ("connection", "transfer-encoding", "content-length",
                                         "keep-alive"):  # fmt: skip
                        out.append(f"{k}: {v}")
                length = dict((k.lower(), v) for k, v in rheaders).get("content-length")
                if method == "HEAD" and length is not None:
                    out.append(f"Content-Length: {length}")
                else:
                    out.append(f"Content-Length: {len(rbody)}")
                data = ("\r\n".join(out) + "\r\n\r\n").encode()
                if kind == "reset":
                    conn.sendall(data + rbody[: len(rbody) // 2])
                    _reset(conn)
                    return
                conn.sendall(data + (b"" if method == "HEAD" else rbody))
        except (OSError, ValueError):
            return
        finally:
            with contextlib.suppress(OSError):
                f.close()
                conn.close()

    def _forward(self, request_line: str, headers: dict, body: bytes, method: str):
        up = socket.create_connection(self.upstream, timeout=60)
        try:
            lines = [request_line]
            for k, v in headers.items():
                if k in ("connection", "expect", "transfer-encoding", "content-length"):
                    continue
                lines.append(f"{k}: {v}")
            lines += [f"Content-Length: {len(body)}", "Connection: close"]
            up.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
            uf = up.makefile("rb")
            head = _read_head(uf, keep_case=True)
            if head is None:
                raise OSError("upstream closed")
            status_line, rheaders = head
            hdrs = {k.lower(): v for k, v in rheaders}
            rbody = b"" if method == "HEAD" else _read_body(uf, hdrs, method, is_request=False)
            return status_line, rheaders, rbody
        finally:
            up.close()


def _reset(conn: socket.socket) -> None:
    """Closes `conn` with a TCP RST (SO_LINGER 0): the client sees 'connection reset'."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def _read_head(f, *, keep_case: bool = False):
    """(first line, headers) of an HTTP message; None at a clean end of the connection.
    headers: a dict of lower-cased names (requests) or a list of (name, value) (keep_case)."""
    line = f.readline()
    while line in (b"\r\n", b"\n"):
        line = f.readline()
    if not line:
        return None
    first = line.decode("latin-1").rstrip("\r\n")
    pairs = []
    while True:
        h = f.readline()
        if not h:
            raise ValueError("connection closed inside the headers")
        if h in (b"\r\n", b"\n"):
            break
        k, _, v = h.decode("latin-1").partition(":")
        pairs.append((k.strip(), v.strip()))
    if keep_case:
        return first, pairs
    return first, {k.lower(): v for k, v in pairs}


def _read_body(f, headers: dict, method: str, *, is_request: bool) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        out = bytearray()
        while True:
            size = int(f.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while f.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return bytes(out)
            out += f.read(size)
            f.readline()
    if "content-length" in headers:
        n = int(headers["content-length"])
        data = f.read(n)
        if len(data) != n:
            raise ValueError("short body")
        return data
    return b"" if is_request else f.read()


@contextlib.contextmanager
def faulty_proxy(s3, **kwargs) -> Iterator[FaultyProxy]:
    """A FaultyProxy in front of `s3` (an S3Server); AWS_ENDPOINT_URL points at it meanwhile
    (this process and what it starts; s3.client() still talks to the server directly)."""
    proxy = FaultyProxy(upstream=("127.0.0.1", s3.port), **kwargs)
    proxy.start()
    saved = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
    try:
        yield proxy
    finally:
        if saved is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
        else:
            os.environ["AWS_ENDPOINT_URL"] = saved
        proxy.stop()
