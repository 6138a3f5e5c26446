"""raygpt benchmarks: each module prints its figures and the command that reproduces them.

    python -m bench.run_all [--quick]       every benchmark and a final summary table
    python -m bench.<name> [--quick]        one of: stack_overhead, mfu, data, checkpoint

Timings are never asserted in tests (tests/unit/test_bench.py and tests/e2e/test_bench_runs.py only check that the code runs).
"""
