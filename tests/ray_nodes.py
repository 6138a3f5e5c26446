"""A real two-node Ray cluster on this machine, for the e2e tests of the users' ground.

    with TwoNodes.start(extra_env) as nodes:   # or the `ray_nodes` fixture (module scope)
        nodes.address                      # "127.0.0.1:P": cluster.address=... of a run
        nodes.dashboard_url                # "http://127.0.0.1:Q": ray job submit --address
        nodes.env                          # the nodes' environment (RAY_AUTH_MODE=token ...)
        nodes.kill_second_raylet()         # SIGKILL node 2's raylet (a lost node)
        nodes.restart_second()             # a fresh node 2 joins (a replacement node)

Each node is `ray start ... --block` in a session of its own (start_new_session), with one
CPU, its own temp dir and its own ports (several Ray clusters share this machine while the
test suite runs, so nothing is left at Ray's fixed defaults). Ray 2.60 turns token auth on
for a head started where ~/.ray/auth_token exists; joining nodes and every client then need
RAY_AUTH_MODE=token, which `env` carries. Nodes do NOT get this environment's AWS_* variables
(the tests' S3 server): only what `extra_env` gives them (e.g. credentials of their own); the
rest must come with the settings raygpt passes on.

Teardown stops only what this module started: SIGTERM to each `ray start --block` process
(Ray drains, then stops that node's processes), then SIGKILL to every process still in that
node's session, each step with a timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
# Lost raylets are declared dead in ~3 s instead of ~15 s (GCS health checks).
SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
START_TIMEOUT_S = 180  # a node start takes 10-40 s on 2 loaded cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def worker_port_range(n: int = 100) -> tuple[int, int]:
    """A private worker port range below the ephemeral ports (Ray's default, 10002-19999, is
    shared by every other Ray on this machine)."""
    for _ in range(50):
        lo = random.randrange(20000, 32000 - n, 10)
        if all(_bindable(p) for p in range(lo, lo + n)):
            return lo, lo + n - 1
    raise RuntimeError("no free worker port range")


def auth_env() -> dict[str, str]:
    """RAY_AUTH_MODE=token where Ray 2.60 turns token auth on for a head (a token exists)."""
    if os.environ.get("RAY_AUTH_MODE"):
        return {}
    token = Path.home() / ".ray" / "auth_token"
    return {"RAY_AUTH_MODE": "token"} if token.is_file() or os.environ.get("RAY_AUTH_TOKEN") else {}


def driver_env(fault: Optional[str] = None) -> dict[str, str]:
    """The environment of a driver or Ray client the test starts: this one with
    RAY_AUTH_MODE where needed, and the fault drill `fault` (RAYGPT_FAULT) or none."""
    env = {**os.environ, **auth_env()}
    env.pop("RAYGPT_FAULT", None)
    if fault:
        env["RAYGPT_FAULT"] = fault
    return env


def node_env(address: str) -> dict[str, str]:
    """The nodes' environment: this one without the S3 settings, with this interpreter's bin
    first on PATH (a job's `python` is the cluster's Python), RAY_AUTH_MODE where needed, and
    RAY_ADDRESS (Ray's processes that look for "the" local cluster find this one among the
    other Rays of the test session)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAYGPT_FAULT"))}
    env.update(auth_env())
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["RAY_ADDRESS"] = address
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "2"  # teardown: `ray start` drains 30 s
    env.pop("PYTHONPATH", None)
    return env


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _sid(pid: int) -> Optional[int]:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie of ours counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class Node:
    """One `ray start --block` process and the Ray processes of its session."""

    def __init__(self, name: str, args: list[str], env: dict[str, str]):
        self.name = name
        self.temp_dir = tempfile.mkdtemp(prefix=f"rg{name}-", dir="/tmp")  # sockets: short path
        self.log_path = Path(self.temp_dir + ".log")
        lo, hi = worker_port_range()
        ports = {
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--metrics-export-port": free_port(),
            "--min-worker-port": lo,
            "--max-worker-port": hi,
        }
        cmd = [
            RAY, "start", *args,
            "--node-ip-address=127.0.0.1",
            "--num-cpus=1",
            "--num-gpus=0",
            "--object-store-memory=200000000",
            f"--temp-dir={self.temp_dir}",
            *(f"{k}={v}" for k, v in ports.items()),
            "--disable-usage-stats",
            "--block",
        ]  # fmt: skip
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.sid = self.proc.pid  # start_new_session: the session id is the child's pid

    def wait_started(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "Ray runtime started" in self.log_path.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        raise RuntimeError(f"ray node {self.name} did not start:\n{self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def session_pids(self) -> list[int]:
        """Every live process of this node's session (the processes it started)."""
        return [p for p in _pids() if _sid(p) == self.sid and alive(p)]

    def raylet_pid(self) -> Optional[int]:
        socket_arg = f"--raylet_socket_name={self.temp_dir}/"
        for pid in self.session_pids():
            cmd = _cmdline(pid)
            if cmd and cmd[0].endswith("/raylet") and any(a.startswith(socket_arg) for a in cmd):
                return pid
        return None

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM `ray start` (it drains and stops its processes), then SIGKILL stragglers."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                left = self.session_pids()
                if not left:
                    break
                for pid in left:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.3)
        finally:
            self._log.close()

    def remove_files(self) -> None:
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.log_path.unlink(missing_ok=True)


def _client(env: dict[str, str], code: str, *args: str, timeout: float = 120) -> Any:
    """Runs `code` (which prints one JSON value) in a fresh interpreter with Ray's client env."""
    out = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"ray client failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


_ALIVE_NODES = """
import json, sys
from ray._raylet import GcsClient
from ray.core.generated.gcs_pb2 import GcsNodeInfo
infos = GcsClient(address=sys.argv[1]).get_all_node_info(timeout=30)
print(json.dumps(sorted(
    i.node_id.hex() for i in infos.values() if i.state == GcsNodeInfo.GcsNodeState.ALIVE)))
"""

_ACTORS = """
import json, sys
from ray.util.state import list_actors
rows = list_actors(address=sys.argv[1], filters=[("class_name", "=", sys.argv[2])], detail=True,
                   limit=1000, raise_on_missing_output=False)
print(json.dumps([{k: getattr(r, k) for k in ("actor_id", "node_id", "job_id", "state", "pid")}
                  for r in rows]))
"""


class TwoNodes:
    def __init__(self, extra_env: Optional[dict[str, str]] = None) -> None:
        self.extra_env = dict(extra_env or {})  # more environment for the nodes
        self.nodes: list[Node] = []  # every node ever started (teardown stops them all)
        self.head: Optional[Node] = None
        self.second: Optional[Node] = None
        self._new_ports()

    def _new_ports(self) -> None:
        self.port = free_port()
        self.dashboard_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**node_env(self.address), **self.extra_env}
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"

    @classmethod
    @contextlib.contextmanager
    def start(cls, extra_env: Optional[dict[str, str]] = None, *, second: bool = True):
        """second=False: the head alone (a one-node cluster of one CPU)."""
        nodes = cls(extra_env)
        try:
            nodes._start_head()
            if second:
                nodes.second = nodes._start_worker_node("b")
            nodes.wait_alive(2 if second else 1)
            yield nodes
        finally:
            nodes.stop()

    # On busy cores a raylet can give up waiting for its dashboard agent (Ray 2.60 waits 15 s
    # for the agent's port files, not configurable: "Timed out waiting for file
    # .../dashboard_agent_listen_port_*"); `ray start` then exits. A new try usually succeeds.
    def _start_head(self, tries: int = 3) -> None:
        for i in range(tries):
            if i:
                self._new_ports()
            self.head = Node(
                f"a{i}" if i else "a",
                [
                    "--head",
                    f"--port={self.port}",
                    "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={self.dashboard_port}",
                    f"--ray-client-server-port={free_port()}",
                    f"--system-config={json.dumps(SYSTEM_CONFIG)}",
                ],
                self.env,
            )
            self.nodes.append(self.head)
            try:
                self.head.wait_started()
                return
            except RuntimeError:
                self.head.stop(timeout=30)
                if i == tries - 1:
                    raise

    def _start_worker_node(self, name: str, tries: int = 3) -> Node:
        """A node joining the head (tries as for the head)."""
        for i in range(tries):
            node = Node(f"{name}{i}" if i else name, [f"--address={self.address}"], self.env)
            self.nodes.append(node)
            try:
                node.wait_started()
                return node
            except RuntimeError:
                node.stop(timeout=30)
                if i == tries - 1:
                    raise
        raise AssertionError("unreachable")

    # -- the cluster's view -------------------------------------------------------------------
    def alive_node_ids(self) -> list[str]:
        return _client(self.env, _ALIVE_NODES, self.address)

    def wait_alive(self, n: int, timeout: float = START_TIMEOUT_S) -> list[str]:
        deadline = time.monotonic() + timeout
        ids: list[str] = []
        while time.monotonic() < deadline:
            ids = self.alive_node_ids()
            if len(ids) == n:
                return ids
            time.sleep(1.0)
        raise RuntimeError(f"{len(ids)} Ray nodes alive after {timeout} s, expected {n}")

    def actors(self, class_name: str = "RayTrainWorker") -> list[dict[str, Any]]:
        """The cluster's actors of a class, dead ones included (node_id, job_id, state, pid)."""
        return _client(self.env, _ACTORS, self.dashboard_url, class_name)

    # -- node loss ----------------------------------------------------------------------------
    def kill_second_raylet(self) -> int:
        """SIGKILL node 2's raylet (its workers and agents die with it); returns its pid."""
        assert self.second is not None
        pid = self.second.raylet_pid()
        assert pid is not None, f"node 2 has no raylet:\n{self.second.log_tail()}"
        os.kill(pid, signal.SIGKILL)
        return pid

    def restart_second(self, timeout: float = START_TIMEOUT_S) -> None:
        """A fresh node 2 (new temp dir, new node id) joins; the old one's processes go."""
        old = self.second
        if old is not None:
            old.stop(timeout=30)
        self.second = self._start_worker_node(f"b{len(self.nodes)}")
        self.wait_alive(2, timeout)

    def temp_dirs(self) -> list[str]:
        return [n.temp_dir for n in self.nodes]

    def stop(self) -> None:
        for node in reversed(self.nodes):  # worker nodes first, the head last
            try:
                node.stop()
            except Exception as e:  # noqa: BLE001 - keep stopping the others
                print(f"ray_nodes: stopping node {node.name}: {e}", file=sys.stderr)
        for node in self.nodes:
            node.remove_files()


@pytest.fixture(scope="module")
def ray_nodes():
    """A two-node Ray cluster (one CPU per node) for one test module."""
    with TwoNodes.start() as nodes:
        yield nodes
