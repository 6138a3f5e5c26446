"""Small device values read on the host without waiting for the device's queue to drain.

A `Readback` queues the copy of a small tensor (a loss sum, a stop flag) to the host when it
is made, and `read()` returns the values later. On CUDA the copy goes into pinned memory,
non-blocking, behind an event: `read()` waits for that event only, i.e. for the work queued
before the copy, while everything queued after it (the backward, the next step) keeps the
device busy; no `.item()` of a device tensor, which would wait for the whole queue. On the
CPU there is no copy (the values already live on the host): `read()` only waits for the
asynchronous collective that writes them, if one was handed in.

Every host read of a step that logs nothing goes through `read()`, so
tests/dist/test_host_syncs.py allows exactly this one call site.
"""

from __future__ import annotations

from typing import Any, Optional

import torch


class Readback:
    def __init__(self, values: torch.Tensor, work: Optional[Any] = None):
        """values: a small tensor; work: the torch.distributed Work of an asynchronous
        collective that writes `values` (async_op=True), or None."""
        self._done: Optional[torch.cuda.Event] = None
        if values.device.type == "cuda":
            if work is not None:
                work.wait()  # on NCCL: the current stream waits for the collective, not the host
                work = None
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record()
        else:
            self._host = values
        self._work = work

    def read(self) -> list:
        """The values as Python numbers (nested lists for more than one dimension)."""
        if self._work is not None:
            self._work.wait()
            self._work = None
        if self._done is not None:
            self._done.synchronize()
            self._done = None
        return self._host.tolist()
