"""Storage URIs: local paths, shared mounts and object stores (s3://, gs://) through pyarrow.fs.

Every path a run reads or writes (run.root, data.out_dir, model.init_from, export source and
target) is a URI handled here, on the driver and on every worker alike. A local path is a URI
too (no scheme). Object-store URIs keep their scheme everywhere: Ray Train gets run.root as is.

s3:// follows the usual AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...). Object
stores fail transiently (503 SlowDown, 500, reset connections, timeouts): every request is
retried by the AWS SDK with backoff, and every whole operation of this module (and the loader's
reads) again by `retrying`, both bounded by StorageConfig (the `storage` config group); a store
that stays down ends in one StorageError naming the operation, the URI and the store's code,
never a hang, and throttling is never reported as a missing, unwritable or corrupt object.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import random
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, TypeVar

import pyarrow.fs as pafs

REMOTE_SCHEMES = ("s3", "gs", "gcs")


log = logging.getLogger(__name__)
T = TypeVar("T")


class StorageError(OSError):
    """A URI that cannot be used; str() is one line naming the URI and what is wrong.
    transient: the store kept failing with a transient code (throttling, 5xx, resets,
    timeouts) through the whole retry budget: retry later, nothing is wrong with the data."""

    transient: bool = False


@dataclass(frozen=True, kw_only=True)
class StorageConfig:
    """How object-store requests are retried (`storage` config group; local paths are not
    retried). S3 asks clients to back off for seconds under SlowDown: the defaults ride out a
    minute or so of throttling per operation before the run stops with one line.

    request_attempts: tries of one HTTP request by the AWS SDK, with its own backoff (measured
    with pyarrow 26 against a closed port: 3 tries 2.5 s, 5 tries 8 s, 10 tries 100 s).
    op_attempts: tries of a whole operation (a read, a put, a ranged read of a shard) by
    `retrying` once the SDK gave up, waiting base_delay_s * 2**n (full jitter, at most
    max_delay_s) in between. connect/request timeouts: seconds before a silent store counts as
    failed (and is retried)."""

    request_attempts: int = 5
    op_attempts: int = 5
    base_delay_s: float = 1.0
    max_delay_s: float = 20.0
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for k in ("request_attempts", "op_attempts"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} ({getattr(self, k)}) must be >= 1")
        for k in ("base_delay_s", "max_delay_s", "connect_timeout_s", "request_timeout_s"):
            if not getattr(self, k) > 0:
                raise ValueError(f"{k} ({getattr(self, k)}) must be > 0")
        if self.max_delay_s < self.base_delay_s:
            raise ValueError(
                f"max_delay_s ({self.max_delay_s}) must be >= base_delay_s ({self.base_delay_s})"
            )


# The policy travels in this variable: set by configure() on the driver, handed to Ray tasks
# and workers with remote_env(), read by every process's filesystem() and retrying().
POLICY_VAR = "RAYGPT_STORAGE"


def configure(cfg: StorageConfig) -> None:
    """Makes `cfg` this process's storage policy (and its Ray tasks', through remote_env)."""
    os.environ[POLICY_VAR] = json.dumps(dataclasses.asdict(cfg), sort_keys=True)


def policy() -> StorageConfig:
    raw = os.environ.get(POLICY_VAR)
    return StorageConfig(**json.loads(raw)) if raw else StorageConfig()


# Codes and phrases of transient object-store failures (pyarrow's messages carry the AWS
# SDK's error name, e.g. "AWS Error SLOW_DOWN", "AWS Error NETWORK_CONNECTION", curl codes).
_TRANSIENT = re.compile(
    r"SLOW_?DOWN|SlowDown|Throttl|SERVICE_UNAVAILABLE|ServiceUnavailable|INTERNAL_FAILURE|"
    r"InternalError|RequestTimeout|REQUEST_TIMEOUT|NETWORK_CONNECTION|HTTP status 5\d\d|"
    r"response code:? 5\d\d|[Cc]onnection (was )?reset|[Rr]eset by peer|[Tt]imed? ?out|"
    r"curlCode: (?:18|28|52|55|56)\b|Broken pipe|error embedded in a 200 OK",
)
# A refused connection (curl 7) is not one: nothing listens at AWS_ENDPOINT_URL, which the
# SDK's own tries (request_attempts) already waited out; real stores throttle or time out.
_REFUSED = re.compile(r"curlCode: 7\b|Connection refused|Could not connect to server")
# The store's own name for the failure, for the user's line.
_CODE = re.compile(
    r"AWS Error ([A-Z_]+)|<Code>(\w+)</Code>|(SlowDown|InternalError|RequestTimeout|"
    r"ServiceUnavailable)|(?:HTTP status|response code:?) (\d{3})|curlCode: (\d+)"
)


def is_transient(e: BaseException) -> bool:
    """A failure that a later try may not meet: throttling, a 5xx, a reset, a timeout."""
    if isinstance(e, StorageError):
        return e.transient
    if isinstance(e, ConnectionRefusedError) or _REFUSED.search(str(e)):
        return False
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    return bool(_TRANSIENT.search(str(e)))


def store_code(e: BaseException) -> str:
    """The store's code in `e` ("SLOW_DOWN", "503", "curl 28"...), or ""."""
    m = _CODE.search(str(e))
    if not m:
        return ""
    aws, xml, word, http, curl = m.groups()
    if aws == "UNKNOWN" and (status := re.search(r"HTTP status (\d{3})", str(e))):
        return f"HTTP {status.group(1)}"
    return aws or xml or word or (f"HTTP {http}" if http else f"curl {curl}")


