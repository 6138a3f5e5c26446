"""A resumed run's history holds each step once (issue 23): RunFiles.rewind sets aside the rows
an earlier invocation logged after the checkpoint it resumes (metrics.jsonl, eval.jsonl, each
rank's samples file) in rewound-<n>/, never deleting one; on a local run directory
and on the moto S3 server. W&B (offline) gets a run forked at the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_pipeline import storage
from trainer.config import LoggingConfig
from trainer.worker.observability.logger import RunLogger
from trainer.worker.observability.run_files import RunFiles, rewound_name, split_rows


def rows(steps, key="loss") -> str:
    return "".join(json.dumps({"step": s, key: s / 10}) + "\n" for s in steps)


def steps_of(text: str) -> list[int]:
    return [json.loads(line)["step"] for line in text.splitlines() if line.strip()]


def test_split_rows_keeps_steps_up_to_the_checkpoint_and_sets_aside_the_rest():
    half = '{"step": 8, "lo'  # a row cut short by kill -9
    keep, later = split_rows(rows([1, 2, 3, 4, 5]) + half, 3)
    assert steps_of(keep) == [1, 2, 3]
    assert later == rows([4, 5]) + half + "\n"  # kept apart, not dropped
    assert split_rows(rows([1, 2]), 2) == (rows([1, 2]), "")
    assert rewound_name("metrics.jsonl", 2) == "rewound-2/metrics.jsonl"
    assert rewound_name("samples/rank_1.jsonl", 1) == "rewound-1/samples/rank_1.jsonl"


def seed(read_write, rank: int) -> None:
    """What a run killed after its checkpoint at step 4 left: steps 1-7 logged, eval at 2, 4, 6."""
    read_write("metrics.jsonl", rows(range(1, 8)))
    read_write("eval.jsonl", rows([2, 4, 6], "val_loss"))
    read_write(f"samples/rank_{rank}.jsonl", rows(range(1, 8), "ids"))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_rewind_sets_rows_after_the_checkpoint_aside_on_every_resume(where, tmp_path, request):
    if where == "local":
        run = str(tmp_path / "run")
    else:
        run = request.getfixturevalue("s3").unique_uri("rewind")

    def put(rel: str, text: str) -> None:
        storage.write_text(storage.join(run, rel), text)

    def get(rel: str) -> str:
        return storage.read_text(storage.join(run, rel))

    seed(put, 0)
    files = RunFiles(run, rank=0)  # on S3: downloads what it appends to, stages the rest
    moved = files.rewind(4)
    assert moved == {"samples/rank_0.jsonl": 3, "metrics.jsonl": 3, "eval.jsonl": 1}
    # In the run directory at once (on S3: uploaded by rewind itself, no later sync needed).
    assert steps_of(get("metrics.jsonl")) == [1, 2, 3, 4]
    assert steps_of(get("rewound-1/metrics.jsonl")) == [5, 6, 7]
    assert steps_of(get("eval.jsonl")) == [2, 4] and steps_of(get("rewound-1/eval.jsonl")) == [6]
    assert steps_of(get("rewound-1/samples/rank_0.jsonl")) == [5, 6, 7]
    assert files.rewind(4) == {}  # nothing after step 4 any more: nothing written
    files.close()

    # The resumed run logged 5 and 6 and was killed again; resumed from its checkpoint at 5.
    put("metrics.jsonl", get("metrics.jsonl") + rows([5, 6]))
    again = RunFiles(run, rank=0)
    assert again.rewind(5) == {"metrics.jsonl": 1}
    again.close()
    assert steps_of(get("metrics.jsonl")) == [1, 2, 3, 4, 5]
    assert steps_of(get("rewound-1/metrics.jsonl")) == [5, 6, 7]  # the first set-aside stays
    assert steps_of(get("rewound-2/metrics.jsonl")) == [6]


def test_other_ranks_rewind_their_own_samples_only(tmp_path):
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    (run / "metrics.jsonl").write_text(rows(range(1, 6)))
    (run / "samples" / "rank_1.jsonl").write_text(rows(range(1, 6), "ids"))
    assert RunFiles(str(run), rank=1).rewind(2) == {"samples/rank_1.jsonl": 3}
    assert steps_of((run / "metrics.jsonl").read_text()) == [1, 2, 3, 4, 5]  # rank 0's


def test_a_forked_wandb_run_continues_at_the_checkpoint_offline(tmp_path):
    """logging.mode=offline: the resumed invocation's W&B run is a new one forked from the old
    run at the checkpoint's step (W&B applies the branch point when the run is synced)."""
    logger = RunLogger(
        Path(tmp_path),
        LoggingConfig(mode="offline"),
        run_name="r",
        group=None,
        wandb_id="newrun000002",
        config={},
        max_steps=8,
        start_step=4,
        console_lines=False,
        fork_from="oldrun000001?_step=4",
    )
    try:
        assert logger.wandb.id == "newrun000002"
        moment = logger.wandb.settings.fork_from
        assert (moment.run, moment.value, moment.metric) == ("oldrun000001", 4, "_step")
        logger.log(5, {"loss": 1.0})
    finally:
        logger.close()
    assert list((tmp_path / "wandb").glob("offline-run-*-newrun000002"))
