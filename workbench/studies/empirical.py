"""The empirical study of PEFT on vision-language models (arXiv 2403.08433): data size x parameter
size for five methods, on a task consistent with pre-training (``shapes-caption``: vlt5-tiny was
pre-trained on captions) and on one that is not (``shapes-vqa``).

The grid: prompt tuning, prefix tuning, LoRA, the serial adapter (``houlsby``) and the parallel
adapter (``parallel``), each at 4 parameter sizes spanning about two orders of magnitude (prompt and
prefix length 2, 8, 32, 128; LoRA rank 1, 4, 16, 64; adapter bottleneck 2, 8, 32, 128), x N in
{16, 64, 250, 1000, 4000} x both tasks x seeds 13, 21, 42 (600 runs). The pools are enlarged to
10,000 examples (``pool_size``) so that N = 4000 has its 4,000 dev examples; captioning is scored
with CIDEr-D (the headline) and BLEU-4, VQA with accuracy.

    python -m workbench.studies run empirical --executor processes --workers 2 --threads 1 --filter n_shots=16,64
"""

from __future__ import annotations

import numpy as np

from ..data import SEEDS
from ..train import RunConfig
from .study import Study, register_study

NAME = "empirical"
TASKS = ("shapes-caption", "shapes-vqa")
CONSISTENT = {"shapes-caption": True, "shapes-vqa": False}
N_SHOTS = (16, 64, 250, 1000, 4000)
STUDY_SEEDS = tuple(SEEDS[:3])
POOL_SIZE = 10_000
# method -> (its size option, the 4 sizes); layer composition vs embedding composition
SIZES = {
    "prompt": ("length", (2, 8, 32, 128)),
    "prefix": ("length", (2, 8, 32, 128)),
    "lora": ("r", (1, 4, 16, 64)),
    "houlsby": ("bottleneck", (2, 8, 32, 128)),
    "parallel": ("bottleneck", (2, 8, 32, 128)),
}
COMPOSITION = {"prompt": "embedding", "prefix": "embedding", "lora": "layer", "houlsby": "layer",
               "parallel": "layer"}


def config(task: str, method: str, size: int, n_shots: int, seed: int = 13) -> RunConfig:
    """One cell of the grid."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if method not in SIZES:
        raise ValueError(f"method must be one of {tuple(SIZES)}, got {method!r}")
    option, sizes = SIZES[method]
    if size not in sizes:
        raise ValueError(f"{method}: {option} must be one of {sizes}, got {size!r}")
    return RunConfig(task=task, method=method, n_shots=n_shots, seed=seed, pool_size=POOL_SIZE, quiet=True,
                     method_config={option: size})


def empirical_configs() -> list[RunConfig]:
    return [config(t, m, s, n, seed) for t in TASKS for m in SIZES for s in SIZES[m][1] for n in N_SHOTS
            for seed in STUDY_SEEDS]


def keep_weights(cfg: RunConfig) -> bool:
    """Seed 13 at N = 64 and 1000, the middle sizes (the probe view compares tuned and frozen encoders)."""
    option, sizes = SIZES.get(cfg.method, (None, ()))
    return (cfg.seed == 13 and cfg.n_shots in (64, 1000) and option is not None
            and cfg.method_config.get(option) in sizes[1:3])


def size_of(method: str, method_config: dict):
    option, _ = SIZES[method]
    return method_config.get(option)


# ------------------------------------------------------------------------------------------- analyses
def _results(store):
    from ..train import RunStore, load_results

    df = load_results(store if isinstance(store, RunStore) else RunStore(store))
    if df.empty:
        return df
    df = df[df["method"].isin(list(SIZES)) & df["task"].isin(TASKS)]
    return df.assign(size=[size_of(m, mc or {}) for m, mc in zip(df["method"], df["method_config"])],
                     composition=df["method"].map(COMPOSITION))


def grid_table(store):
    """Mean, std, n and 95 % interval over seeds of the headline score (accuracy; CIDEr-D for
    captions) per task, method, size and N, with the trainable parameters of each (method, size)."""
    from ..train import summarize

    df = _results(store)
    if df.empty:
        return df
    out = summarize(df, by=("task", "method", "size", "n_shots"))
    params = df.groupby(["method", "size"])["trainable"].first()
    out["trainable"] = [params.get((m, s), np.nan) for m, s in zip(out["method"], out["size"])]
    return out


def monotonicity(store):
    """Per task and method: Spearman's rank correlation of the score with log N (over sizes and
    seeds) and with log size (over N and seeds), with a bootstrap 95 % interval over runs. The paper:
    on the inconsistent task, performance rises with both."""
    import pandas as pd
    from scipy import stats

    df = _results(store)
    rows = []
    rng = np.random.default_rng(0)
    for (task, method), part in df.groupby(["task", "method"]):
        for axis in ("n_shots", "size"):
            x, y = np.log(part[axis].to_numpy(float)), part["test_acc"].to_numpy(float)
            if len(np.unique(x)) < 2:
                continue
            rho = stats.spearmanr(x, y).statistic
            boot = []
            for _ in range(500):
                i = rng.integers(0, len(x), len(x))
                if len(np.unique(x[i])) > 1:
                    boot.append(stats.spearmanr(x[i], y[i]).statistic)
            lo, hi = np.nanquantile(boot, [0.025, 0.975]) if boot else (np.nan, np.nan)
            rows.append({"task": task, "consistent": CONSISTENT[task], "method": method, "axis": axis,
                         "spearman": float(rho), "ci_low": float(lo), "ci_high": float(hi), "runs": len(x)})
    return pd.DataFrame(rows, columns=["task", "consistent", "method", "axis", "spearman", "ci_low", "ci_high",
                                       "runs"])


STUDY = register_study(Study(
    NAME,
    "Data size x parameter size for prompt, prefix, LoRA, serial and parallel adapters on a task consistent "
    "with pre-training (shapes-caption) and one that is not (shapes-vqa): 5 methods x 4 sizes x 5 N x 2 tasks "
    "x 3 seeds.",
    grids=empirical_configs,
    keep_weights=keep_weights,
    analyses={"grid_table": grid_table, "monotonicity": monotonicity},
))
