"""Performance options train the same numbers as the defaults on real DeepSpeed engines:
optim.fused (torch.optim.AdamW(fused=True) as DeepSpeed's client optimizer), trainer.compile
(torch.compile of each block, from outside the model) and trainer.contiguous_weight_grad.
Single-process DeepSpeed engines run in a child process so no process group is left behind in
the test session. (Moved from tests/unit/test_perf_options.py, which keeps the config rules.)"""

from __future__ import annotations

import textwrap

import pytest
from single_engine import run_single_process

ENGINE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from models.gpt import GPTConfig
    from trainer.config import OptimConfig, ParallelConfig, PrecisionConfig
    from trainer.worker import kernels
    from trainer.worker.engine import build_engine, build_model, train_step
    from trainer.worker.kernels import ContiguousGradLinear
    from trainer.layout import Layout

    torch.manual_seed(0)
    layout = Layout(world=1, dp=1, tp=1, pp=1)
    m = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=32)
    sizes = dict(layout=layout, micro_batch=2, grad_accum=2)
    batches = [
        [(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))) for _ in range(2)]
        for _ in range(3)
    ]
    prec = PrecisionConfig(name="fp32", bf16=False)

    def train(stage, fused, compile, contiguous=False):
        par = ParallelConfig(name=f"zero{stage}", zero_stage=stage)
        opt = OptimConfig(fused=fused, lr=1e-2, warmup_steps=0)
        model = build_model(m, par, prec, opt, seed=0, **sizes)
        keys = sorted(model.state_dict())
        engine = build_engine(
            model, par, prec, opt, compile=compile, contiguous_weight_grad=contiguous, **sizes
        )
        losses = []
        for batch in batches:
            step_losses, _, _ = train_step(engine, batch, tp=1)
            losses.append(sum(x.item() for x in step_losses) / len(step_losses))
        fused_flags = [g.get("fused") for g in engine.basic_optimizer.param_groups]
        same_keys = keys == sorted(engine.module.state_dict())
        swapped = sum(type(x) is ContiguousGradLinear for x in engine.module.modules())
        return {"losses": losses, "fused": fused_flags, "same_keys": same_keys, "swapped": swapped}

    out = {}
    if sys.argv[1] == "contiguous":
        kernels.MIN_FEATURES = 16  # this tiny model's layers are 32 to 128 wide
        for stage in (0, 2):
            out[f"z{stage}"] = train(stage, False, False)
            out[f"z{stage}-contiguous"] = train(stage, False, False, contiguous=True)
        print("RESULT " + json.dumps(out))
        sys.exit(0)
    # ZeRO-1 and 2 share DeepSpeed's optimizer wrapper (stage_1_and_2.py): 2 stands for both
    for stage in (0, 2, 3) if sys.argv[1] == "fused" else (0,):
        out[f"z{stage}"] = train(stage, False, False)
        if sys.argv[1] == "fused":
            out[f"z{stage}-fused"] = train(stage, True, False)
        else:
            out[f"z{stage}-compile"] = train(stage, False, True)
    print("RESULT " + json.dumps(out))
    """
)


def run_engines(what: str) -> dict:
    """ENGINE_SCRIPT in a child process (world size 1, gloo); its RESULT."""
    return run_single_process(ENGINE_SCRIPT, what, timeout=580)


@pytest.mark.timeout(600)
def test_fused_adamw_trains_like_the_loop_at_every_zero_stage():
    out = run_engines("fused")
    for stage in (0, 2, 3):
        plain, fused = out[f"z{stage}"], out[f"z{stage}-fused"]
        assert all(f is True for f in fused["fused"]), (stage, fused["fused"])
        assert not any(plain["fused"]), (stage, plain["fused"])
        # fp32: the fused kernel does the same arithmetic in another order
        assert fused["losses"] == pytest.approx(plain["losses"], rel=1e-5), (stage, out)
        assert plain["losses"][-1] < plain["losses"][0]  # it trains


@pytest.mark.drill  # make test-drills: inductor's C++ build, minutes on 2 cores
@pytest.mark.timeout(600)
def test_compiled_blocks_train_like_eager_and_keep_parameter_names():
    out = run_engines("compile")  # ZeRO-0; ZeRO-2 was checked by hand (bench.stack_overhead)
    compiled = out["z0-compile"]
    assert compiled["same_keys"], "compile changed parameter names (checkpoints)"
    assert compiled["losses"] == pytest.approx(out["z0"]["losses"], rel=1e-4)


@pytest.mark.timeout(600)
def test_contiguous_weight_grad_trains_like_aten_at_zero_0_and_2():
    out = run_engines("contiguous")
    for stage in (0, 2):
        plain, contiguous = out[f"z{stage}"], out[f"z{stage}-contiguous"]
        assert plain["swapped"] == 0 and contiguous["swapped"] > 0, out
        assert contiguous["same_keys"], "the swap changed parameter names (checkpoints)"
        # fp32: the same products, summed in another order
        assert contiguous["losses"] == pytest.approx(plain["losses"], rel=1e-5), (stage, out)
        assert plain["losses"][-1] < plain["losses"][0]
