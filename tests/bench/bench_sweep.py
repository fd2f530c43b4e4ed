"""Sweep throughput: runs per hour with each executor on this machine, in one run.

    python tests/bench/bench_sweep.py          # (make bench) about 4 minutes on 2 cores

The same 8 configurations (a slice of the gallery grid: 4 methods x 2 seeds at N = 16, with a
short budget of 100 steps so that the executors' own costs show) are swept into a fresh store by
``executor="local"`` (one after the other, all cores to each run), ``"processes"`` (one worker
per core, one thread each) and ``"ray"`` (a local Ray with one CPU per task; skipped without
ray). Printed: wall time, runs per hour, and the speed-up over ``local``.

    python tests/bench/bench_sweep.py --gpu    # on a CUDA machine: runs sharing one GPU

measures what sharing one GPU between runs buys (target: at least 6x the runs per hour of running
them one after the other on the same GPU). ``--runs`` configurations (16: 4 methods x 4 seeds
at N = 16, 100 steps) are swept sequentially on the GPU (``"local"``), then with K runs at a time on
it for each K of ``--share`` (4, 8): as K spawned worker processes (``"processes"``, no Ray needed)
and, where ray is installed, as Ray tasks with ``num_gpus=1/K`` (fractional GPUs; the CPU cores are
split between the K tasks alike). vlt5-tiny's steps are launch-bound on a GPU, so runs that share it
fill the gaps between each other's kernels. ``--device cpu`` smoke-runs the same code on a CPU (Ray
then gets a declared, not a real, GPU).
"""

import argparse
import os
import sys
import tempfile
import time

from workbench.train import RunConfig, grid, sweep

CONFIGS = grid(RunConfig(task="shapes-vqa", n_shots=16, max_steps=100, eval_every=50, test_size=200, quiet=True),
               method=["lora", "houlsby", "compacter", "prompt"], seed=[13, 21])


def timed(executor: str, configs=CONFIGS, **kw) -> float:
    with tempfile.TemporaryDirectory() as store:
        t0 = time.perf_counter()
        df = sweep(configs, executor=executor, store=store, progress=False, **kw)
        wall = time.perf_counter() - t0
    assert (df.status == "done").all(), df[["method", "status", "error"]]
    return wall


def gpu_configs(runs: int, steps: int, device: str) -> list:
    """``runs`` short gallery runs (4 methods x seeds, N = 16) on ``device``."""
    seeds = [13, 21, 42, 87, 100, 1, 2, 3, 4, 5]
    methods = ["lora", "houlsby", "compacter", "prompt"]
    per_method = -(-runs // len(methods))
    if per_method > len(seeds):
        raise SystemExit(f"--runs {runs}: at most {len(methods) * len(seeds)}")
    configs = grid(RunConfig(task="shapes-vqa", n_shots=16, max_steps=steps, eval_every=steps, test_size=200,
                             quiet=True, device=device), seed=seeds[:per_method], method=methods)
    return configs[:runs]  # seed-major: any count covers the methods evenly


def gpu_sharing(argv: list) -> list[tuple[str, int, float]]:
    """``--gpu``: the same runs one after the other on one GPU, then K at a time on it (module docstring).
    Returns ``(setup, runs at a time, wall seconds)`` rows, and prints them."""
    ap = argparse.ArgumentParser(prog="bench_sweep.py --gpu")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu to smoke-run the code path")
    ap.add_argument("--runs", type=int, default=16)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--share", default="4,8", help="runs at a time on the GPU, comma-separated")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray rows")
    args = ap.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_sweep --gpu: no CUDA device here (--device cpu smoke-runs the code path)")
        return []
    shares = [int(k) for k in args.share.split(",")]
    if any(k < 1 for k in shares):
        raise SystemExit(f"--share: positive integers, got {args.share!r}")
    cores = os.cpu_count() or 1
    configs = gpu_configs(args.runs, args.steps, args.device)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (smoke run)"
    rows = [("one after the other (local)", 1, timed("local", configs))]
    for k in shares:
        rows.append((f"{k} processes", k, timed("processes", configs, workers=k, threads=max(1, cores // k))))
    ray = None
    if not args.no_ray:
        try:
            import ray
        except ImportError:
            print("ray is not installed: the fractional-GPU rows are skipped (pip install ray)")
    if ray is not None:
        # On a CPU smoke run the GPU is only declared, so that Ray's fractional accounting still runs.
        ray.init(num_cpus=cores, num_gpus=1 if args.device == "cpu" else None, include_dashboard=False,
                 log_to_driver=False)
        try:
            timed("ray", configs[:1], num_gpus=1 / shares[0], num_cpus=1)  # warm-up: workers import torch
            for k in shares:
                rows.append((f"Ray, num_gpus=1/{k}", k, timed("ray", configs, num_gpus=1 / k,
                                                               num_cpus=max(1, cores // k))))
        finally:
            ray.shutdown()
    base = rows[0][2]
    print(f"{len(configs)} runs (N = 16, {args.steps} steps each) on {name}, {cores} CPU cores")
    print(f"{'setup':>28} | {'at a time':>9} | {'wall s':>7} | {'runs/hour':>9} | {'vs one after the other':>22}")
    for setup, k, wall in rows:
        print(f"{setup:>28} | {k:>9} | {wall:7.1f} | {3600 * len(configs) / wall:9.0f} | {base / wall:21.2f}x")
    print("target: runs sharing one GPU at >= 6x the runs per hour of one after the other")
    return rows


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
    gpu_sharing(sys.argv[1:]) if "--gpu" in sys.argv[1:] else main()
