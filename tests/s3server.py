"""A real S3-compatible server for tests: moto's server in a subprocess on a free local port.

    with s3_server() as s3:          # or the session-scoped `s3` fixture (tests/conftest.py)
        s3.uri("data")               # -> "s3://raygpt-test/data"
        s3.unique_uri("run")         # -> "s3://raygpt-test/run-1f2e3d4c" (a fresh prefix)

For the duration it sets AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY=testing,
AWS_DEFAULT_REGION=us-east-1 and AWS_EC2_METADATA_DISABLED=true in os.environ (restored after),
so this process, its subprocesses and Ray instances started after it reach the server. Every
session (each pytest-xdist worker) starts its own server on its own port. The server is stopped
by its PID at the end, always (SIGTERM, then SIGKILL after a timeout).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_BUCKET = "raygpt-test"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


@dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str  # created at start
    port: int
    pid: int
    env: dict[str, str] = field(default_factory=dict)  # what is set in os.environ meanwhile

    def uri(self, prefix: str = "") -> str:
        """s3://<bucket>/<prefix> (the bucket itself for an empty prefix)."""
        prefix = prefix.strip("/")
        return f"s3://{self.bucket}/{prefix}" if prefix else f"s3://{self.bucket}"

    def unique_uri(self, name: str = "t") -> str:
        """A prefix no other test uses (tests share the server and its bucket)."""
        return self.uri(f"{name}-{uuid.uuid4().hex[:8]}")

    def client(self):
        """A boto3 S3 client for this server (boto3 comes with moto)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def create_bucket(self, name: str) -> str:
        """Creates another bucket; returns s3://<name>."""
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def keys(self, prefix: str = "", bucket: str | None = None) -> list[str]:
        """Every object key under `prefix`, sorted."""
        paginator = self.client().get_paginator("list_objects_v2")
        out: list[str] = []
        for page in paginator.paginate(Bucket=bucket or self.bucket, Prefix=prefix):
            out += [obj["Key"] for obj in page.get("Contents", [])]
        return sorted(out)

    def read(self, key: str, bucket: str | None = None) -> bytes:
        return self.client().get_object(Bucket=bucket or self.bucket, Key=key)["Body"].read()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moto_server_command() -> list[str]:
    exe = Path(sys.executable).parent / "moto_server"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("moto_server")
    if found:
        return [found]
    return [sys.executable, "-m", "moto.server"]


def _answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(endpoint + "/", timeout=2) as r:
            return r.status < 500
    except urllib.error.HTTPError as e:
        return e.code < 500
    except (OSError, ValueError):
        return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT_S)


def _start(log_path: Path) -> tuple[subprocess.Popen, int]:
    """moto_server on a free port, answering; a few tries (the port may be taken meanwhile)."""
    last = ""
    for _ in range(3):
        port = free_port()
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [*moto_server_command(), "-H", "127.0.0.1", "-p", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal reaches pytest, not it
            )
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            if _answers(endpoint):
                return proc, port
            time.sleep(0.2)
        _stop(proc)
        last = log_path.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"moto_server did not start; its log ends with:\n{last}")


@contextlib.contextmanager
def s3_server(bucket: str = DEFAULT_BUCKET) -> Iterator[S3Server]:
    """Starts moto's S3 server, creates `bucket`, sets the AWS environment; undoes it all."""
    log_dir = Path(tempfile.mkdtemp(prefix="raygpt-moto-"))
    proc, port = _start(log_dir / "moto.log")
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in (*env, "AWS_SESSION_TOKEN", "AWS_PROFILE")}
    try:
        os.environ.update(env)
        for k in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):  # would override the test keys
            os.environ.pop(k, None)
        server = S3Server(endpoint=endpoint, bucket=bucket, port=port, pid=proc.pid, env=env)
        server.create_bucket(bucket)
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _stop(proc)
        shutil.rmtree(log_dir, ignore_errors=True)
