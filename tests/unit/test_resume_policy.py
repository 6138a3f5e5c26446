"""Checkpoint policy, fault-drill specs and the universal-checkpoint decision (no processes)."""

from __future__ import annotations

import re

import pytest

from trainer.checkpoint.manager import CheckpointPolicy
from trainer.checkpoint.universal import plan
from trainer.config import ConfigError, TrainerConfig, load_config
from trainer.worker.faults import Fault, maybe_pause, parse


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_interval_time_final_and_stop_checkpoints():
    clock = Clock()
    t = TrainerConfig(max_steps=100, checkpoint_interval=10, checkpoint_every_minutes=0.5)
    policy = CheckpointPolicy(t, clock)
    assert policy.reason(3, last=False, time_due=policy.time_due(), stop=False) is None
    clock.now += 29.9
    assert not policy.time_due()
    clock.now += 0.2
    assert policy.time_due()
    assert policy.reason(4, last=False, time_due=policy.time_due(), stop=False) == "time"
    policy.saved()
    assert not policy.time_due()  # the clock restarts at every save, whatever its reason
    assert policy.reason(10, last=False, time_due=False, stop=False) == "interval"
    assert policy.reason(11, last=False, time_due=False, stop=True) == "stop"
    assert policy.reason(11, last=True, time_due=False, stop=True) == "final"


def test_without_minutes_time_is_never_due():
    clock = Clock()
    policy = CheckpointPolicy(TrainerConfig(max_steps=10, checkpoint_interval=0), clock)
    clock.now += 1e9
    assert not policy.time_due()
    assert policy.reason(5, last=False, time_due=False, stop=False) is None


@pytest.mark.parametrize(
    ("interval", "keep_every", "kept"),
    [(2, 2, [4, 8, 12]), (5, 1, [5, 10]), (3, 0, [])],
)
def test_keep_every_mth_interval_checkpoint(interval, keep_every, kept):
    t = TrainerConfig(max_steps=12, checkpoint_interval=interval, keep_every=keep_every)
    policy = CheckpointPolicy(t)
    assert [s for s in range(1, 13) if policy.keep_for_good(s)] == kept


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.keep_every=-1", "keep_every (-1) must be >= 0"),
        ("trainer.checkpoint_every_minutes=0", "checkpoint_every_minutes (0.0) must be > 0"),
        ("trainer.profile_steps=[0]", "profile_steps [0] must be steps in [1, max_steps"),
    ],
)
def test_bad_policy_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config([override])


def test_keep_every_needs_an_interval():
    with pytest.raises(ConfigError, match="checkpoint_interval must be > 0"):
        load_config(["trainer.keep_every=2", "trainer.checkpoint_interval=0"])


def test_fault_specs_parse_and_reject_typos():
    assert parse(None) == [] and parse("") == []
    assert parse("pause@save:4:rank=1,pause@step:7:rank=1:hold=2.5") == [
        Fault("save", 4, 1, 600.0),
        Fault("step", 7, 1, 2.5),
    ]
    with pytest.raises(ValueError, match="'pause@svae:4' is not pause@<point>"):
        parse("pause@svae:4")


def test_a_drill_fires_once_per_run_dir(tmp_path):
    drill = [Fault("step", 3, 0, hold_s=0.0)]
    maybe_pause(drill, "step", 2, 0, tmp_path)  # another step: nothing
    assert not (tmp_path / "faults").exists()
    maybe_pause(drill, "step", 3, 1, tmp_path)  # another rank: nothing
    assert not (tmp_path / "faults").exists()
    maybe_pause(drill, "step", 3, 0, tmp_path)
    marker = tmp_path / "faults" / "step_3_rank0.json"
    first = marker.read_text()
    maybe_pause(drill, "step", 3, 0, tmp_path)  # a restarted worker goes past it
    assert marker.read_text() == first


# ------------------------------------------------------------- universal checkpoints


def _saved(cfg, **changes):
    saved = cfg.to_dict()
    for dotted, value in changes.items():
        group, key = dotted.split("__")
        saved[group][key] = value
    return saved


