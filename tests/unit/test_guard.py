"""The loss guard's decisions, and that a skipped step changes no parameter or state."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.config import GuardConfig
from trainer.worker.guard import LossGuard, innermost_optimizer, skipped_optimizer_step


def test_non_finite_loss_is_bad_from_the_first_step():
    g = LossGuard(GuardConfig(warmup_steps=10))
    assert g.judge(float("nan")).startswith("non-finite")
    assert g.judge(float("inf")).startswith("non-finite")
    assert g.judge(5.0) is None


def test_spikes_judged_against_the_running_mean_after_warmup():
    g = LossGuard(GuardConfig(spike_factor=2.0, warmup_steps=3, ema_beta=0.5))
    for loss in (4.0, 4.0, 4.0):
        assert g.judge(loss) is None
        g.accept(loss)
    assert g.mean == pytest.approx(4.0)
    assert g.judge(7.9) is None
    assert "spike" in g.judge(8.1)
    g.accept(2.0)
    assert g.mean == pytest.approx(3.0)  # 0.5 * 4 + 0.5 * 2


def test_no_spike_judgement_during_warmup():
    g = LossGuard(GuardConfig(spike_factor=2.0, warmup_steps=5))
    g.accept(1.0)
    assert g.judge(100.0) is None


def test_consecutive_bad_steps_trigger_and_reset():
    g = LossGuard(GuardConfig(max_consecutive=2))
    assert g.reject() is False
    assert g.reject() is True
    g.accept(1.0)
    assert g.consecutive == 0 and g.skipped == 2
    assert g.reject() is False


def test_disabled_guard_judges_nothing():
    assert LossGuard(GuardConfig(enabled=False)).judge(math.nan) is None


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(spike_factor=0.5), "spike_factor"),
        (dict(on_repeated="panic"), "on_repeated"),
        (dict(max_consecutive=0), "max_consecutive"),
        (dict(ema_beta=1.0), "ema_beta"),
    ],
)
def test_config_rules(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GuardConfig(**kwargs)


class _Wrapper:
    def __init__(self, optimizer):
        self.optimizer = optimizer

    def step(self):
        self.optimizer.step()


def test_skipped_step_changes_neither_parameters_nor_optimizer_state():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    adam = torch.optim.AdamW(model.parameters(), lr=0.1)
    engine = type("E", (), {"optimizer": _Wrapper(adam)})()
    model(torch.randn(2, 4)).sum().backward()
    adam.step()  # some real state first
    before_p = [p.detach().clone() for p in model.parameters()]
    before_s = {k: v.clone() for k, v in adam.state[model.weight].items()}
    model(torch.randn(2, 4)).sum().mul(float("nan")).backward()
    assert innermost_optimizer(engine.optimizer) is adam
    with skipped_optimizer_step(engine):
        engine.optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before_p, model.parameters()))
    assert all(torch.equal(before_s[k], adam.state[model.weight][k]) for k in before_s)
    engine.optimizer.step()  # outside the context the real step runs again
    assert not torch.equal(before_s["step"], adam.state[model.weight]["step"])


def test_step_judge_reads_the_mean_loss_of_the_step_and_judges_it():
    from trainer.worker.guard import StepJudge

    judge = StepJudge(LossGuard(GuardConfig(warmup_steps=0, spike_factor=2.0)))
    losses = [torch.tensor(1.25), torch.tensor(2.5, dtype=torch.bfloat16)]
    judge.start(losses)
    assert judge.verdict() is False and judge.reason is None
    assert judge.loss == (1.25 + 2.5) / 2  # what mean_across_ranks of the .item()s gave
    assert judge.settle(False) is False and judge.guard.mean == judge.loss
    judge.reset()
    judge.start([torch.tensor(1.0), torch.tensor(float("nan"))])
    assert judge.verdict() is True and judge.reason.startswith("non-finite")
    judge.reset()
    judge.start([torch.tensor(10.0), torch.tensor(10.0)])
    assert judge.verdict() is True and "spike" in judge.reason


def test_one_process_decides_a_stop_at_once_without_a_collective():
    import types

    from trainer.worker import control

    policy = types.SimpleNamespace(last_save=0.0, time_due=lambda: True)
    asked = types.SimpleNamespace(stop_requested=lambda: "preempted")
    c = control.StepControl(policy, 0, asked)
    assert c.decide(1) == (True, True) and c.stop_reason == "preempted"
    assert c.decide(2) == (True, False)  # the due checkpoint is decided once per save
    policy.last_save = 1.0
    assert c.decide(3) == (True, True)
