"""Sweep throughput: runs per hour with each executor on this machine, in one run.

    python tests/bench/bench_sweep.py          # (make bench) about 4 minutes on 2 cores

The same 8 configurations (a slice of the gallery grid: 4 methods x 2 seeds at N = 16, with a
short budget of 100 steps so that the executors' own costs show) are swept into a fresh store by
``executor="local"`` (one after the other, all cores to each run), ``"processes"`` (one worker
per core, one thread each) and ``"ray"`` (a local Ray with one CPU per task; skipped without
ray). Printed: wall time, runs per hour, and the speed-up over ``local``.
"""

import os
import tempfile
import time

from workbench.train import RunConfig, grid, sweep

CONFIGS = grid(RunConfig(task="shapes-vqa", n_shots=16, max_steps=100, eval_every=50, test_size=200, quiet=True),
               method=["lora", "houlsby", "compacter", "prompt"], seed=[13, 21])


def timed(executor: str, **kw) -> float:
    with tempfile.TemporaryDirectory() as store:
        t0 = time.perf_counter()
        df = sweep(CONFIGS, executor=executor, store=store, progress=False, **kw)
        wall = time.perf_counter() - t0
    assert (df.status == "done").all(), df[["method", "status", "error"]]
    return wall


def main():
    cores = os.cpu_count() or 1
    rows = [("local", timed("local")), ("processes", timed("processes", workers=cores, threads=1))]
    try:
        import ray

        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
        try:
            timed("ray", num_cpus=1)  # warm-up: workers import torch and build the backbone cache
            rows.append(("ray", timed("ray", num_cpus=1)))
        finally:
            ray.shutdown()
    except ImportError:
        print("ray is not installed: pip install ray")
    base = rows[0][1]
    print(f"{len(CONFIGS)} runs (N=16, 100 steps each) on {cores} cores")
    print(f"{'executor':>10} | {'wall s':>7} | {'runs/hour':>9} | {'vs local':>8}")
    for name, wall in rows:
        print(f"{name:>10} | {wall:7.1f} | {3600 * len(CONFIGS) / wall:9.0f} | {base / wall:7.2f}x")


if __name__ == "__main__":
    main()
