"""trainer/checkpoint/shards.py: the one description of a checkpoint's layout that compat.py,
universal.py and trainer/export.py read."""

from __future__ import annotations

import copy

import pytest

from trainer.checkpoint.shards import (
    LAYOUT_FIELDS,
    ShardLayout,
    is_optim_states,
    layer_file,
    model_states_file,
    optim_states_file,
    zero3_model_states_file,
)
from trainer.config import load_config


@pytest.fixture(scope="module")
def saved():
    return load_config(["cluster.num_workers=2", "precision=bf16", "run.name=r"]).to_dict()


def test_the_layout_of_a_config(saved):
    layout = ShardLayout.of(saved)
    assert (layout.dp, layout.tp, layout.pp, layout.model_parallel) == (2, 1, 1, 1)
    assert (layout.zero, layout.precision) == (saved["parallel"]["zero_stage"], "bf16")
    tp = copy.deepcopy(saved)
    tp["parallel"]["tensor_parallel"] = 2
    assert ShardLayout.of(tp) == ShardLayout(
        dp=1, tp=2, zero=layout.zero, precision=layout.precision
    )


@pytest.mark.parametrize("group, key", LAYOUT_FIELDS)
def test_every_layout_field_is_part_of_the_layout(saved, group, key):
    other = copy.deepcopy(saved)
    value = saved[group][key]
    other[group][key] = {bool: not value, int: 2 if value == 1 else 1, str: "fp32"}[type(value)]
    assert ShardLayout.of(other) != ShardLayout.of(saved)


def test_an_unknown_or_invalid_worker_count(saved):
    unknown = copy.deepcopy(saved)
    del unknown["cluster"]["num_workers"]
    assert ShardLayout.of(unknown).dp is None  # older configs: not compared
    bad = copy.deepcopy(saved)
    bad["cluster"]["num_workers"], bad["parallel"]["tensor_parallel"] = 3, 2
    with pytest.raises(ValueError, match=r"num_workers \(3\) is not divisible"):
        ShardLayout.of(bad)


def test_deepspeeds_file_names():
    assert model_states_file(1) == "mp_rank_01_model_states.pt"
    assert optim_states_file(3, 1) == "zero_pp_rank_3_mp_rank_01_optim_states.pt"
    assert zero3_model_states_file(2) == "zero_pp_rank_2_mp_rank_00_model_states.pt"
    assert layer_file(5) == "layer_05-model_states.pt"
    assert is_optim_states("bf16_" + optim_states_file(0, 0))
    assert not is_optim_states(model_states_file(0))
