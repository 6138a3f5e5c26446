"""The benchmark helpers compute what they claim. Running the bare loop and cpu_share:
tests/e2e/test_bench_runs.py."""

from __future__ import annotations

import numpy as np
import pytest

from bench import common
from bench.bare_loop import run_bare
from bench.run_all import summary_rows
from models.gpt import GPTConfig

TINY = GPTConfig(vocab_size=128, block_size=16, n_layer=1, n_head=2, d_model=32)


def test_bare_loop_rejects_unknown_precision():
    rows = np.zeros((8, 17), dtype=np.int64)
    with pytest.raises(ValueError, match="precision"):
        run_bare(TINY, rows, steps=1, precision="fp8")


def test_ratio_and_mfu():
    assert common.ratio(3.0, 4.0) == 0.75
    assert common.ratio(None, 4.0) is None and common.ratio(1.0, 0.0) is None
    assert common.mfu(1000.0, 2e6, 4e9) == pytest.approx(0.5)


def _row(step: int, step_time: float, tokens_per_step: int, data: float = 0.0) -> dict:
    return {
        "step": step,
        "step_time_s": step_time,
        "tokens_per_sec": tokens_per_step / step_time,
        "data_time_s": data,
    }


def test_steady_tokens_per_sec_skips_warmup_and_weights_by_time():
    # 10 steps of 100 tokens: the first two are slow warm-up, then 1 s and 0.5 s steps.
    rows = [_row(1, 10.0, 100), _row(2, 5.0, 100)]
    rows += [_row(s, 1.0 if s % 2 else 0.5, 100, data=0.01) for s in range(3, 11)]
    s = common.steady_tokens_per_sec(rows, skip_frac=0.2)
    assert s["steps"] == 8 and s["rows"] == 8
    assert s["tokens_per_sec"] == pytest.approx(800 / 6.0)  # 4 x 1 s + 4 x 0.5 s
    assert s["median_tokens_per_sec"] == pytest.approx(150.0)  # median of 100 and 200
    assert s["step_time_s"] == pytest.approx(0.75)
    assert s["data_time_s"] == pytest.approx(0.01)


def test_steady_tokens_per_sec_with_a_log_interval():
    # log_interval 5: each row averages the 5 steps since the previous row.
    rows = [_row(5, 2.0, 100), _row(10, 1.0, 100), _row(15, 1.0, 100), _row(20, 0.5, 100)]
    s = common.steady_tokens_per_sec(rows, skip_frac=0.25)  # cut at step 5
    assert s["steps"] == 15
    assert s["tokens_per_sec"] == pytest.approx(1500 / (5 + 5 + 2.5))


def test_steady_rows_of_a_resumed_run_start_at_its_first_step():
    rows = [_row(s, 1.0, 10) for s in range(11, 21)]  # resumed at step 10
    assert [r["step"] for r in common.steady_rows(rows, 0.2)] == list(range(13, 21))
    assert common.steady_rows([], 0.2) == []


def test_summary_rows_compare_against_the_targets():
    results = {
        "stack_overhead": {
            "raygpt": {
                "bf16-w1": {"vs_bare": {"bf16-autocast": {"mean": 0.95, "median": 0.98}}},
                "fp32-w1": {"vs_bare": {"fp32": {"mean": 0.5, "median": 0.5}}},
            }
        },
        "mfu": {
            "peaks": {"bf16_2t": 4e11, "fp32_2t": 2e11},
            "large": "big",
            "models": {
                name: {
                    "bare_mfu": v,
                    "raygpt_mfu": v / 2,
                    "bare_tokens_per_sec": 1.0,
                    "raygpt_tokens_per_sec": 1.0,
                }
                for name, v in (("tiny", 0.1), ("big", 0.6))
            },
        },
        "data": {
            "loader": {
                "from_metrics": [
                    {"run": "r", "share_mean": 0.02, "data_time_s": 0.02, "step_time_s": 1.0}
                ]
            },
            "prepare": {
                "raw": {"tokens_per_sec": 100.0},
                "warm": {"tokens_per_sec": 190.0},
                "cold": {"tokens_per_sec": 100.0},
                "cores": 2,
                "ratio_per_core_warm": 0.95,
                "ratio_per_core_cold": 0.5,
            },
        },
    }
    rows = {r[0]: r for r in summary_rows(results)}
    overhead = rows["raygpt/bare tokens/s, gpt-tiny bf16-w1 vs bf16-autocast"]
    assert overhead[1] == 0.98 and overhead[3] is True  # the median ratio is the headline
    assert not any("fp32-w1" in k for k in rows)  # the target is about bf16
    assert rows["MFU big bare"][3] is True and rows["MFU big raygpt"][3] is False
    assert rows["MFU tiny bare"][3] is None  # no target for the small model
    assert rows["bf16 matmul peak, 2 threads (GFLOP/s)"][1] == pytest.approx(400.0)
    assert rows["loader share of step, r"][3] is False
    assert rows["prepare/raw tokenizer per core (Ray running)"][3] is True
    assert rows["prepare/raw tokenizer per core (cold)"][3] is False


