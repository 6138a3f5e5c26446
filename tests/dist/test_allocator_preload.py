"""cluster.allocator: the tcmalloc that worker_env preloads really serves torch in a fresh
process. (Moved from tests/unit/test_worker_env.py, which keeps the in-process rules.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cluster.launch import find_tcmalloc


@pytest.mark.skipif(find_tcmalloc() is None, reason="no tcmalloc here (libtcmalloc-minimal4)")
def test_the_preloaded_tcmalloc_serves_torch():
    env = {**os.environ, "LD_PRELOAD": find_tcmalloc()}
    code = (
        "import torch; x = torch.ones(1 << 24).sum().item(); "
        "print([l.split()[-1] for l in open('/proc/self/maps') if 'tcmalloc' in l][:1], x)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "tcmalloc" in out.stdout and str(float(1 << 24)) in out.stdout, out.stdout
