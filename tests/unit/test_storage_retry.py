"""data_pipeline/storage.py's retry policy: which failures are transient (throttling, 5xx,
resets, timeouts) and which are not (a missing object, denied access, a corrupt file), and
`retrying` around whole operations. The same against a real flaky store:
tests/e2e/test_flaky_storage.py."""

from __future__ import annotations

import json

import pytest

from data_pipeline import storage
from data_pipeline.storage import StorageConfig, StorageError

FAST = StorageConfig(op_attempts=3, base_delay_s=0.001, max_delay_s=0.002)

TRANSIENT = [
    "When reading information for key 'a' in bucket 'b': AWS Error SLOW_DOWN during "
    "HeadObject operation: Please reduce your request rate.",
    "AWS Error UNKNOWN (HTTP status 503) during GetObject operation: No response body.",
    "AWS Error UNKNOWN (HTTP status 500) during PutObject operation",
    "AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 56, Failure when "
    "receiving data from the peer",
    "curlCode: 28, Timeout was reached",
    "[Errno 104] Connection reset by peer",
]
PERMANENT = [
    "Parquet magic bytes not found in footer. Either the file is corrupted or this is not a "
    "parquet file. s3://b/train-00000-500.parquet",
    "AWS Error ACCESS_DENIED during PutObject operation: Access Denied",
    "AWS Error NO_SUCH_BUCKET during HeadBucket operation",
    "Couldn't deserialize thrift: TProtocolException: Invalid data",
    # nothing listens at the endpoint: the SDK's own tries waited; a wrong AWS_ENDPOINT_URL
    "AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7, Could not connect "
    "to server",
]


@pytest.mark.parametrize("msg", TRANSIENT)
def test_throttling_5xx_resets_and_timeouts_are_transient(msg: str) -> None:
    assert storage.is_transient(OSError(msg))


@pytest.mark.parametrize("msg", PERMANENT)
def test_corruption_and_permissions_are_not(msg: str) -> None:
    assert not storage.is_transient(OSError(msg))


def test_the_store_code_is_named() -> None:
    assert storage.store_code(OSError(TRANSIENT[0])) == "SLOW_DOWN"
    assert storage.store_code(OSError(TRANSIENT[1])) == "HTTP 503"
    assert storage.store_code(OSError(TRANSIENT[4])) == "curl 28"


def _flaky(failures: list[BaseException], result: str = "ok"):
    calls = []

    def fn():
        calls.append(1)
        if len(calls) <= len(failures):
            raise failures[len(calls) - 1]
        return result

    return fn, calls


def test_a_transient_failure_is_tried_again() -> None:
    fn, calls = _flaky([OSError(TRANSIENT[0]), OSError(TRANSIENT[1])])
    before = storage.retry_counts.survived
    assert storage.retrying("read", "s3://b/k", fn, cfg=FAST) == "ok"
    assert len(calls) == 3 and storage.retry_counts.survived == before + 1


def test_the_budget_spent_is_one_line_naming_the_code_not_corruption() -> None:
    fn, calls = _flaky([OSError(TRANSIENT[0])] * 5)
    with pytest.raises(StorageError) as e:
        storage.retrying("read", "s3://b/k", fn, cfg=FAST)
    assert len(calls) == FAST.op_attempts
    assert e.value.transient and storage.is_transient(e.value)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("s3://b/k: cannot read: ")
    assert "SLOW_DOWN" in msg and "3 tries" in msg and "retry later" in msg


@pytest.mark.parametrize(
    "err", [OSError(PERMANENT[0]), FileNotFoundError("s3://b/k"), ValueError("bad")]
)
def test_other_failures_pass_at_once(err: BaseException) -> None:
    fn, calls = _flaky([err])
    with pytest.raises(type(err)):
        storage.retrying("read", "s3://b/k", fn, cfg=FAST)
    assert len(calls) == 1


def test_local_paths_are_not_retried(tmp_path) -> None:
    fn, calls = _flaky([OSError(TRANSIENT[0])])
    with pytest.raises(OSError):
        storage.retrying("read", str(tmp_path), fn, cfg=FAST)
    assert len(calls) == 1


def test_the_policy_travels_in_the_environment(monkeypatch) -> None:
    monkeypatch.delenv(storage.POLICY_VAR, raising=False)
    assert storage.policy() == StorageConfig()
    storage.configure(FAST)
    assert storage.policy() == FAST
    assert json.loads(storage.remote_env()[storage.POLICY_VAR])["op_attempts"] == 3


@pytest.mark.parametrize(
    "kw, rule",
    [
        ({"request_attempts": 0}, "request_attempts (0) must be >= 1"),
        ({"op_attempts": 0}, "op_attempts (0) must be >= 1"),
        ({"base_delay_s": 0}, "base_delay_s (0) must be > 0"),
        ({"max_delay_s": 0.5}, "max_delay_s (0.5) must be >= base_delay_s (1.0)"),
        ({"request_timeout_s": -1}, "request_timeout_s (-1) must be > 0"),
    ],
)
def test_bad_policy_is_one_line(kw: dict, rule: str) -> None:
    with pytest.raises(ValueError, match=rule.replace("(", r"\(").replace(")", r"\)")):
        StorageConfig(**kw)


def test_unfinished_uploads_under_a_run_are_aborted_and_no_others(s3) -> None:
    """A writer killed mid-upload leaves its multipart upload; the run's next holder aborts
    those under the run's folder only (a sibling run's, e.g. r2 beside r, stays)."""
    base = s3.unique_uri("abort").split("/", 3)[3]
    client = s3.client()
    for key in (f"{base}/r/checkpoint_00000004/a.pt", f"{base}/r/x/b.pt", f"{base}/r2/c.pt"):
        client.create_multipart_upload(Bucket=s3.bucket, Key=key)

    def left() -> list[str]:
        ups = client.list_multipart_uploads(Bucket=s3.bucket, Prefix=base).get("Uploads", [])
        return sorted(u["Key"] for u in ups)

    assert storage.abort_uploads([f"s3://{s3.bucket}/{base}/r/"], under=True) == 2
    assert left() == [f"{base}/r2/c.pt"]
