"""The layout arithmetic and the model-shape rules of each parallel dimension."""

from __future__ import annotations

import pytest

from models.gpt import GPTConfig
from trainer.config import ConfigError, load_config
from trainer.layout import Layout, check_model_fits, make_layout
from trainer.worker.parallel import tensor_parallel_config


@pytest.mark.parametrize(
    "world,tp,pp,dp", [(1, 1, 1, 1), (2, 2, 1, 1), (2, 1, 2, 1), (4, 2, 1, 2), (8, 2, 2, 2)]
)
def test_layout_factors(world, tp, pp, dp):
    layout = make_layout(world, tp, pp)
    assert (layout.dp, layout.tp, layout.pp) == (dp, tp, pp)
    assert layout.dp * layout.tp * layout.pp == world


def test_layout_that_does_not_fit_prints_every_factor():
    with pytest.raises(ValueError) as e:
        make_layout(6, 4, 1)
    msg = str(e.value)
    for part in ("num_workers (6)", "tensor_parallel (4)", "pipeline_parallel (1)", "1.5"):
        assert part in msg, msg


def test_sequence_parallel_ranks():
    # Sequence peers are consecutive ranks (after tensor peers) and share a data shard.
    sp = make_layout(4, 1, 1, sp=2)
    assert (sp.dp, sp.sp, sp.deepspeed_dp) == (2, 2, 4)
    assert [sp.dp_rank(r) for r in range(4)] == [0, 0, 1, 1]
    assert [sp.sp_rank(r) for r in range(4)] == [0, 1, 0, 1]
    assert "sequence 2" in str(sp)
    from trainer.worker.parallel import sequence_groups

    assert sequence_groups(sp) == [[0, 1], [2, 3]]


def test_sequence_parallel_layout_sets_the_data_parallel_batch():
    cfg = load_config(
        ["parallel.sequence_parallel=2", "cluster.num_workers=4", "cluster.cpus_per_worker=0.5",
         "trainer.micro_batch_size=2", "trainer.global_batch_size=8"],
        default_name="t",
    )  # fmt: skip
    assert cfg.dp_size == 2 and cfg.grad_accum == 2 and cfg.layout.sp == 2


def test_3d_rank_order_is_deepspeed_topology():
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from trainer.worker.parallel import tensor_parallel_groups

    layout = make_layout(8, 2, 2)
    assert (layout.dp, layout.tp, layout.pp) == (2, 2, 2)
    topo = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=2)
    for rank in range(8):
        c = topo.get_coord(rank)
        assert (layout.stage(rank), layout.dp_rank(rank), layout.tp_rank(rank)) == (
            c.pipe,
            c.data,
            c.model,
        )
    assert tensor_parallel_groups(layout) == topo.get_axis_comm_lists("model")


def test_data_parallel_rank_follows_deepspeed_rank_order():
    # TP peers are consecutive ranks and share a data shard.
    tp = Layout(world=4, dp=2, tp=2, pp=1)
    assert [tp.dp_rank(r) for r in range(4)] == [0, 0, 1, 1]
    # Pipeline ranks are stage-major: stage s, data-parallel d -> rank s*dp + d.
    pp = Layout(world=4, dp=2, tp=1, pp=2)
    assert [pp.dp_rank(r) for r in range(4)] == [0, 1, 0, 1]
    dp = Layout(world=3, dp=3, tp=1, pp=1)
    assert [dp.dp_rank(r) for r in range(3)] == [0, 1, 2]


@pytest.mark.parametrize(
    "kwargs,tp,pp,message",
    [
        (
            dict(n_head=6, d_model=384),
            4,
            1,
            r"n_head \(6\) is not divisible by tensor_parallel \(4\)",
        ),
        (dict(n_head=8, n_kv_head=2), 4, 1, r"n_kv_head \(2\) is not divisible by tensor_parallel"),
        (
            dict(n_head=16, d_model=512, d_ff=1000),
            16,
            1,
            r"d_ff\) \(1000\) is not divisible by tensor_parallel \(16\)",
        ),
        (dict(n_layer=2), 1, 4, r"n_layer \(2\) is smaller than pipeline_parallel \(4\)"),
    ],
)
def test_model_shape_rules(kwargs, tp, pp, message):
    cfg = GPTConfig(**kwargs)
    with pytest.raises(ValueError, match=message):
        check_model_fits(cfg, make_layout(tp * pp, tp, pp))


def test_tensor_parallel_specs_cover_every_projection():
    import re

    specs = tensor_parallel_config(2)["partition_config"]["layer_specs"]
    kinds = {}
    for name in (
        "attn.q_proj",
        "attn.k_proj",
        "attn.v_proj",
        "attn.o_proj",
        "mlp.up",
        "mlp.gate",
        "mlp.down",
        "ln_1",
        "wte",
    ):
        full = f"blocks.3.{name}.weight"
        hits = [s["partition_type"] for s in specs if any(re.match(p, full) for p in s["patterns"])]
        kinds[name] = hits
    assert kinds["attn.q_proj"] == kinds["mlp.up"] == kinds["mlp.gate"] == ["column"]
    assert kinds["attn.o_proj"] == kinds["mlp.down"] == ["row"]
    assert kinds["ln_1"] == kinds["wte"] == []


