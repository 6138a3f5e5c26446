"""One writer per directory: a lease that a training run (its run directory), a prepare (its
data.out_dir) and a sweep (its sweep directory) hold while they write there.

A lease is a small JSON file (an object on s3:// or gs://) naming its holder: host, pid, the
process's start time, since when it holds the lease, and a heartbeat its background thread
renews every ttl/4 seconds. Another process that finds it:

* refuses (LeaseHeld, one line naming the holder, its heartbeat's age and the remedy) while
  the holder is alive: the heartbeat is younger than the TTL (RAYGPT_LEASE_TTL_S, default
  DEFAULT_TTL_S) and, when the holder ran on this same machine (same boot and pid namespace),
  its process still runs;
* takes it over when it expired: the heartbeat is older than the TTL (kill -9 on another node,
  node loss), or the holder's process on this machine is gone (kill -9 here: no wait).

The holder deletes the lease when it ends (with, for training, SIGTERM and `ray job stop`: the
run stops and exits normally). Ray Train's restarts of a run (cluster.max_failures) happen
under the driver's lease, which the workers never touch.

How a lease is taken, and what that guarantees:

* Local and shared paths: a fresh lease is created with O_CREAT|O_EXCL, which one process wins
  on a local filesystem and on NFS v3+. An expired one is replaced by compare-then-write: the
  taker reads it again right before replacing it (it must still be the expired holder's), then
  waits SETTLE_LOCAL_S and reads it back; whoever's token is there holds it.
* Object storage: pyarrow.fs has no conditional put (it does not send If-None-Match, checked
  against moto, which honours it), so every take is write, wait SETTLE_REMOTE_S, read back
  (S3 and GCS read their own writes strongly consistently). Two takers both win only if one
  of them spends more than the settle time between its last read and its write (a stalled
  process); the heartbeat thread re-reads the lease before every renewal, so such a loser
  learns it within ttl/4 seconds and says so in one line.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from typing import Any, Optional

from data_pipeline import storage

LEASE_FILE = "lease.json"  # inside a run or sweep directory
TTL_ENV = "RAYGPT_LEASE_TTL_S"
DEFAULT_TTL_S = 120.0
SETTLE_LOCAL_S = 0.2
SETTLE_REMOTE_S = 1.0


class LeaseHeld(storage.StorageError):
    """Another live process holds the lease; str() is one line naming it and the remedy."""


def ttl_s() -> float:
    """The TTL from RAYGPT_LEASE_TTL_S (seconds > 0), else DEFAULT_TTL_S."""
    raw = os.environ.get(TTL_ENV, "").strip()
    if not raw:
        return DEFAULT_TTL_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise storage.StorageError(f"{TTL_ENV} ({raw!r}) must be a number of seconds > 0")
    return value


def _read_first(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def machine_id() -> str:
    """This machine and pid namespace: a pid means the same process only where this matches
    (hostname, boot id, the pid namespace's inode)."""
    try:
        ns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        ns = ""
    return f"{socket.gethostname()}/{_read_first('/proc/sys/kernel/random/boot_id')}/{ns}"


def process_start(pid: int) -> Optional[str]:
    """The start time of process `pid` (clock ticks since boot, /proc/<pid>/stat field 22), or
    None if there is no such process or it is a zombie: with the pid, it names one process."""
    stat = _read_first(f"/proc/{pid}/stat")
    if not stat:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    if not fields or fields[0] == "Z":  # killed, not reaped yet: gone
        return None
    return fields[19] if len(fields) > 19 else None


def _utc(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


class Lease:
    """The lease at `uri` for `what` (e.g. "run 'demo'"); use as a context manager or call
    acquire() / release(). `remedy`: what a refused user should do besides waiting."""

    def __init__(self, uri: str, what: str, *, remedy: str = "", ttl: Optional[float] = None):
        self.uri = uri
        self.what = what
        self.remedy = remedy
        self.ttl = ttl_s() if ttl is None else ttl
        self.remote = storage.is_remote(uri)
        self.token = uuid.uuid4().hex
        self.took_over: Optional[dict[str, Any]] = None  # the expired holder's record
        self.lost: Optional[dict[str, Any]] = None  # who holds it after we lost it
        self._created_dir: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._started = time.time()

    # ------------------------------------------------------------------ the record

    def record(self) -> dict[str, Any]:
        pid = os.getpid()
        return {
            "what": self.what,
            "token": self.token,
            "host": socket.gethostname(),
            "machine": machine_id(),
            "pid": pid,
            "pid_start": process_start(pid),
            "since": self._started,
            "heartbeat": time.time(),
            "ttl_s": self.ttl,
        }

    def read(self) -> Optional[dict[str, Any]]:
        """The lease's record; None if there is none; {} if it is not readable JSON (a holder
        killed while creating it, or one creating it right now)."""
        try:
            text = storage.read_text(self.uri)
        except FileNotFoundError:
            return None
        try:
            rec = json.loads(text)
        except ValueError:
            return {}
        return rec if isinstance(rec, dict) else {}

    def _age(self, rec: dict[str, Any]) -> float:
        """Seconds since the holder's last heartbeat (or since the file changed, unreadable)."""
        beat = rec.get("heartbeat")
        if isinstance(beat, (int, float)):
            return time.time() - beat
        try:
            mtime = storage.info(self.uri).mtime
            return time.time() - mtime.timestamp() if mtime else 0.0
        except (OSError, AttributeError):
            return 0.0

    def expired(self, rec: dict[str, Any]) -> Optional[str]:
        """Why the holder of `rec` is gone (the lease may be taken over), or None if it lives."""
        age = self._age(rec)
        ttl = float(rec.get("ttl_s") or self.ttl)
        ttl = max(ttl, self.ttl)  # the holder renews every ttl/4 of ITS ttl
        if age > ttl:
            return f"its heartbeat is {age:.0f} s old (TTL {ttl:g} s)"
        pid = rec.get("pid")
        if rec.get("machine") == machine_id() and isinstance(pid, int):
            if process_start(pid) != rec.get("pid_start"):
                return f"its process {pid} on this machine is gone"
        return None

    def describe(self, rec: dict[str, Any]) -> str:
        if not rec:
            return f"a process that is creating it now (unreadable {self.uri})"
        return (
            f"host {rec.get('host')} pid {rec.get('pid')} since "
            f"{_utc(float(rec.get('since') or 0))}, heartbeat {self._age(rec):.0f} s ago"
        )

    def _refuse(self, rec: dict[str, Any]) -> LeaseHeld:
        ttl = max(float(rec.get("ttl_s") or self.ttl), self.ttl)
        left = max(0.0, ttl - self._age(rec))
        return LeaseHeld(
            f"{self.what} is in use by {self.describe(rec)} (lease {self.uri}): wait for it "
            f"to end{', ' + self.remedy if self.remedy else ''}; if that process is dead "
            f"(killed, node lost), its lease expires {left:.0f} s from now ({TTL_ENV}="
            f"{ttl:g}) and the same command then takes it over"
        )

    # ------------------------------------------------------------------ writing

    def _payload(self) -> bytes:
        return (json.dumps(self.record(), sort_keys=True) + "\n").encode()

    def _create_exclusive(self) -> bool:
        """Local: creates the lease file if there is none (O_EXCL); False if there is one."""
        path = storage.filesystem(self.uri)[1]
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            top = parent
            while not os.path.exists(os.path.dirname(top)):
                top = os.path.dirname(top)
            os.makedirs(parent, exist_ok=True)
            self._created_dir = top  # removed at release if nothing else was written there
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(self._payload())
            f.flush()
            os.fsync(f.fileno())
        return True

    def _write(self) -> None:
        storage.write_bytes(self.uri, self._payload())  # local: temp file renamed into place

    def _mine(self, rec: Optional[dict[str, Any]]) -> bool:
        return bool(rec) and rec.get("token") == self.token

    def _gone(self, rec: dict[str, Any]) -> Optional[str]:
        """expired(), and an unreadable lease older than the TTL."""
        if rec:
            return self.expired(rec)
        age = self._age(rec)
        return f"its unreadable lease is {age:.0f} s old" if age > self.ttl else None

    # ------------------------------------------------------------------ acquire / release

    def acquire(self) -> Lease:
        """Takes the lease or raises LeaseHeld (one line); takes over an expired one (its
        holder in self.took_over, and one line on stderr). StorageError (one line) where the
        lease cannot be written."""
        try:
            self._acquire()
        except storage.StorageError:
            raise
        except OSError as e:
            raise storage.StorageError(
                f"{self.what}: cannot write its lease {self.uri}: {storage.one_line(e)}"
            ) from None
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _acquire(self) -> None:
        for _ in range(5):
            if not self.remote and self._create_exclusive():
                break
            rec = self.read()
            if rec is None and not self.remote:
                continue  # released between our create and our read: try again
            why = None if rec is None else self._gone(rec)
            if rec is not None and why is None:
                raise self._refuse(rec)
            if self.read() != rec:  # compare, then write: someone else is taking it
                continue
            self._write()
            time.sleep(SETTLE_REMOTE_S if self.remote else SETTLE_LOCAL_S)
            back = self.read()
            if self._mine(back):
                if rec is not None:
                    self.took_over = rec
                    print(
                        f"{self.what}: took over the lease of {self.describe(rec)}: {why}",
                        file=sys.stderr,
                        flush=True,
                    )
                break
            if back is not None and self._gone(back) is None:
                raise self._refuse(back)  # another taker won the race
        else:
            raise LeaseHeld(f"{self.what}: could not take its lease {self.uri} (contended)")

    def _beat(self) -> None:
        warned = False
        while not self._stop.wait(max(0.5, self.ttl / 4)):
            try:
                rec = self.read()
                if not self._mine(rec):
                    self.lost = rec or {}
                    print(
                        f"warning: {self.what}: lost its lease {self.uri} to "
                        f"{self.describe(rec or {})}; two writers may now share it",
                        file=sys.stderr,
                        flush=True,
                    )
                    return
                self._write()
                warned = False
            except OSError as e:  # a storage hiccup: try again at the next beat
                if not warned:
                    print(
                        f"warning: {self.what}: renewing its lease {self.uri} failed "
                        f"({storage.one_line(e)}); retrying",
                        file=sys.stderr,
                        flush=True,
                    )
                    warned = True

    def release(self) -> None:
        """Stops the heartbeat and deletes the lease if it is still ours; a local directory
        the lease created is removed if nothing else was written there."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        with contextlib.suppress(OSError):
            if self._mine(self.read()):
                storage.delete(self.uri)
        if storage.is_remote(self.uri):
            # the store keeps an empty "directory" object where the lease was deleted: gone
            # too when nothing else was written there (a run refused after taking its lease)
            with contextlib.suppress(OSError, storage.StorageError):
                fs, path = storage.filesystem(self.uri)
                folder = path.rsplit("/", 1)[0]
                if not storage.walk_files(self.uri.rsplit("/", 1)[0]):
                    fs.delete_dir(folder)
        elif self._created_dir:
            with contextlib.suppress(OSError):
                path = storage.filesystem(self.uri)[1]
                d = os.path.dirname(path)
                while True:
                    os.rmdir(d)  # only when empty
                    if d == self._created_dir:
                        break
                    d = os.path.dirname(d)

    def __enter__(self) -> Lease:
        self.acquire()
        self._sigterm = _exit_on_sigterm()
        self._sigterm.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self._sigterm.__exit__(*exc)
        finally:
            self.release()


@contextlib.contextmanager
def _exit_on_sigterm():
    """While a lease is held, SIGTERM with no handler of its own (the default kills at once)
    raises SystemExit(143) instead, so the lease is released on the way out. Code that handles
    SIGTERM itself (a run's stop request) installs its handler inside and restores this one."""
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def dir_lease(dir_uri: str, what: str, *, remedy: str = "") -> Lease:
    """The lease of a run or sweep directory: <dir>/lease.json."""
    return Lease(storage.join(dir_uri, LEASE_FILE), what, remedy=remedy)


def sibling_lease(dir_uri: str, what: str, *, remedy: str = "") -> Lease:
    """The lease of a directory that must hold nothing else (prepare's out_dir):
    <dir>.lease.json beside it."""
    return Lease(storage.absolute(dir_uri).rstrip("/") + ".lease.json", what, remedy=remedy)
