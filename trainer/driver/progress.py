"""A rich progress bar on the driver, fed by rank 0's metrics.jsonl.

Worker stdout reaches the driver line by line through Ray, so a live bar cannot be drawn from a
worker; rank 0 writes one JSON line per logged step and the driver renders it. When stdout is
not a terminal (CI, `ray job submit` logs, files) workers print plain lines instead.
"""

from __future__ import annotations

import json
import threading

from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from data_pipeline import storage


def _num(row: dict, key: str, spec: str, scale: float = 1.0, unit: str = "") -> str:
    """row[key] formatted; '-' when missing, as stored when not a number ("nan")."""
    v = row.get(key)
    if isinstance(v, (int, float)):
        return f"{v * scale:{spec}}{unit}"
    return "-" if v is None else str(v)


def _read(uri: str) -> bytes:
    try:
        return storage.read_bytes(uri)
    except OSError:
        return b""


def _last_step(data: bytes) -> int:
    """The last step already in an existing metrics.jsonl (a resumed run starts from it)."""
    lines = data[-4096:].decode(errors="replace").splitlines()
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


class MetricsProgress:
    """Step, loss, tokens/s, MFU and ETA. Only drawn where the driver's stdout is a terminal
    (trainer.train passes sys.stdout.isatty()); otherwise rank 0 prints plain lines."""

    def __init__(self, metrics_uri: str, max_steps: int):
        self.uri = str(metrics_uri)
        # rank 0 syncs the file to object storage every few seconds: poll it less often there
        self.interval = 5.0 if storage.is_remote(self.uri) else 0.5
        existing = _read(self.uri)
        self.offset = len(existing)
        start = _last_step(existing)
        self.progress = Progress(
            TextColumn("step {task.completed:>6.0f}/{task.total:.0f}"),
            BarColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} train tok/s"),
            TextColumn("mfu {task.fields[mfu]}"),
            TextColumn("eta"),
            TimeRemainingColumn(),
        )
        # Starting at a resumed run's step keeps the jump to it out of the ETA's speed.
        self.task = self.progress.add_task(
            "train", total=max_steps, completed=start, loss="-", tps="-", mfu="-"
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self) -> MetricsProgress:
        self.progress.start()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._poll()
        self.progress.stop()

    def _follow(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def _poll(self) -> None:
        data = _read(self.uri)
        if len(data) < self.offset:  # rewritten from the start
            self.offset = 0
        chunk = data[self.offset :]
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        complete = complete.decode(errors="replace")
        for line in complete.splitlines():
            try:
                row = json.loads(line)
                step = int(row["step"])
            except (ValueError, KeyError, TypeError):
                continue
            self.progress.update(
                self.task,
                completed=step,
                loss=_num(row, "loss", ".4f"),
                tps=_num(row, "tokens_per_sec", ",.0f"),
                mfu=_num(row, "mfu", ".1f", 100, "%"),
            )