BAD = [
    (
        ["parallel=tp2", "model.n_head=4", "model.n_kv_head=1"],
        r"n_kv_head \(1\) is not divisible by tensor_parallel \(2\)",
    ),
    (
        ["parallel=tp2", "parallel.tensor_parallel=4", "cluster.num_workers=2"],
        r"num_workers \(2\) is not divisible by tensor_parallel \(4\)",
    ),
    (["parallel=pp2", "parallel.zero_stage=2"], r"DeepSpeed pipelines support ZeRO stage 0 or 1"),
    (["parallel=pp2", "parallel.zero_stage=3"], r"DeepSpeed pipelines support ZeRO stage 0 or 1"),
    (["parallel=tp2", "parallel.zero_stage=3"], r"AutoTP trains with ZeRO stage 0, 1 or 2"),
    (
        ["parallel=3d", "cluster.num_workers=6", "cluster.cpus_per_worker=0.5"],
        r"num_workers \(6\) is not divisible by tensor_parallel \(2\) x pipeline_parallel "
        r"\(2\) x sequence_parallel \(1\) = 4",
    ),
    (
        ["parallel=3d", "cluster.num_workers=4", "cluster.cpus_per_worker=0.5", "model.n_head=2",
         "model.n_kv_head=1", "model.d_model=64"],
        r"n_kv_head \(1\) is not divisible by tensor_parallel \(2\)",
    ),
    (
        ["parallel=3d", "cluster.num_workers=4", "cluster.cpus_per_worker=0.5", "model.n_layer=1"],
        r"n_layer \(1\) is smaller than pipeline_parallel \(2\)",
    ),
    (
        ["parallel=3d", "cluster.num_workers=4", "cluster.cpus_per_worker=0.5",
         "parallel.zero_stage=2"],
        r"DeepSpeed pipelines support ZeRO stage 0 or 1",
    ),
    (
        ["parallel=3d", "cluster.num_workers=4", "cluster.cpus_per_worker=0.5",
         "parallel.zero_stage=0", "precision=fp32"],
        r"\(3-D\) needs zero_stage 1 \(got 0\)",
    ),
    (["parallel=zero2", "parallel.offload_params=true"], r"offload_params needs zero_stage 3"),
    (["parallel=ddp", "parallel.offload_optimizer=true"], r"offload_optimizer needs zero_stage"),
    (
        ["parallel=pp2", "parallel.zero_stage=0", "precision=bf16"],
        r"pipeline_parallel with bf16 needs zero_stage 1",
    ),
    (["parallel=pp2", "model.n_layer=1"], r"n_layer \(1\) is smaller than pipeline_parallel \(2\)"),
    (
        ["parallel.sequence_parallel=2", "model.n_head=4", "model.n_kv_head=1"],
        r"n_kv_head \(1\) is not divisible by sequence_parallel \(2\)",
    ),
    (
        ["parallel.sequence_parallel=4", "cluster.num_workers=4", "model.n_head=2",
         "model.d_model=64", "cluster.cpus_per_worker=0.5"],
        r"n_head \(2\) is not divisible by sequence_parallel \(4\)",
    ),
    (
        ["parallel.sequence_parallel=2", "cluster.num_workers=3", "cluster.cpus_per_worker=0.5"],
        r"num_workers \(3\) is not divisible by .* sequence_parallel \(2\) = 2",
    ),
    (
        ["parallel.sequence_parallel=2", "data.seq_len=63"],
        r"data.seq_len \(63\) is not divisible by sequence_parallel \(2\)",
    ),
    (
        ["parallel=pp2", "parallel.sequence_parallel=2", "cluster.num_workers=4",
         "cluster.cpus_per_worker=0.5"],
        r"sequence_parallel \(2\) with pipeline_parallel \(2\) is not supported",
    ),
    (
        ["parallel=tp2", "parallel.sequence_parallel=2", "cluster.num_workers=4",
         "cluster.cpus_per_worker=0.5"],
        r"sequence_parallel \(2\) with tensor_parallel \(2\) is not supported",
    ),
    (["parallel.sequence_parallel=0"], r"sequence_parallel \(0\) must be >= 1"),
    (
        ["parallel.sequence_parallel=2", "trainer.compile=true"],
        r"trainer.compile with .* sequence_parallel 2",
    ),
]  # fmt: skip


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_layouts_fail_before_any_worker(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(overrides, default_name="t")
    assert "\n" not in str(e.value)


def test_layout_sets_the_data_parallel_batch():
    cfg = load_config(
        [
            "parallel=tp2",
            "cluster.num_workers=2",
            "trainer.micro_batch_size=4",
            "trainer.global_batch_size=8",
        ],
        default_name="t",
    )
    assert cfg.dp_size == 1 and cfg.grad_accum == 2
