"""Unit tests run in this one process on tiny tensors: one torch thread each. With two OpenMP
threads on a 2-core machine that other processes share, every parallel region waits on a
descheduled spinning thread, and a 50-step tiny-model loop takes tens of seconds instead of one.
Applies to tests under tests/unit only; the previous count is restored after each test."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
