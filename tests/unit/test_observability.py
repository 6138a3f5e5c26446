"""Observability: step-time breakdown, memory figures, profiler traces, the loss plot, the
summary table and the progress bar, in process. The breakdown on real DeepSpeed engines:
tests/dist/test_step_breakdown.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trainer.config import LoggingConfig
from trainer.worker.observability.logger import RunLogger, wandb_key
from trainer.worker.observability.metrics import StepTimes, memory_stats
from trainer.worker.observability.plot import last_per_step, plot_run, try_plot_run
from trainer.worker.observability.profiler import StepProfiler

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def synthetic_run(run_dir: Path) -> None:
    """Steps 1-10, interrupted; the resumed invocation re-logs 6-10 (other values) and goes
    on to 15. Step 3 holds a non-finite loss, stored as the string "nan"."""
    run_dir.mkdir(parents=True, exist_ok=True)
    first = [{"step": s, "loss": 5.0 - 0.1 * s, "tokens_per_sec": 1000.0} for s in range(1, 11)]
    first[2]["loss"] = "nan"
    write_jsonl(run_dir / "metrics.jsonl", first)
    write_jsonl(run_dir / "eval.jsonl", [{"step": 5, "val_loss": 4.6}, {"step": 10, "val_loss": 9}])
    write_jsonl(
        run_dir / "metrics.jsonl",
        [{"step": s, "loss": 4.0 - 0.1 * s, "tokens_per_sec": 2000.0} for s in range(6, 16)],
    )
    (run_dir / "metrics.jsonl").open("a").write('{"step": 16, "lo')  # cut short by a crash
    write_jsonl(
        run_dir / "eval.jsonl", [{"step": 10, "val_loss": 3.1}, {"step": 15, "val_loss": 2.6}]
    )


def test_plot_takes_the_last_record_of_each_step(tmp_path):
    synthetic_run(tmp_path)
    steps, loss = last_per_step(tmp_path / "metrics.jsonl", "loss")
    assert steps == list(range(1, 16))
    assert loss[2] != loss[2]  # "nan" read back as NaN
    assert loss[5:] == pytest.approx([4.0 - 0.1 * s for s in range(6, 16)])  # resumed values
    val_steps, val = last_per_step(tmp_path / "eval.jsonl", "val_loss")
    assert val_steps == [5, 10, 15] and val == [4.6, 3.1, 2.6]

    out = plot_run(tmp_path)
    assert out == tmp_path / "loss.png"
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_a_failing_plot_prints_one_warning_and_never_raises(tmp_path, monkeypatch, capsys):
    assert try_plot_run(tmp_path) is None  # nothing logged: nothing drawn
    assert not (tmp_path / "loss.png").exists()

    def broken(run_dir):
        raise RuntimeError("no display")

    monkeypatch.setattr("trainer.worker.observability.plot.plot_run", broken)
    assert try_plot_run(tmp_path) is None
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning:") and "no display" in lines[0]


def tiny_training(profiler: StepProfiler, steps: int) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, steps + 1):
        profiler.start(step)
        loss = model(torch.randn(4, 8)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        profiler.step(step)


def traced_steps(trace: Path) -> set[int]:
    events = json.loads(trace.read_text())["traceEvents"]
    return {int(e["name"].split()[1]) for e in events if e.get("name", "").startswith("train_step")}


def test_profiler_traces_exactly_the_chosen_steps(tmp_path, capsys):
    profiler = StepProfiler([3, 4], tmp_path / "profile", rank=0)
    tiny_training(profiler, 6)
    assert [p.name for p in (tmp_path / "profile").iterdir()] == ["rank_0.json"]
    trace = tmp_path / "profile" / "rank_0.json"
    assert traced_steps(trace) == {3, 4}
    assert "aten::addmm" in trace.read_text()  # the ops themselves are in it
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "steps 3-4" in out[0] and str(tmp_path / "profile") in out[0]
    assert not profiler.active


def test_profiler_separate_runs_other_ranks_and_an_early_end(tmp_path, capsys):
    profiler = StepProfiler([2, 5, 6], tmp_path / "p", rank=1, last_step=5)
    tiny_training(profiler, 5)  # the run ends at step 5, inside the traced run 5-6
    names = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert names == ["rank_1_steps_2-2.json", "rank_1_steps_5-5.json"]
    assert traced_steps(tmp_path / "p" / "rank_1_steps_5-5.json") == {5}
    assert capsys.readouterr().out == ""  # only rank 0 announces

    idle = StepProfiler([], tmp_path / "none", rank=0)
    tiny_training(idle, 2)
    assert not (tmp_path / "none").exists() and idle.close() is None


def test_step_times_are_means_per_step_in_a_fixed_order():
    times = StepTimes(cuda=False)
    for _ in range(2):
        times.step()
        times.add("optimizer", 0.5)
        times.add("forward", 1.0)
        times.add("data", 0.25)
        with times.phase("backward"):
            pass
    lap = times.lap()
    assert list(lap) == ["data_time_s", "forward_time_s", "backward_time_s", "optimizer_time_s"]
    assert lap["data_time_s"] == 0.25 and lap["forward_time_s"] == 1.0
    assert 0 <= lap["backward_time_s"] < 0.01
    assert times.lap() == {}  # starts afresh


def test_memory_stats_cpu_and_gpu(monkeypatch):
    cpu = memory_stats()
    assert cpu["rss_mib"] > 10 and cpu["peak_rss_mib"] >= cpu["rss_mib"]
    if torch.cuda.is_available():
        assert {"cuda_allocated_mib", "cuda_reserved_mib", "cuda_peak_mib"} <= set(cpu)
        return
    assert not any(k.startswith("cuda") for k in cpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 2**30)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: 2 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 3 * 2**30)
    gpu = memory_stats()
    assert (gpu["cuda_allocated_mib"], gpu["cuda_reserved_mib"], gpu["cuda_peak_mib"]) == (
        1024,
        2048,
        3072,
    )


def test_wandb_keys_group_time_and_memory():
    assert wandb_key("data_time_s") == "time/data_s"
    assert wandb_key("step_time_s") == "time/step_s"
    assert wandb_key("comm_time_s") == "time/comm_s"
    assert wandb_key("rss_mib") == "memory/rss_mib"
    assert wandb_key("loss") == "train/loss"


def test_logger_finish_adds_breakdown_means_and_draws_the_plot(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # the table's width: no cell cut short
    logger = RunLogger(
        tmp_path,
        LoggingConfig(mode="disabled"),
        run_name="obs",
        group=None,
        wandb_id="x",
        config={},
        max_steps=3,
        start_step=0,
        console_lines=False,
    )
    for step, fwd in [(1, 9.0), (2, 1.0), (3, 3.0)]:  # step 1 (warm-up) is left out
        logger.log(
            step,
            {
                "loss": 3.0 - step / 10,
                "lr": 1e-3,
                "tokens_per_sec": 100.0 * step,
                "mfu": 0.1,
                "step_time_s": fwd + 1,
                "data_time_s": 0.5,
                "forward_time_s": fwd,
                "rss_mib": 100.0 + step,
                "peak_rss_mib": 200.0 + step,
            },
        )
    logger.log_eval(3, 2.5)
    logger.finish({"run_name": "obs", "final_step": 3})
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["step_time_breakdown_s"] == {"step": 3.0, "data": 0.5, "forward": 2.0}
    assert summary["peak_rss_mib"] == 203.0
    assert (tmp_path / "loss.png").read_bytes()[:8] == PNG_MAGIC

    from trainer.driver.report import print_summary

    capsys.readouterr()
    print_summary({**summary, "train_tokens_per_sec": 1234.0, "end_to_end_tokens_per_sec": 987.0,
                   "mfu": 0.123, "run_dir": str(tmp_path)})  # fmt: skip
    out = capsys.readouterr().out
    assert "3.000 s = data 0.500 + forward 2.000" in out
    assert "training tokens/s" in out and "end-to-end tokens/s" in out
    assert (
        "1,234" in out
        and "987" in out
        and "12.3%" in out
        and "RSS 203 MiB" in out
        and "loss.png" in out
    )


def test_summary_table_survives_non_finite_values(capsys):
    from trainer.driver.report import print_summary, step_breakdown

    print_summary({"final_train_loss": "nan", "mfu": None, "final_step": 1})
    assert "nan" in capsys.readouterr().out
    text = step_breakdown(
        {"step": 1.0, "data": 0.1, "forward": 0.2, "backward": 0.4, "comm": 0.15, "optimizer": 0.1}
    )
    assert text == (
        "1.000 s = data 0.100 + forward 0.200 + backward 0.400 (comm 0.150) + optimizer 0.100"
    )


def test_progress_bar_follows_rows_and_survives_nan(tmp_path):
    from trainer.driver.progress import MetricsProgress

    metrics = tmp_path / "metrics.jsonl"
    write_jsonl(
        metrics, [{"step": s, "loss": 3.0, "tokens_per_sec": 10.0, "mfu": 0.1} for s in (1, 2)]
    )
    bar = MetricsProgress(metrics, max_steps=10)  # a resumed run: starts at the logged step
    task = bar.progress.tasks[0]
    assert task.completed == 2
    write_jsonl(metrics, [{"step": 3, "loss": "nan", "tokens_per_sec": 1234.5, "mfu": 0.25}])
    bar._poll()
    assert task.completed == 3
    assert task.fields == {"loss": "nan", "tps": "1,234", "mfu": "25.0%"}
    write_jsonl(metrics, [{"step": 4, "loss": 2.5}])  # missing figures show as "-"
    bar._poll()
    assert task.completed == 4 and task.fields["tps"] == "-" and task.fields["loss"] == "2.5000"
