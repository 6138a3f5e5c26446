"""A mixture end to end: real Ray (2 workers), two small datasets prepared for real with one
tokenizer, a stop at step 3 and a resume with new weights: per-source val loss in eval.jsonl,
each logged sample id with its source, every sample of a source at most once, the shares."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from trainer.config import load_config

pytestmark = [pytest.mark.timeout(900), pytest.mark.usefixtures("ray_cluster")]

SMOKE = ["+experiment=smoke", "logging.mode=offline"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def code_data(ray_cluster, tmp_path_factory, smoke_data) -> str:
    """A second dataset (the json and email packages' source as text) with the smoke
    dataset's tokenizer and seq_len."""
    import email
    import json as json_package

    from data_pipeline.prepare import prepare

    files = sorted(Path(json_package.__file__).parent.glob("*.py"))
    files += sorted(Path(email.__file__).parent.glob("*.py"))
    out = tmp_path_factory.mktemp("data") / "code"
    cfg = load_config(
        [
            *SMOKE,
            f"data.out_dir={out}",
            f"data.sources=[{','.join(map(str, files))}]",
            "data.format=text",
            f"data.tokenizer={smoke_data}/tokenizer.json",
            "data.val_fraction=0.3",
            "data.max_documents=null",
        ]
    )
    prepare(cfg.data)
    return str(out)


def mixture(web: str, code: str, w_web: int, w_code: int, stages: str = "[]") -> list[str]:
    return [
        f"data.mixture.sources={{web: {{dir: {web}, weight: {w_web}}}, "
        f"code: {{dir: {code}, weight: {w_code}}}}}",
        f"data.mixture.stages={stages}",
        "data.mixture.block=4",
    ]


def test_mixture_trains_logs_per_source_and_resumes_with_new_weights(
    tmp_path, smoke_data, code_data
):
    from trainer.driver.run import run_training

    base = [
        *SMOKE,
        f"run.root={tmp_path}",
        "run.name=mix",
        "cluster.num_workers=2",  # real Ray (one worker may train in the driver's process)
        "trainer.max_steps=6",
        "trainer.eval_interval=3",
        "trainer.checkpoint_interval=3",
        "trainer.log_sample_ids=true",
        f"data.out_dir={tmp_path / 'unused'}",  # not prepared, not read: the mixture is
    ]
    # 1. Weights 3:1, a stage 1:1 after step 1; stopped after step 3.
    first = mixture(smoke_data, code_data, 3, 1, "[{step: 1, weights: {web: 1, code: 1}}]")
    cfg = load_config([*base, *first, "trainer.stop_at_step=3"])
    run_training(cfg)
    assert not (tmp_path / "unused").exists()
    # 2. Resumed with weights 1:3 and no stages, to step 6.
    cfg = load_config([*base, *mixture(smoke_data, code_data, 1, 3)])
    summary = run_training(cfg)
    run_dir = cfg.run_dir
    assert summary["final_step"] == 6

    evals = read_jsonl(run_dir / "eval.jsonl")
    assert [e["step"] for e in evals] == [3, 6]
    for e in evals:
        assert e["val_loss"] == pytest.approx((e["val_loss/web"] + e["val_loss/code"]) / 2)
        assert 0 < e["val_loss/web"] < 10 and 0 < e["val_loss/code"] < 10

    last = {}  # (step, rank) -> [(source, id)]: the last record of a step counts
    for rank in (0, 1):
        for row in read_jsonl(run_dir / "samples" / f"rank_{rank}.jsonl"):
            assert len(row["sources"]) == len(row["ids"]) == 4
            last[row["step"], rank] = list(zip(row["sources"], row["ids"]))
    assert sorted(last) == [(step, rank) for step in range(1, 7) for rank in (0, 1)]
    last = {step: last[step, 0] + last[step, 1] for step in range(1, 7)}
    shares = [Counter(s for s, _ in last[step]) for step in range(1, 7)]
    # step 1 = positions 0-7: two blocks of 4 at 3:1 (web 6, code 2). The stage after step 1
    # starts at position 8 (1 x global batch 8): 1:1 in steps 2-3; the resume's 1:3 in 4-6.
    assert (
        shares
        == [{"web": 6, "code": 2}] + [{"web": 4, "code": 4}] * 2 + [{"web": 2, "code": 6}] * 3
    )
    for source in ("web", "code"):  # each source's samples once (fewer than one epoch here)
        ids = [i for step in last.values() for s, i in step if s == source]
        assert len(ids) == len(set(ids)), source

    metrics = read_jsonl(run_dir / "metrics.jsonl")
    final = metrics[-1]
    assert final["step"] == 6 and 0 < final["passes/web"] and 0 < final["passes/code"]
