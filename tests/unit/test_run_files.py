"""RunFiles: a worker's run files reach the run directory wherever it lives. Object storage
is stood in for by a local target with staging on (stage=True, what s3:// gets); the S3 end
to end is in tests/e2e/test_users_ground.py."""

from __future__ import annotations

import json

from trainer.worker.observability.run_files import RunFiles


def test_local_run_dir_is_written_in_place(tmp_path):
    f = RunFiles(str(tmp_path / "run"), rank=0)
    f.path("metrics.jsonl").write_text("{}\n")
    assert f.local == tmp_path / "run"
    assert f.sync() == 0  # nothing to upload: it is the run directory
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == "{}\n"


def test_staged_files_reach_the_run_dir_only_when_synced(tmp_path):
    run = tmp_path / "bucket" / "run"
    f = RunFiles(str(run), rank=0, min_sync_s=3600, stage=True)
    assert f.local != run and not run.exists()
    f.path("metrics.jsonl").write_text('{"step": 1}\n')
    f.path("wandb/offline-run-x/run-x.wandb").write_bytes(b"w")
    assert not run.exists()  # not yet synced
    assert f.sync() == 2
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert (run / "wandb/offline-run-x/run-x.wandb").read_bytes() == b"w"
    assert f.sync() == 0  # unchanged files are not uploaded again
    with open(f.path("metrics.jsonl"), "a") as out:
        out.write('{"step": 2}\n')
    assert f.sync(force=False) == 0  # within min_sync_s of the last sync
    assert f.sync() == 1
    local = f.local
    f.close()
    assert not local.exists()  # the staging dir is removed
    assert (run / "metrics.jsonl").read_text().count("step") == 2


def test_a_resumed_rank_appends_to_its_files_in_storage(tmp_path):
    run = tmp_path / "bucket" / "run"
    first = RunFiles(str(run), rank=1, stage=True)
    first.path("samples/rank_1.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    first.close()
    again = RunFiles(str(run), rank=1, stage=True)
    with open(again.path("samples/rank_1.jsonl"), "a") as out:
        out.write(json.dumps({"step": 2}) + "\n")
    again.close()
    rows = [json.loads(x) for x in (run / "samples/rank_1.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1}, {"step": 2}]


def test_rank_zero_continues_metrics_and_eval_but_not_other_ranks_files(tmp_path):
    run = tmp_path / "bucket" / "run"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("old\n")
    (run / "samples").mkdir()
    (run / "samples" / "rank_1.jsonl").write_text("theirs\n")
    f = RunFiles(str(run), rank=0, stage=True)
    assert (f.local / "metrics.jsonl").read_text() == "old\n"
    assert not (f.local / "samples" / "rank_1.jsonl").exists()
    f.close()
    assert (run / "samples" / "rank_1.jsonl").read_text() == "theirs\n"
