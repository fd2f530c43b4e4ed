"""Benchmark of the probes against their peers (not collected by pytest).

Run: ``python tests/bench/bench_probes.py`` (about 1-2 minutes on 2 CPU cores). Prints one
table; "ratio" is the peer's time divided by ours (> 1: we are faster).

- linear CKA, n=8192, d=512: ours (feature form) vs ckatorch's ``cka_base`` (Gram form) and a
  plain Gram-matrix CKA in torch (target: >= 10x faster);
- RDM (correlation) + Spearman comparison, 1000 conditions: ours vs rsatoolbox (target: faster);
- KSG, n=5000, 1-D: ours vs sklearn's ``mutual_info_regression`` (target: ratio >= 0.5), and
  10+10 dims (target: < 5 s);
- MinibatchCKA, 24 x 24 layer pairs, streaming 10,000 samples: time and peak memory as the
  number of samples grows (target: flat).
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from workbench.probes import MinibatchCKA, cka, compare_rdms, mi_ksg, rdm  # noqa: E402

THREADS = int(os.environ.get("BENCH_THREADS", "2"))  # torch intra-op threads
ROWS: list[tuple[str, str, str, str, str]] = []


def timeit(fn, repeat: int = 5) -> tuple[float, object]:
    """Best wall time of ``repeat`` calls (seconds) and the last result. The minimum, because on a
    shared machine the other processes only ever add time."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def row(task: str, ours: float, peer_name: str, peer: float | None, note: str = "") -> None:
    ratio = f"{peer / ours:7.1f}x" if peer is not None else "      -"
    peer_s = f"{peer:8.3f}" if peer is not None else "       -"
    ROWS.append((task, f"{ours:8.3f}", f"{peer_name:<26}{peer_s}", ratio, note))


def bench_cka() -> None:
    from ckatorch.core import cka_base

    n, d = 8192, 512
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    Y = X @ torch.randn(d, d, generator=gen, dtype=torch.float64) / d**0.5 + torch.randn(n, d, generator=gen,
                                                                                        dtype=torch.float64)

    def plain_gram():
        K, L = X @ X.T, Y @ Y.T
        K = K - K.mean(0, keepdim=True) - K.mean(1, keepdim=True) + K.mean()
        L = L - L.mean(0, keepdim=True) - L.mean(1, keepdim=True) + L.mean()
        return (K * L).sum() / (K.norm() * L.norm())

    t_ours, v_ours = timeit(lambda: cka(X, Y), repeat=5)
    t_ck, v_ck = timeit(lambda: cka_base(X, Y, kernel="linear", method="fro_norm"), repeat=1)
    t_plain, v_plain = timeit(plain_gram, repeat=1)
    diff = max(abs(float(v_ours) - float(v_ck)), abs(float(v_ours) - float(v_plain)))
    row("linear CKA n=8192 d=512", t_ours, "ckatorch cka_base (Gram)", t_ck, f"|diff| {diff:.1e}")
    row("", t_ours, "plain Gram CKA (torch)", t_plain, "target >= 10x")


def bench_rsa() -> None:
    from rsatoolbox.data import Dataset
    from rsatoolbox.rdm import calc_rdm, compare

    rng = np.random.default_rng(0)
    c, d = 1000, 100
    A = rng.standard_normal((c, d))
    B = A + rng.standard_normal((c, d))

    def ours():
        return compare_rdms(rdm(A, "correlation"), rdm(B, "correlation"), "spearman")

    def theirs():
        ra = calc_rdm(Dataset(A), method="correlation")
        rb = calc_rdm(Dataset(B), method="correlation")
        return compare(ra, rb, method="spearman")[0, 0]

    t_ours, v_ours = timeit(ours)
    t_rsa, v_rsa = timeit(theirs)
    row("RDM + Spearman, 1000 cond.", t_ours, "rsatoolbox 0.3", t_rsa, f"|diff| {abs(v_ours - v_rsa):.1e}")


def bench_ksg() -> None:
    from sklearn.feature_selection import mutual_info_regression

    rng = np.random.default_rng(0)
    x = rng.standard_normal((5000, 1))
    y = 0.7 * x + rng.standard_normal((5000, 1))
    t_ours, v_ours = timeit(lambda: mi_ksg(x, y, k=3))
    t_sk, v_sk = timeit(lambda: mutual_info_regression(x, y.ravel(), n_neighbors=3, random_state=0)[0])
    row("KSG n=5000 1-D", t_ours, "sklearn mutual_info_regr.", t_sk, f"|diff| {abs(v_ours - v_sk):.1e}; >= 0.5x")
    X = rng.standard_normal((5000, 10))
    Y = 0.5 * X + rng.standard_normal((5000, 10))
    t_hd, v_hd = timeit(lambda: mi_ksg(X, Y, k=3), repeat=1)
    true = -5 * np.log(1 - 0.5**2 / 1.25)
    row("KSG n=5000 10+10 dims", t_hd, "-", None, f"{v_hd:.2f} nats (true {true:.2f}); < 5 s")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0); False if unavailable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    """Peak resident memory (MiB) since the last reset (VmHWM), else since the process began."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_minibatch_cka() -> None:
    layers, d, batch, total = 24, 256, 250, 10_000
    gen = torch.Generator().manual_seed(0)
    mix = [torch.randn(d, d, generator=gen, dtype=torch.float64) / d**0.5 for _ in range(layers)]
    mb = MinibatchCKA()
    checkpoints = {1000, 2500, 5000, 10_000}
    reset = _reset_peak_rss()
    base = _peak_rss_mb()
    marks = []
    elapsed = 0.0  # time in MinibatchCKA only, not in the toy network that makes the activations
    for _ in range(total // batch):
        z = torch.randn(batch, d, generator=gen, dtype=torch.float64)
        acts = []
        for m in mix:  # a toy "network": each layer mixes the previous one
            z = torch.tanh(z @ m)
            acts.append(z)
        t0 = time.perf_counter()
        mb.update(acts, acts)
        elapsed += time.perf_counter() - t0
        if mb.n_samples in checkpoints:
            marks.append((mb.n_samples, _peak_rss_mb()))
    t0 = time.perf_counter()
    heat = mb.compute()
    elapsed += time.perf_counter() - t0
    mem = ", ".join(f"{n / 1000:g}k: {m:.0f}" for n, m in marks)
    what = "peak RSS MiB" if reset else "max RSS MiB (process)"
    row(f"MinibatchCKA 24x24 d={d}, 10k", elapsed, "-", None, f"{what} {mem} (start {base:.0f})")
    full_gib = layers * total**2 * 8 / 2**30
    row("", elapsed, "-", None, f"batch {batch}; full-data Grams would need {full_gib:.0f} GiB; "
        f"mean diag {float(heat.diagonal().mean()):.3f}")


def main() -> None:
    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"probes benchmark: torch {torch.__version__}, {THREADS} threads, float64, CPU; "
          f"load average at start {load} (timings: best of 5, or of 1 for the slow peers)\n", flush=True)
    for bench in (bench_minibatch_cka, bench_cka, bench_rsa, bench_ksg):
        bench()
    header = ("task", "ours [s]", "peer                       [s]", "ratio", "note")
    widths = [max(len(r[i]) for r in ROWS + [header]) for i in range(5)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print(line)
    print("-" * len(line))
    for r in ROWS:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
    print(f"\ntotal benchmark time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