@dataclass
class RetryCounts:
    """What `retrying` met in this process (bench/storage_faults.py reads it)."""

    retried: int = 0  # failed tries followed by another
    survived: int = 0  # operations that succeeded after at least one failed try
    gave_up: int = 0  # operations that spent the budget
    seconds_waited: float = 0.0


retry_counts = RetryCounts()
_counts_lock = threading.Lock()


def retrying(what: str, uri: str, fn: Callable[[], T], *, cfg: StorageConfig | None = None) -> T:
    """fn(), tried again with backoff while it fails transiently (is_transient), up to
    cfg.op_attempts tries; then StorageError(transient=True) naming `what`, `uri`, the code
    and the tries. Other errors pass through at once. Local URIs: fn() once."""
    if not is_remote(uri):
        return fn()
    cfg = cfg or policy()
    for attempt in range(1, cfg.op_attempts + 1):
        try:
            out = fn()
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - classified right here
            if not is_transient(e) or isinstance(e, StorageError) and e.transient:
                raise
            if attempt == cfg.op_attempts:
                with _counts_lock:
                    retry_counts.gave_up += 1
                code = store_code(e) or type(e).__name__
                err = StorageError(
                    f"{uri}: cannot {what}: the object store kept failing ({code}) through "
                    f"{cfg.op_attempts} tries of {cfg.request_attempts} requests each; it is "
                    "throttled or down, not the data: retry later, or raise storage.op_attempts "
                    f"/ storage.max_delay_s ({one_line(e)})"
                )
                err.transient = True
                raise err from None
            delay = random.uniform(0, min(cfg.max_delay_s, cfg.base_delay_s * 2 ** (attempt - 1)))
            log.info("%s %s: %s; try %d of %d in %.1f s", what, uri, one_line(e), attempt + 1,
                     cfg.op_attempts, delay)  # fmt: skip
            with _counts_lock:
                retry_counts.retried += 1
                retry_counts.seconds_waited += delay
            time.sleep(delay)
            continue
        if attempt > 1:
            with _counts_lock:
                retry_counts.survived += 1
        return out
    raise AssertionError("unreachable")


