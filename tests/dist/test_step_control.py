"""trainer/worker/control.py's StepControl on 2 gloo ranks: rank 0's stop request and its
time-based checkpoint reach every rank at the same step, and a due checkpoint is decided
once; at once on CPU workers, one decision step later when lagged (NCCL's way: the flags
travel by an asynchronous broadcast read at the next decision step)."""

from __future__ import annotations

import textwrap

import pytest
from single_engine import run_ranks

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, types
    import torch.distributed as dist
    from trainer.worker import control

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    control.POLL_S = 0.0
    steps = {"now": 0}
    policy = types.SimpleNamespace(last_save=0.0, time_due=lambda: steps["now"] >= 5)
    stop = lambda: "preempted" if rank == 0 and steps["now"] >= 8 else None
    c = control.StepControl(policy, rank, types.SimpleNamespace(stop_requested=stop),
                             lagged=sys.argv[1] == "lagged")
    rows = []
    for step in range(1, 13):
        steps["now"] = step
        stop_now, due = c.decide(step)
        rows.append([step, stop_now, due])
        if due:
            policy.last_save = float(step)  # saved: the policy's clock restarts
            policy.time_due = lambda s=step: steps["now"] >= s + 100
    print("RESULT " + json.dumps({"rows": rows, "reason": c.stop_reason}))
    dist.destroy_process_group()
    """
)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how,lag", [("prompt", 0), ("lagged", 1)])
def test_stop_and_time_checkpoint_reach_every_rank_at_the_same_step(how, lag):
    ranks = run_ranks(SCRIPT, how, world=2, timeout=100)
    assert ranks[0]["rows"] == ranks[1]["rows"]
    rows = ranks[0]["rows"]
    assert [s for s, _, due in rows if due] == [5 + lag]  # due from step 5, decided once
    assert [s for s, stop, _ in rows if stop] == list(range(8 + lag, 13))  # requested at 8
    assert ranks[0]["reason"] == "preempted" and ranks[1]["reason"] == "stop requested"
