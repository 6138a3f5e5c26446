"""What a training worker asks of whatever started it, in one interface with two answers.

A worker needs its rank and the world size, where it runs, the checkpoint to resume from,
a way to persist a checkpoint into the run directory, and whether a stop was asked for.

- RayContext: a Ray Train worker (any cluster). Ray registers checkpoints in its snapshot
  file, keeps the last K and hands the latest to the next run of the same name.
- ProcessContext: the one worker of a private local cluster, run in the driver's process
  without Ray (cluster.launch, cluster/inprocess.py). It writes the same checkpoint
  directories and the same snapshot file (cluster/ray_private.py), so a run can move between
  the two: started here, resumed on Ray, and back.

The worker code calls `current()` and never imports ray.train itself.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

from cluster import ray_private

# A checkpoint to resume: (its URI or Ray path, a local directory holding its files).
Found = Optional[tuple[str, Path]]


class RayContext:
    """A Ray Train worker's answers (ray.train's context, checkpoint and report)."""

    def __init__(self) -> None:
        import ray.train

        ray_private.quiet_train_logs()
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    @contextlib.contextmanager
    def resume_checkpoint(self) -> Iterator[Found]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield ckpt.path, Path(d)

    # ray.train.report of a local checkpoint directory (Ray persists and registers it).
    report_checkpoint = staticmethod(ray_private.report_checkpoint)

    def stop_requested(self, stop_signal: Any) -> Optional[str]:
        """The driver's stop request (an actor, cluster.launch.make_stop_signal), if any."""
        import ray

        return ray.get(stop_signal.get.remote(), timeout=10)


class StopFlag:
    """The in-process stop request: set by the driver's SIGTERM handler, read by the worker."""

    def __init__(self) -> None:
        self.reason: Optional[str] = None

    def request(self, reason: str) -> None:
        self.reason = self.reason or reason

    def get(self) -> Optional[str]:
        return self.reason


class ProcessContext:
    """The one worker of a private local cluster, in this process (rank 0 of 1).

    Checkpoints are persisted as Ray Train persists them: the local directory becomes
    `<run_uri>/<dir_name>` (a rename on the same filesystem, else a copy/upload), then it is
    registered in the run's snapshot file, and the oldest registered ones beyond keep_last are
    deleted. asynchronous: upload and registration run on one background thread, in order.
    """

    rank = 0
    world_size = 1

    def __init__(
        self,
        run_uri: str,
        keep_last: int,
        resume_point: Callable[[], Optional[str]],
    ):
        self.run_uri = run_uri
        self.keep_last = keep_last
        self.resume_point = resume_point
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-upload")
        self._pending: list[Future[None]] = []

    def node_id(self) -> str:
        return f"local:{socket.gethostname()}"

    @contextlib.contextmanager
    def resume_checkpoint(self) -> Iterator[Found]:
        from data_pipeline import storage

        uri = self.resume_point()
        if uri is None:
            yield None
            return
        with storage.local_copy(uri) as local:
            yield uri, Path(local)

    def report_checkpoint(
        self,
        metrics: dict[str, Any],
        local_dir: str,
        dir_name: str,
        *,
        asynchronous: bool,
        before_upload: Optional[Callable[[], None]] = None,
    ) -> threading.Event:
        done = threading.Event()
        step = int(metrics.get("step", 0))

        def persist() -> None:
            if before_upload is not None:
                before_upload()
            self._persist(Path(local_dir), dir_name)
            done.set()
            self._register(dir_name, step)

        if asynchronous:
            self._pending.append(self._pool.submit(persist))
        else:
            persist()
        return done

    def _persist(self, local: Path, dir_name: str) -> None:
        import shutil

        from data_pipeline import storage

        dest = storage.join(self.run_uri, dir_name)
        if storage.exists(dest):
            storage.delete(dest)  # leftovers of an unregistered attempt (plan.apply moves them)
        if storage.is_remote(dest):
            storage.upload(local, dest)
            shutil.rmtree(local, ignore_errors=True)
            return
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(local), dest)

    def _register(self, dir_name: str, step: int) -> None:
        """Adds dir_name to the snapshot (written whole, as Ray does), then deletes the oldest
        registered checkpoints beyond keep_last."""
        from data_pipeline import storage

        snapshot = storage.join(self.run_uri, ray_private.SNAPSHOT_FILE)
        try:
            names, _ = ray_private.snapshot_checkpoints(storage.read_text(snapshot))
        except FileNotFoundError:
            names = None
        entries = [(n, _step_of(n)) for n in names or [] if n != dir_name] + [(dir_name, step)]
        dropped = entries[: max(0, len(entries) - self.keep_last)] if self.keep_last > 0 else []
        kept = entries[len(dropped) :]
        storage.write_text(snapshot, ray_private.rebuild_snapshot(kept))
        for name, _ in dropped:
            storage.delete(storage.join(self.run_uri, name))

    def wait(self) -> None:
        """Every checkpoint reported so far is persisted and registered (errors raised)."""
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()

    def stop_requested(self, stop_signal: Any) -> Optional[str]:
        return stop_signal.get()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def _step_of(name: str) -> int:
    suffix = name.rsplit("_", 1)[-1]
    return int(suffix) if suffix.isdigit() else -1


_current: Optional[ProcessContext] = None


def set_process_context(ctx: Optional[ProcessContext]) -> None:
    global _current
    _current = ctx


def current() -> RayContext | ProcessContext:
    """This worker's context: the in-process one while cluster/inprocess.py runs a worker
    here, else Ray Train's."""
    return _current if _current is not None else RayContext()