def scheme(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else ""


def is_remote(uri: str) -> bool:
    """True for object-store URIs (which are never a folder on this machine)."""
    return scheme(uri) in REMOTE_SCHEMES


def check_scheme(uri: str, what: str) -> None:
    s = scheme(uri)
    if s and s not in (*REMOTE_SCHEMES, "file"):
        raise StorageError(
            f"{what} ({uri}): scheme '{s}://' is not supported (use a local path, s3:// or gs://)"
        )


def absolute(uri: str) -> str:
    """Local paths made absolute (workers run elsewhere); URIs unchanged, file:// stripped."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" in uri:
        return uri.rstrip("/")
    return str(Path(uri).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def name(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


@functools.lru_cache(maxsize=16)
def _remote_fs(
    kind: str, endpoint: Optional[str], _identity: str = "", cfg: StorageConfig = StorageConfig()
) -> pafs.FileSystem:
    """_identity (the access key id and region) is only part of the cache key: new credentials
    in the environment get a new filesystem. The AWS SDK logs nothing (pyarrow's default
    S3LogLevel.Fatal, unless ARROW_S3_LOG_LEVEL asks): its retries are counted, not printed."""
    if kind == "s3":
        retry = pafs.AwsStandardS3RetryStrategy(max_attempts=cfg.request_attempts)
        kwargs = {
            "connect_timeout": cfg.connect_timeout_s,
            "request_timeout": cfg.request_timeout_s,
            "retry_strategy": retry,
        }
        if endpoint:
            kwargs["endpoint_override"] = endpoint
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs)
    return pafs.GcsFileSystem(retry_time_limit=__import__("datetime").timedelta(seconds=30))


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for `uri`."""
    s = scheme(uri)
    if s == "s3":
        identity = "|".join(
            os.environ.get(v, "") for v in ("AWS_ACCESS_KEY_ID", "AWS_DEFAULT_REGION", "AWS_REGION")
        )
        return (
            _remote_fs("s3", os.environ.get("AWS_ENDPOINT_URL"), identity, policy()),
            uri.split("://", 1)[1],
        )
    if s in ("gs", "gcs"):
        return _remote_fs("gs", None), uri.split("://", 1)[1]
    return pafs.LocalFileSystem(), absolute(uri)


def _call(what: str, uri: str, fn, *args):
    """fn(*args), retried while an object store fails transiently; other OSErrors become one
    StorageError line naming `what` and `uri` (FileNotFoundError passes as is)."""
    try:
        return retrying(what, uri, lambda: fn(*args))
    except FileNotFoundError:
        raise
    except StorageError:
        raise
    except OSError as e:
        raise StorageError(f"{uri}: cannot {what}: {one_line(e)}") from None


def one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def info(uri: str) -> pafs.FileInfo:
    fs, path = filesystem(uri)
    return _call("read", uri, fs.get_file_info, path)


def exists(uri: str) -> bool:
    return info(uri).type != pafs.FileType.NotFound


def is_file(uri: str) -> bool:
    return info(uri).type == pafs.FileType.File


def is_dir(uri: str) -> bool:
    """A directory (object stores: a prefix with at least one object under it)."""
    fs, path = filesystem(uri)
    if not is_remote(uri):
        return Path(path).is_dir()
    sel = pafs.FileSelector(path, allow_not_found=True, recursive=False)
    return bool(_call("list", uri, fs.get_file_info, sel))


def size(uri: str) -> int:
    return int(info(uri).size or 0)


def listdir(uri: str) -> list[str]:
    """Names directly under `uri` (files and directories), sorted; [] if it does not exist."""
    fs, path = filesystem(uri)
    sel = pafs.FileSelector(path, allow_not_found=True, recursive=False)
    return sorted(Path(i.path).name for i in _call("list", uri, fs.get_file_info, sel))


def walk_files(uri: str) -> dict[str, int]:
    """Relative path -> size of every file under `uri` (recursive)."""
    fs, path = filesystem(uri)
    sel = pafs.FileSelector(path, allow_not_found=True, recursive=True)
    base = path.rstrip("/") + "/"
    return {
        i.path[len(base) :]: int(i.size or 0)
        for i in _call("list", uri, fs.get_file_info, sel)
        if i.type == pafs.FileType.File
    }


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)

    def read() -> bytes:
        # A random-access file reads the whole object in one or two requests; S3's input
        # stream reads it in 256 KB ranges, one request each (a 10 MB manifest took 41 GETs,
        # 5-6 s at 50 ms of latency, against 2 and 0.37 s).
        with fs.open_input_file(path) as f:
            return f.read()

    return _call("read", uri, read)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode()


@contextlib.contextmanager
def open_input(uri: str) -> Iterator:
    fs, path = filesystem(uri)
    f = _call("read", uri, fs.open_input_file, path)
    try:
        yield f
    finally:
        f.close()


def write_bytes(uri: str, data: bytes) -> None:
    """Writes a whole file. Local: via a temp file renamed into place (never half a file);
    object stores write whole objects anyway."""
    fs, path = filesystem(uri)
    if not is_remote(uri):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(path).with_name(f".{Path(path).name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as e:  # a full disk, a lost permission: no temp file left behind either
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            e.filename = e.filename or path  # a failed write() names no file
            raise
        return

    def write() -> None:
        try:
            with fs.open_output_stream(path) as f:
                f.write(data)
        except OSError:
            abort_uploads([uri])
            raise

    _call("write", uri, write)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode())


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    _call("create", uri, fs.create_dir, path, True)


def delete(uri: str) -> None:
    """Deletes a file or a directory tree; a missing one is fine."""
    fs, path = filesystem(uri)
    i = info(uri)
    if i.type == pafs.FileType.File:
        _call("delete", uri, fs.delete_file, path)
    elif i.type == pafs.FileType.Directory or is_remote(uri):
        with contextlib.suppress(FileNotFoundError):
            _call("delete", uri, fs.delete_dir, path)


