"""Sweeps: `python -m trainer.train -m ...` runs its jobs in parallel on one Ray cluster.

Hydra's sweeper (the basic grid/choice sweeper, or a plugin such as Optuna) decides the jobs;
raygpt's launcher hands each batch of them to the sweep's runner. Every job of a batch is
validated first; then up to sweep.max_parallel of them train at once, each its own process

    python -m trainer.train <job overrides> run.name=<base>-<n> run.group=<sweep>
                            cluster.address=<the sweep's Ray>

(its own TorchTrainer, placement group, run directory and W&B run, in the sweep's W&B group),
and the next starts as soon as any ends. The sweep directory run.root/<sweep> holds sweep.json,
logs/<run>.log, and at the end summary.md, summary.json and compare.png; running the same
command again skips the finished jobs and resumes the others. README: Sweeps.

The parts, each importing only those above it:
  hydra_private.py  Hydra's private API (pinned by tests/unit/test_hydra_private.py)
  plan.py           the definition, fingerprint, names, job command lines and validation
  record.py         the sweep directory: sweep.json, logs, the jobs' run summaries
  process.py        one job's process: output, log, error line, dies with the sweep
  runner.py         SweepRunner: batches on Ray, max_parallel at a time, stop on SIGTERM
  report.py         summary.md, summary.json, compare.png; --check's answer
  launcher.py       the Hydra launcher plugin (hydra/launcher=raygpt)
  multirun.py       run_sweep: the entry point, exit codes, SweepSession
"""
