"""Does every method converge under the protocol? Doubling the step budget must not move the mean.

    python tests/bench/bench_convergence.py             # (make bench) 12 methods x N in {16, 64} x 3 seeds
    python tests/bench/bench_convergence.py --quick     # N = 64, seed 13, the protocol budget only
    python tests/bench/bench_convergence.py --methods lora,full --workers 2

For the methods of the four papers (full, lora, houlsby, pfeiffer, compacter, adamix, mixphm,
vlpet, petal, prompt, prefix, parallel) on shapes-vqa, each at N = 16 and N = 64 over seeds
13, 21, 42: the protocol's default run (``RunConfig(method=m, n_shots=n, seed=s)``) against the
same run with the step budget doubled (``max_steps`` and ``patience`` x 2, so the run may also
wait twice as long for an improvement). Target: |mean(2B) - mean(B)| < 2 points for every
method and N, and one N = 64 run under 60 s on a 2-core CPU (the mean wall time is printed).

Runs go to the default run store (``runs/`` or ``$WORKBENCH_RUNS``), so an interrupted bench
resumes where it stopped and a second call only prints.
"""

import argparse
import time

import numpy as np

from workbench.train import RunConfig, sweep
from workbench.train.config import protocol_budget

METHODS = ("full", "lora", "houlsby", "pfeiffer", "compacter", "adamix", "mixphm", "vlpet", "petal",
           "prompt", "prefix", "parallel")
SEEDS = (13, 21, 42)
SHOTS = (16, 64)
TARGET = 0.02


def configs(methods, shots, seeds, doubled=True):
    out = []
    for method in methods:
        for n in shots:
            for seed in seeds:
                base = RunConfig(task="shapes-vqa", method=method, n_shots=n, seed=seed, quiet=True)
                out.append(base)
                if doubled:
                    max_steps, _ = protocol_budget(n, base.batch_size)
                    out.append(base.replace(max_steps=2 * max_steps, patience=2 * base.patience))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N = 64, seed 13, the protocol budget only")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--workers", type=int, default=1, help="processes (1: in this process, 2 threads)")
    args = ap.parse_args()
    methods = args.methods.split(",")
    cfgs = configs(methods, (64,), (13,), doubled=False) if args.quick else configs(methods, SHOTS, SEEDS)
    t0 = time.perf_counter()
    if args.workers > 1:
        df = sweep(cfgs, executor="processes", workers=args.workers, threads=1)
    else:
        df = sweep(cfgs, executor="local")
    print(f"{len(df)} runs ({(df.status == 'done').sum()} trained now) in {time.perf_counter() - t0:.0f} s")
    failed = df[df.status == "failed"]
    for _, r in failed.iterrows():
        print(f"FAILED {r.method} N={r.n_shots} seed={r.seed}: {r.error}")
    df["budget"] = np.where(df.max_steps.isna(), "B", "2B")
    print(f"\n{'method':>10} {'N':>4} | {'B: mean +- std':>15} | {'2B: mean +- std':>15} | {'2B - B':>7} | "
          f"{'steps B':>7} | {'wall B':>6} | ok")
    worst, walls = 0.0, []
    for method in methods:
        for n in ((64,) if args.quick else SHOTS):
            sel = df[(df.method == method) & (df.n_shots == n) & (df.status != "failed")]
            b, b2 = sel[sel.budget == "B"], sel[sel.budget == "2B"]
            if b.empty:
                continue
            wall = b.wall_s.mean()
            if n == 64:
                walls.append(wall)
            line = f"{method:>10} {n:>4} | {b.test_acc.mean():.3f} +- {b.test_acc.std(ddof=1) if len(b) > 1 else 0:.3f} |"
            if b2.empty:
                print(line + f" {'':>15} | {'':>7} | {'':>7} | {wall:6.1f} |")
                continue
            diff = b2.test_acc.mean() - b.test_acc.mean()
            worst = max(worst, abs(diff))
            print(line + f" {b2.test_acc.mean():.3f} +- {b2.test_acc.std(ddof=1) if len(b2) > 1 else 0:.3f} | "
                  f"{diff:+7.3f} | {b.steps.mean():7.0f} | {wall:6.1f} | "
                  f"{'yes' if abs(diff) < TARGET else 'NO'}")
    if walls:
        print(f"\nN = 64 run, protocol budget: mean wall time {np.mean(walls):.1f} s, slowest method "
              f"{max(walls):.1f} s (target < 60 s on 2 cores)")
    if not args.quick:
        print(f"largest |2B - B| over methods and N: {worst:.3f} (target < {TARGET})")


if __name__ == "__main__":
    main()
