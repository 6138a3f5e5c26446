"""Observability on real DeepSpeed engines: the step-time breakdown (data, forward, backward,
comm, optimizer) at ZeRO 0, 2 and 3. The single-process engines run in a child process so no
process group is left behind in the test session. (Moved from tests/unit/test_observability.py.)"""

from __future__ import annotations

import textwrap

import pytest
from single_engine import run_single_process

ENGINE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from models.gpt import GPT, GPTConfig
    from trainer.config import OptimConfig, ParallelConfig, PrecisionConfig
    from trainer.worker.engine import build_engine, build_model, train_step
    from trainer.worker.observability.metrics import StepTimes
    from trainer.layout import Layout

    layout = Layout(world=1, dp=1, tp=1, pp=1)
    m = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, d_model=16)
    sizes = dict(layout=layout, micro_batch=2, grad_accum=2)
    out = {}
    for stage in (0, 2, 3):
        par = ParallelConfig(name=f"zero{stage}", zero_stage=stage)
        prec, opt = PrecisionConfig(name="fp32", bf16=False), OptimConfig()
        model = build_model(m, par, prec, opt, seed=0, **sizes)
        engine = build_engine(model, par, prec, opt, **sizes)
        times = StepTimes()
        batch = [(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))) for _ in range(2)]
        for _ in range(2):
            times.add("data", 0.0)
            losses, norm, skipped = train_step(engine, batch, tp=1, timer=times)
        out[stage] = {"times": times.lap(), "losses": len(losses), "skipped": skipped}
    out["inductor"] = "torch._inductor.compile_fx" in sys.modules
    out["muon"] = sys.modules["deepspeed.runtime.zero.muon.muon_optimizer"].__doc__
    print("RESULT " + json.dumps(out))
    """
)


@pytest.mark.timeout(300)
def test_train_step_breakdown_on_real_deepspeed_engines():
    result = run_single_process(ENGINE_SCRIPT, timeout=280)
    # DeepSpeed's Muon module (torch.compile -> inductor's compiler on import) was never imported.
    assert result.pop("muon") == "raygpt's stand-in: Muon is never built"
    assert result.pop("inductor") is False
    out = {int(k): v for k, v in result.items()}
    phases = ["data_time_s", "forward_time_s", "backward_time_s", "comm_time_s", "optimizer_time_s"]
    for stage in (0, 2):  # gradient reduction timed, inside backward
        times = out[stage]["times"]
        assert list(times) == phases, (stage, times)
        assert all(times[k] > 0 for k in phases[1:]), (stage, times)
        assert times["comm_time_s"] < times["backward_time_s"], (stage, times)
    # ZeRO-3: no comm figure (its parameter all-gathers are asynchronous); the rest is there.
    assert list(out[3]["times"]) == [p for p in phases if p != "comm_time_s"], out[3]
    assert all(not out[s]["skipped"] and out[s]["losses"] == 2 for s in out)