def test_command_reproduces_the_arguments():
    assert common.command("bench.mfu", ["--quick", "--steps", "3"]) == (
        ".venv/bin/python -m bench.mfu --quick --steps 3"
    )


def test_stack_overhead_variants_and_extra_overrides():
    from bench import stack_overhead

    assert stack_overhead.parse_variants("") == [[]]
    assert stack_overhead.parse_variants("parallel=zero2; parallel=ddp optim.fused=true") == [
        ["parallel=zero2"],
        ["parallel=ddp", "optim.fused=true"],
    ]
    args = stack_overhead.parse(["--raygpt-overrides", "parallel=ddp", "optim.fused=true"])
    assert args.raygpt_overrides == ["parallel=ddp", "optim.fused=true"]
    assert args.variants == [[]]
    assert stack_overhead.variant_tag(["parallel=ddp", "optim.fused=true"]) == (
        "parallel=ddp,optim.fused=true"
    )


def test_interleaved_variant_names():
    from bench.interleaved import parse, parse_variant

    assert parse_variant("z0fc") == {
        "stage": 0, "fused": True, "compile": True, "contiguous": False
    }  # fmt: skip
    assert parse_variant("z2g") == {
        "stage": 2,
        "fused": False,
        "compile": False,
        "contiguous": True,
    }
    with pytest.raises(ValueError, match="z<stage>"):
        parse_variant("zero2")
    assert parse(["--quick"]).variants == ["z2", "z0"]


def test_context_length_line_through_the_peaks():
    from bench.context_length import fit

    rows = [{"tokens_per_rank": t, "peak_bytes": 1000 + 3 * t} for t in (256, 512, 1024)]
    slope, intercept = fit(rows)
    assert slope == pytest.approx(3) and intercept == pytest.approx(1000)
    assert fit(rows[:1]) is None


def test_memory_theory_of_the_new_layouts():
    from bench.memory import theory

    assert theory("sp2 ZeRO-2", 12.0, 2) == (12.0, 18.0)  # the model whole, ZeRO over both
    assert theory("tp2xpp2 (ZeRO-1)", 12.0, 4) == (3.0, 9.0)


def test_gpu_full_ab_rows_are_settings_the_config_takes():
    """bench/gpu_full.py's A/B table: each row flips a setting trainer/config.py has, to a
    value other than its default, for a model that exists."""
    from bench.gpu_full import AB, variants
    from trainer.config import load_config

    for setting, value, models in AB:
        for model in models or ("gpt2-124m", "gpt-1.3b"):
            names = [name for name, _ in variants(model)]
            assert names[0] == "defaults" and f"{setting}={value}" in names
            group, key = setting.split(".")
            default = getattr(getattr(load_config([f"model={model}"]), group), key)
            flipped = getattr(
                getattr(load_config([f"model={model}", f"{setting}={value}"]), group), key
            )
            assert flipped != default, (model, setting, value)


def test_strip_wheel_drops_folders_and_their_record_rows(tmp_path):
    import zipfile

    from bench.strip_wheel import strip

    whl = tmp_path / "ray-1-py3-none-any.whl"
    record = "ray/a.py,sha256=x,1\nray/jars/big.jar,sha256=y,2\nray-1.dist-info/RECORD,,\n"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("ray/a.py", "a = 1\n")
        z.writestr("ray/jars/big.jar", "java")
        z.writestr("ray-1.dist-info/RECORD", record)
    assert strip(str(whl), ("ray/jars/",)) == 1
    with zipfile.ZipFile(whl) as z:
        assert z.namelist() == ["ray/a.py", "ray-1.dist-info/RECORD"]
        assert "jars" not in z.read("ray-1.dist-info/RECORD").decode()
    assert strip(str(whl), ("ray/jars/",)) == 0  # stripped before: left as it is