def move(src: str, dest: str) -> None:
    """Renames on a local filesystem; copies then deletes on an object store."""
    if not is_remote(src) and not is_remote(dest):
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        os.replace(filesystem(src)[1], filesystem(dest)[1])
        return
    copy_tree(src, dest)
    delete(src)


def copy_tree(src: str, dest: str) -> None:
    """Copies a file or directory tree between any two URIs."""
    sfs, spath = filesystem(src)
    dfs, dpath = filesystem(dest)
    if not is_remote(dest):
        Path(dpath).parent.mkdir(parents=True, exist_ok=True)

    def copy() -> None:
        try:
            pafs.copy_files(spath, dpath, sfs, dfs)
        except OSError:
            if is_remote(dest):
                files = walk_files(src) if not is_file(src) else {"": 0}
                abort_uploads([join(dest, rel) if rel else dest for rel in files])
            raise

    _call("copy", f"{src} -> {dest}", copy)


def abort_uploads(uris: list[str], *, under: bool = False) -> int:
    """Aborts the unfinished multipart uploads of these s3:// objects (with under=True: of every
    object under these folders, given with a trailing "/"; a failed write leaves
    them: pyarrow does not abort them, and S3 bills their parts until a bucket lifecycle rule
    AbortIncompleteMultipartUpload removes them). Needs boto3 (moto's dependency, in the dev
    extra); without it, or with the store still failing, they stay for that rule. Best effort:
    returns how many were aborted, never raises."""
    keys: dict[str, set[str]] = {}
    for u in uris:
        if scheme(u) == "s3":
            bucket, _, key = u.split("://", 1)[1].partition("/")
            keys.setdefault(bucket, set()).add(key)
    if not keys:
        return 0
    try:
        import boto3
    except ImportError:
        return 0
    aborted = 0
    try:
        from botocore.config import Config

        cfg = policy()
        client = boto3.client(
            "s3",
            endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None,
            config=Config(
                retries={"max_attempts": cfg.request_attempts, "mode": "standard"},
                connect_timeout=cfg.connect_timeout_s,
                read_timeout=cfg.request_timeout_s,
            ),
        )
        for bucket, wanted in keys.items():
            prefix = os.path.commonprefix(sorted(wanted))
            pages = client.get_paginator("list_multipart_uploads").paginate(
                Bucket=bucket, Prefix=prefix
            )
            for page in pages:
                for up in page.get("Uploads", []):
                    key = up["Key"]
                    if key in wanted or (under and any(key.startswith(w) for w in wanted)):
                        client.abort_multipart_upload(
                            Bucket=bucket, Key=key, UploadId=up["UploadId"]
                        )
                        aborted += 1
    except Exception as e:  # noqa: BLE001 - best effort; the lifecycle rule is the backstop
        log.info("could not abort unfinished uploads: %s", one_line(e))
    return aborted


def upload(local: Path, dest: str) -> None:
    """A local file or directory to `dest`."""
    copy_tree(str(Path(local).resolve()), dest)


def download(src: str, local: Path) -> Path:
    """`src` (file or directory) to the local path `local`; returns it."""
    if not is_remote(src):
        shutil.copytree(src, local, dirs_exist_ok=True) if Path(src).is_dir() else shutil.copy2(
            src, local
        )
        return Path(local)
    copy_tree(src, str(Path(local).resolve()))
    return Path(local)


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[Path]:
    """A local path holding `uri`: the path itself when local, else a temporary download."""
    if not is_remote(uri):
        yield Path(filesystem(uri)[1])
        return
    tmp = Path(tempfile.mkdtemp(prefix="raygpt-dl-"))
    try:
        target = tmp / name(uri)
        download(uri, target)
        yield target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def nearest_existing(uri: str) -> str:
    """`uri` or its closest existing ancestor (local paths only; URIs returned as is)."""
    if is_remote(uri):
        return uri
    p = Path(absolute(uri))
    while not p.exists() and p != p.parent:
        p = p.parent
    return str(p)


def check_writable(uri: str, what: str) -> None:
    """Writes and deletes a probe object at `uri` (local: in its nearest existing directory,
    which is left as it was). Raises StorageError naming `what`, the URI and the cause:
    missing bucket, missing credentials, unreachable endpoint, read-only location."""
    check_scheme(uri, what)
    where = nearest_existing(uri)
    if not is_remote(where):
        if not Path(where).is_dir():
            raise StorageError(f"{what} ({uri}): {where} exists and is not a directory")
        if not os.access(where, os.W_OK):
            raise StorageError(f"{what} ({uri}): {where} is not writable")
        return
    probe = join(where, f".raygpt-probe-{uuid.uuid4().hex[:12]}")
    try:
        write_bytes(probe, b"probe")
        delete(probe)
    except (StorageError, OSError) as e:
        with contextlib.suppress(OSError):  # never leave the probe behind if it can go
            fs, path = filesystem(probe)
            fs.delete_file(path)
        if is_transient(e):  # throttled or down: not a question of permissions
            raise StorageError(f"{what} ({uri}): {one_line(e)}") from None
        raise StorageError(f"{what} ({uri}): not writable: {explain_remote(e)}") from None


