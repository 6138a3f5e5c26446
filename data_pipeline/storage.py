"""Storage URIs: local paths, shared mounts and object stores (s3://, gs://) through pyarrow.fs.

Every path a run reads or writes (run.root, data.out_dir, model.init_from, export source and
target) is a URI handled here, on the driver and on every worker alike. A local path is a URI
too (no scheme). Object-store URIs keep their scheme everywhere: Ray Train gets run.root as is.

s3:// follows the usual AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...); connects
and requests time out after a few seconds and are retried a bounded number of times, so an
unreachable endpoint is an error, not a hang.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import pyarrow.fs as pafs

REMOTE_SCHEMES = ("s3", "gs", "gcs")


class StorageError(OSError):
    """A URI that cannot be used; str() is one line naming the URI and what is wrong."""


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
def _remote_fs(kind: str, endpoint: Optional[str], _identity: str = "") -> pafs.FileSystem:
    """_identity (the access key id and region) is only part of the cache key: new credentials
    in the environment get a new filesystem."""
    if kind == "s3":
        retry = pafs.AwsStandardS3RetryStrategy(max_attempts=3)
        kwargs = {"connect_timeout": 5, "request_timeout": 30, "retry_strategy": retry}
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
            _remote_fs("s3", os.environ.get("AWS_ENDPOINT_URL"), identity),
            uri.split("://", 1)[1],
        )
    if s in ("gs", "gcs"):
        return _remote_fs("gs", None), uri.split("://", 1)[1]
    return pafs.LocalFileSystem(), absolute(uri)


def _call(what: str, uri: str, fn, *args):
    try:
        return fn(*args)
    except FileNotFoundError:
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
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return

    def write() -> None:
        with fs.open_output_stream(path) as f:
            f.write(data)

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
    _call("copy", f"{src} -> {dest}", pafs.copy_files, spath, dpath, sfs, dfs)


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
        raise StorageError(f"{what} ({uri}): not writable: {explain_remote(e)}") from None


def check_readable(uri: str, what: str) -> None:
    """`uri` exists and can be read (a file or a non-empty directory/prefix)."""
    check_scheme(uri, what)
    try:
        ok = is_file(uri) or is_dir(uri)
    except (StorageError, OSError) as e:
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
    "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
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
