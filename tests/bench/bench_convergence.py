"""Does every method converge under the protocol? Doubling the step budget must not move the mean.

    python tests/bench/bench_convergence.py             # (make bench) 12 methods x N in {16, 64} x 5 seeds
    python tests/bench/bench_convergence.py --quick     # N = 64, seed 13, the protocol budget only
    python tests/bench/bench_convergence.py --methods lora,full --seeds 13,21,42 --workers 2
    python tests/bench/bench_convergence.py --no-train  # report what is already trained
    python tests/bench/bench_convergence.py --shots 16 --seeds 13,21,42,87,100,1,2,3,4,5 --workers 2  # ten seeds
    python tests/bench/bench_convergence.py --methods lora --lr 1.5e-3 --seeds ... # B and 2B at another lr

For the methods of the four papers (full, lora, houlsby, pfeiffer, compacter, adamix, mixphm,
vlpet, petal, prompt, prefix, parallel) on shapes-vqa, each at N = 16 and N = 64 over the
protocol's seeds 13, 21, 42, 87, 100: the protocol's default run (``RunConfig(method=m,
n_shots=n, seed=s)``) against the same run with the step budget doubled (``max_steps`` and
``patience`` x 2, so the run may also wait twice as long for an improvement).

Printed per method and N: the mean test accuracy of B and 2B and their difference over the first
three seeds (the target: |mean(2B) - mean(B)| < 2 points), and over all the seeds (five by
default) the paired difference with its 95 % interval and p-value (``workbench.train.compare``).
The verdict over all the seeds: "converged" when the interval lies inside +-2 points, "budget-limited" when it lies
above 0 (more steps help), "over-trained" when it lies below 0, else "undecided" (the seeds
cannot tell a shift of 2 points from the checkpoint-selection noise). Also the mean wall time of
an N = 64 protocol run (target < 60 s on a 2-core CPU).

``--lr LR`` trains B and 2B at that learning rate instead of each method's default (does a lower
rate remove a budget limit?) and adds, per cell, B at LR against B at the default, paired over seeds.

Protocol runs (B) that a committed study bundle holds (``results/*``: the gallery holds every
method at seeds 13, 21, 42, the MixPHM study seven of them at all five) are read from it, as the
notebooks read them; everything else is trained into the default run store (``runs/`` or
``$WORKBENCH_RUNS``), so an interrupted bench resumes where it stopped and a second call only
prints.
"""

import argparse
import json
import time

import numpy as np
import pandas as pd

from workbench.methods import get_config
from workbench.studies import list_studies, load_study
from workbench.studies.bundle import PROVENANCE_FILE, results_root
from workbench.train import RunConfig, RunStore, compare, sweep
from workbench.train.config import protocol_budget

METHODS = ("full", "lora", "houlsby", "pfeiffer", "compacter", "adamix", "mixphm", "vlpet", "petal",
           "prompt", "prefix", "parallel")
SEEDS = (13, 21, 42, 87, 100)
TARGET_SEEDS = 3  # the target is stated over the first three seeds
SHOTS = (16, 64)
TARGET = 0.02


def configs(methods, shots, seeds, doubled=True, lr=None):
    out = []
    for method in methods:
        for n in shots:
            for seed in seeds:
                base = RunConfig(task="shapes-vqa", method=method, n_shots=n, seed=seed, quiet=True, lr=lr)
                out.append(base)
                if doubled:
                    max_steps, _ = protocol_budget(n, base.batch_size)
                    out.append(base.replace(max_steps=2 * max_steps, patience=2 * base.patience))
    return out


def from_bundles(cfgs) -> tuple[list[pd.DataFrame], list]:
    """(rows read from committed study bundles, the configs no bundle holds)."""
    frames, left = [], list(cfgs)
    for name in list_studies():
        # The provenance lists a bundle's runs: open (and check) only the bundles that hold some.
        try:
            listed = json.loads((results_root() / name / PROVENANCE_FILE).read_text()).get("runs", {})
        except (OSError, ValueError):
            listed = None  # no bundle, or a damaged one: load_study says which
        if listed is not None and not any(c.hash in listed for c in left):
            continue
        try:
            store = load_study(name)
        except FileNotFoundError:
            continue
        held = set(store.runs)
        mine = [c for c in left if c.hash in held]
        if mine:
            frames.append(sweep(mine, store=store, progress=False).assign(source=f"bundle {name}"))
            left = [c for c in left if c.hash not in held]
    return frames, left