@pytest.fixture
def zero2(tmp_path):
    ckpt = tmp_path / "checkpoint_00000004"
    (ckpt / "ds" / "ds").mkdir(parents=True)
    (ckpt / "ds" / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    return ckpt


@pytest.fixture(scope="module")
def two_workers():
    """The default layout on two workers, composed once for the tests below (frozen)."""
    return load_config(["cluster.num_workers=2", "run.name=r"])


def test_same_layout_loads_natively(zero2, two_workers):
    cfg = two_workers
    assert plan(cfg, zero2, _saved(cfg)) is False


@pytest.mark.parametrize(
    "change",
    [
        {"cluster__num_workers": 1},  # data-parallel 1 -> 2
        {"parallel__zero_stage": 1},  # ZeRO-1 -> ZeRO-2
        {"precision__name": "fp32"},
    ],
)
def test_new_dp_size_zero_stage_or_precision_converts(zero2, change, two_workers):
    cfg = two_workers
    assert plan(cfg, zero2, _saved(cfg, **change)) is True


def test_new_tensor_parallel_size_is_refused_in_one_line(zero2):
    cfg = load_config(["cluster.num_workers=2", "parallel=tp2", "run.name=r"])
    saved = _saved(cfg, parallel__tensor_parallel=1)
    with pytest.raises(ConfigError, match="parallel.tensor_parallel was 1, now 2") as e:
        plan(cfg, zero2, saved)
    assert "\n" not in str(e.value)


def test_3d_checkpoint_at_another_tensor_parallel_size_is_refused_in_one_line(tmp_path):
    ckpt = tmp_path / "checkpoint_00000004"
    (ckpt / "ds" / "ds").mkdir(parents=True)
    (ckpt / "ds" / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    saved = load_config(["cluster.num_workers=8", "parallel=3d", "run.name=r"])
    now = load_config(["cluster.num_workers=8", "parallel=3d", "parallel.tensor_parallel=1",
                       "trainer.global_batch_size=32", "run.name=r"])  # fmt: skip
    with pytest.raises(ConfigError, match="parallel.tensor_parallel was 2, now 1") as e:
        plan(now, ckpt, _saved(saved))
    assert "\n" not in str(e.value) and "keep parallel.tensor_parallel=2" in str(e.value)


@pytest.mark.parametrize(
    "saved_workers,now", [(2, ["cluster.num_workers=1"]), (1, ["parallel.sequence_parallel=2"])]
)
def test_sequence_parallel_2_to_1_and_back_converts(zero2, saved_workers, now):
    """Sequence ranks hold DeepSpeed data-parallel shards: SP 2 <-> 1 changes that size."""
    cfg = load_config(["cluster.num_workers=2", "run.name=r", *now])
    sp = 2 if saved_workers == 2 else 1
    saved = _saved(cfg, cluster__num_workers=saved_workers, parallel__sequence_parallel=sp)
    assert plan(cfg, zero2, saved) is True


def test_sequence_parallel_to_data_parallel_at_the_same_size_loads_natively(zero2):
    cfg = load_config(["cluster.num_workers=2", "run.name=r"])
    assert plan(cfg, zero2, _saved(cfg, parallel__sequence_parallel=2)) is False


def test_zero0_checkpoint_moves_only_to_another_dp_size(tmp_path):
    ckpt = tmp_path / "checkpoint_00000004"
    (ckpt / "ds" / "ds").mkdir(parents=True)  # no ZeRO optimizer shards
    cfg = load_config(["cluster.num_workers=2", "parallel=ddp", "precision=fp32", "run.name=r"])
    assert plan(cfg, ckpt, _saved(cfg, cluster__num_workers=1)) is False
    zero2 = load_config(["cluster.num_workers=2", "precision=fp32", "run.name=r"])
    with pytest.raises(ConfigError, match="no ZeRO optimizer shards"):
        plan(zero2, ckpt, _saved(cfg))