def check_readable(uri: str, what: str) -> None:
    """`uri` exists and can be read (a file or a non-empty directory/prefix)."""
    check_scheme(uri, what)
    try:
        ok = is_file(uri) or is_dir(uri)
    except (StorageError, OSError) as e:
        if is_transient(e):
            raise StorageError(f"{what} ({uri}): {one_line(e)}") from None
        raise StorageError(f"{what} ({uri}): cannot read: {explain_remote(e)}") from None
    if not ok:
        raise StorageError(f"{what} ({uri}): does not exist")


def explain_remote(e: BaseException) -> str:
    """The cause of an object-store failure in words a user can act on."""
    msg = one_line(e)
    low = msg.lower()
    if "nosuchbucket" in low or "bucket does not exist" in low or "not exist" in low:
        return f"the bucket does not exist ({msg})"
    if "accessdenied" in low or "access denied" in low or "forbidden" in low:
        return f"access denied: the credentials cannot write there ({msg})"
    if "credential" in low or "invalidaccesskeyid" in low or "signature" in low:
        return f"missing or wrong credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) ({msg})"
    if "connect" in low or "curl" in low or "timed out" in low or "resolve" in low:
        return f"the endpoint cannot be reached (AWS_ENDPOINT_URL?) ({msg})"
    return msg


# ---------------------------------------------------------------------------- additions (data)

# Object-store settings handed to Ray tasks and workers. Never the secrets themselves
# (AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_ACCESS_KEY_ID): a runtime env is logged by
# Ray's runtime-env agent; workers inherit their node's credentials (the driver's environment
# on the local cluster; on a joined cluster the nodes' own: instance role, profile or the
# environment `ray start` ran in).
REMOTE_ENV_VARS = (
    POLICY_VAR, "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
    "AWS_EC2_METADATA_DISABLED", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE",
    "AWS_CA_BUNDLE", "GOOGLE_APPLICATION_CREDENTIALS",
)  # fmt: skip
# Those that name a file on this machine: meaningless on another machine's node.
LOCAL_FILE_VARS = (
    "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_CA_BUNDLE",
    "GOOGLE_APPLICATION_CREDENTIALS",
)  # fmt: skip


def remote_env(*, other_machines: bool = False) -> dict[str, str]:
    """The object-store settings of this process's environment (REMOTE_ENV_VARS that are set),
    to hand to Ray tasks and actors so they reach the store as this process does.
    other_machines: for processes on other machines (a joined cluster, a submitted job):
    without the settings that name files on this one."""
    skip = LOCAL_FILE_VARS if other_machines else ()
    return {v: os.environ[v] for v in REMOTE_ENV_VARS if v in os.environ and v not in skip}


def check_credentials(uri: str, what: str) -> None:
    """s3:// only, without contacting the store: some source of credentials exists (access keys,
    a profile or shared credentials/config file, web identity, container credentials, or the EC2
    instance metadata unless AWS_EC2_METADATA_DISABLED=true). Without one, the AWS SDK sends
    anonymous requests, which fail later and less clearly (or, on some servers, even succeed).
    Raises StorageError naming `what` and the URI."""
    if scheme(uri) != "s3":
        return
    env = os.environ
    if env.get("AWS_ACCESS_KEY_ID") and not env.get("AWS_SECRET_ACCESS_KEY"):
        raise StorageError(
            f"{what} ({uri}): missing credentials: AWS_ACCESS_KEY_ID is set but "
            "AWS_SECRET_ACCESS_KEY is not"
        )
    sources = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
               "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")  # fmt: skip
    if any(env.get(var) for var in sources):
        return
    files = (
        env.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials",
        env.get("AWS_CONFIG_FILE") or "~/.aws/config",
    )
    if any(Path(f).expanduser().is_file() for f in files):
        return
    if env.get("AWS_EC2_METADATA_DISABLED", "").strip().lower() != "true":
        return  # an instance role may provide them: only a request can tell
    raise StorageError(
        f"{what} ({uri}): missing credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
        "(or AWS_PROFILE, or a ~/.aws/credentials file)"
    )