def verdict(lo: float, hi: float) -> str:
    if -TARGET < lo and hi < TARGET:
        return "converged"
    if lo > 0:
        return "budget-limited"
    if hi < 0:
        return "over-trained"
    return "undecided"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N = 64, seed 13, the protocol budget only")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)),
                    help="seeds; the target is read over the first three")
    ap.add_argument("--shots", default=",".join(map(str, SHOTS)), help="training-set sizes N")
    ap.add_argument("--workers", type=int, default=1, help="processes (1: in this process, 2 threads)")
    ap.add_argument("--no-train", action="store_true",
                    help="train nothing: report the runs the bundles and the run store already hold")
    ap.add_argument("--lr", type=float, default=None,
                    help="train B and 2B at this learning rate instead of each method's default, and "
                         "compare B with the default's B")
    args = ap.parse_args()
    if args.lr is not None and not args.lr > 0:
        ap.error(f"--lr must be a positive learning rate, got {args.lr}")
    methods = args.methods.split(",")
    seeds = tuple(int(s) for s in args.seeds.split(","))
    shots = (64,) if args.quick else tuple(int(n) for n in args.shots.split(","))
    run_seeds = seeds[:1] if args.quick else seeds
    cfgs = configs(methods, shots, run_seeds, doubled=not args.quick, lr=args.lr)
    if args.lr is not None:  # the default's B, to compare with
        cfgs += configs(methods, shots, run_seeds, doubled=False)
    t0 = time.perf_counter()
    frames, left = from_bundles(cfgs)
    if left and args.no_train:
        store = RunStore()
        left = [c for c in left if store.is_finished(c.hash)]
    if left:
        kw = dict(executor="processes", workers=args.workers, threads=1) if args.workers > 1 else {}
        frames.append(sweep(left, **kw).assign(source="run store"))
    df = pd.concat(frames, ignore_index=True)
    print(f"{len(df)} runs ({(df.status == 'done').sum()} trained now, "
          f"{df.source.str.startswith('bundle').sum()} read from study bundles) in {time.perf_counter() - t0:.0f} s")
    for _, r in df[df.status == "failed"].iterrows():
        print(f"FAILED {r.method} N={r.n_shots} seed={r.seed}: {r.error}")
    df = df[df.status != "failed"].copy()
    df["budget"] = np.where(df.max_steps.isna(), "B", "2B")
    reference = None
    if args.lr is not None:
        at_lr = df.lr.notna()  # the default's runs leave lr unset
        reference, df = df[~at_lr], df[at_lr]

    first = seeds[:TARGET_SEEDS]
    print(f"\ntest accuracy; B: the protocol, 2B: max_steps and patience x 2. Target: |2B - B| < {TARGET} "
          f"over seeds {', '.join(map(str, first))}")
    print(f"{'method':>10} {'N':>4} | {'B':>5} {'2B':>6} {'2B - B':>7} ok  | over {len(seeds)} seeds: "
          f"{'2B - B':>7} {'95 % interval':>17} {'p':>5} | verdict        | steps B | wall B")
    walls, worst, met, met5, cells, tally = [], 0.0, 0, 0, 0, {}
    for method in methods:
        for n in shots:
            sel = df[(df.method == method) & (df.n_shots == n)]
            b = sel[sel.budget == "B"]
            if b.empty:
                continue
            wall = b.wall_s.mean()
            if n == 64:
                walls.append(wall)
            if args.quick:
                print(f"{method:>10} {n:>4} | {b.test_acc.mean():.3f} {'':>50} | {b.steps.mean():7.0f} | {wall:6.1f}")
                continue
            d3 = _paired(sel[sel.seed.isin(first)])
            d5 = _paired(sel)
            if d3 is None or d5 is None:
                print(f"{method:>10} {n:>4} | {b.test_acc.mean():.3f}  (2B not trained yet)")
                continue
            cells += 1
            ok = abs(d3["mean_diff"]) < TARGET
            met += ok
            met5 += abs(d5["mean_diff"]) < TARGET
            worst = max(worst, abs(d3["mean_diff"]))
            v = verdict(d5["ci_low"], d5["ci_high"]) if d5["n"] > 1 else "-"
            tally[v] = tally.get(v, 0) + 1
            b3 = b[b.seed.isin(first)].test_acc.mean()
            print(f"{method:>10} {n:>4} | {b3:.3f} {b3 + d3['mean_diff']:.3f} {d3['mean_diff']:+7.3f} "
                  f"{'yes' if ok else 'NO ':3} | {int(d5['n']):>2} pairs:  {d5['mean_diff']:+7.3f} "
                  f"[{d5['ci_low']:+.3f}, {d5['ci_high']:+.3f}] {d5['p']:5.2f} | {v:14} | "
                  f"{b.steps.mean():7.0f} | {wall:6.1f}")
    if walls:
        print(f"\nN = 64 run, protocol budget: mean wall time {np.mean(walls):.1f} s, slowest method "
              f"{max(walls):.1f} s (target < 60 s on 2 cores; one core per run, two runs at a time)")
    if cells:
        print(f"target met (|2B - B| < {TARGET} over {len(first)} seeds): {met} of {cells} cells; largest |2B - B| "
              f"{worst:.3f}; over {len(seeds)} seeds: {met5} of {cells}")
        print(f"{len(seeds)}-seed verdicts: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.items())))
    if reference is not None and not args.quick:
        print(f"\nB at lr {args.lr:g} against B at the method's default learning rate, paired over seeds:")
        for method in methods:
            for n in shots:
                both = pd.concat([df[(df.method == method) & (df.n_shots == n) & (df.budget == "B")].assign(arm="lr"),
                                  reference[(reference.method == method) & (reference.n_shots == n)].assign(arm="default")])
                c = compare(both, {"arm": "lr"}, {"arm": "default"}, by="n_shots", pair_on="seed")
                if len(c) and c["n"].iloc[0] > 1:
                    r = c.iloc[0]
                    print(f"{method:>10} {n:>4} | default lr {get_config(method).lr:g}: "
                          f"{r.mean_diff:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}] p {r.p:.2f} ({int(r.n)} pairs)")


def _paired(sel: pd.DataFrame) -> dict:
    """The paired 2B - B test-accuracy difference over the seeds of ``sel`` (one method and N)."""
    c = compare(sel, {"budget": "2B"}, {"budget": "B"}, by="n_shots", pair_on="seed")
    return c.iloc[0].to_dict() if len(c) and c["n"].iloc[0] > 0 else None


if __name__ == "__main__":
    main()
