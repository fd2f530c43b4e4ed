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
import torch

from ..train import RunConfig
from ._common import t_interval
from .study import Study, register_study

NAME = "empirical"
TASKS = ("shapes-caption", "shapes-vqa")
# Every task, ShapesWorld's or a real one (``--task coco-caption`` / ``vqa-v2`` ...), is read by its
# kind: captioning is what vlt5-tiny (and VL-T5's captioning objective) was pre-trained on. A backbone
# pre-trained on VQA as well would make both tasks consistent: then read the findings with that in mind.
_KIND_CONSISTENT = {"caption": True, "vqa": False}
_KIND_METRICS = {"caption": ("CIDEr-D", "BLEU-4"), "vqa": ("accuracy",)}  # the headline first
CONSISTENT = {"shapes-caption": _KIND_CONSISTENT["caption"], "shapes-vqa": _KIND_CONSISTENT["vqa"]}
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
WEIGHTS_N = (16, 64, 1000)  # the N whose seed-13 middle-size runs keep their weights in the bundle
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
    """Seed 13 at N = 16, 64 and 1000, the middle sizes (the probe view compares tuned and frozen
    encoders). Prefix tuning only at N = 64 and length 8: its trainable reparameterisation MLP makes
    each checkpoint 5.6 MB (LoRA r = 16's is 0.35 MB), which the committed bundle cannot hold 12 of."""
    option, sizes = SIZES.get(cfg.method, (None, ()))
    if option is None or cfg.seed != 13:
        return False
    if cfg.method == "prefix":
        return cfg.n_shots == 64 and cfg.method_config.get(option) == sizes[1]
    return cfg.n_shots in WEIGHTS_N and cfg.method_config.get(option) in sizes[1:3]


def size_of(method: str, method_config: dict):
    option, _ = SIZES[method]
    return method_config.get(option)


# ------------------------------------------------------------------------------------------- analyses
def task_kind(task: str) -> str:
    """``"caption"`` or ``"vqa"``: what the study makes of a task (ShapesWorld's or a real dataset's)."""
    from ..data import get_task_spec

    return get_task_spec(task).kind


def _by_kind(task: str, table: dict):
    kind = _kind_or_none(task)
    if kind not in table:
        raise ValueError(f"task must be one of {TASKS} or another caption or VQA task, got {task!r}")
    return table[kind]


def consistent(task: str) -> bool:
    """Whether ``task`` is consistent with the backbone's pre-training (captions: yes; VQA: no)."""
    return _by_kind(task, _KIND_CONSISTENT)


def _results(store, default_lr_only: bool = True):
    """The store's runs of the study's grid: the five methods at one of their four sizes, on a caption
    or a VQA task, at the method's default learning rate (other runs the store holds, e.g. other
    studies' LoRA at its default rank or the lr check's runs, :mod:`.empirical_lr`, are left out;
    ``default_lr_only=False`` keeps every learning rate). Adds ``size``, ``composition``, the
    resolved ``lr`` and ``default_lr`` (whether it is the method's default)."""
    from ..train import RunConfig, RunStore, load_results

    df = load_results(store if isinstance(store, RunStore) else RunStore(store))
    if df.empty:
        return df
    df = df[df["method"].isin(list(SIZES)) & df["task"].apply(lambda t: _kind_or_none(t) in _KIND_CONSISTENT)]
    # The resolved lr, and whether it is the method's default (an explicit lr equal to the default is
    # the same run: the hash resolves lr).
    raw = (np.array([np.nan if v is None else v for v in df["lr"]], dtype=float) if "lr" in df.columns
           else np.full(len(df), np.nan))
    default = np.array([RunConfig(method=m, method_config=mc or {}).default_lr()
                        for m, mc in zip(df["method"], df["method_config"])], dtype=float)
    df = df.assign(lr=np.where(np.isfinite(raw), raw, default),
                   default_lr=~np.isfinite(raw) | np.isclose(raw, default, rtol=1e-9, atol=0))
    if default_lr_only:
        df = df[df["default_lr"].to_numpy(bool)]
    df = df.assign(size=[size_of(m, mc or {}) for m, mc in zip(df["method"], df["method_config"])],
                   composition=df["method"].map(COMPOSITION))
    # (a bool array: an empty list would select no columns instead of no rows)
    return df[np.array([size in SIZES[m][1] for m, size in zip(df["method"], df["size"])], dtype=bool)]


def _kind_or_none(task):
    try:
        return task_kind(task)
    except (KeyError, ValueError):
        return None


METRICS = {"shapes-caption": _KIND_METRICS["caption"], "shapes-vqa": _KIND_METRICS["vqa"]}


def metrics_of(task: str) -> tuple:
    """A task's metrics, the headline first (ShapesWorld's tasks, or a real one by its kind)."""
    return _by_kind(task, _KIND_METRICS)


def metric_column(task: str, metric: str | None) -> str:
    """The results column of a task's metric (``None`` or the first of ``metrics_of(task)``: the
    headline)."""
    metrics = metrics_of(task)
    if metric is None or metric == metrics[0]:
        return "test_acc"
    if metric not in metrics:
        raise ValueError(f"{task} is scored with {metrics}, got {metric!r}")
    return f"test/{metric}"


def grid_table(store, metric: str | None = None):
    """Mean, std, n and 95 % interval over seeds of the headline score (accuracy; CIDEr-D for
    captions) per task, method, size and N, with the trainable parameters of each (method, size).
    ``metric="BLEU-4"``: the captioning runs' BLEU-4 instead (the VQA rows are then left out)."""
    from ..train import summarize

    df = _results(store)
    if df.empty:
        return df
    if metric is not None:
        if not any(metric in ms for ms in METRICS.values()):
            raise ValueError(f"metric must be one of {sorted({m for ms in METRICS.values() for m in ms})}, "
                             f"got {metric!r}")
        tasks = [t for t in df["task"].unique() if metric in metrics_of(t)]
        df = df[df["task"].isin(tasks)]
        if df.empty:
            return df
        column = metric_column(tasks[0], metric)
        if column not in df.columns:
            return df.iloc[:0]
        df = df.assign(test_acc=df[column]).dropna(subset=["test_acc"])
        if df.empty:
            return df
    out = summarize(df, by=("task", "method", "size", "n_shots"))
    params = df.groupby(["method", "size"])["trainable"].first()
    out["trainable"] = [params.get((m, s), np.nan) for m, s in zip(out["method"], out["size"])]
    return out


def spearman_interval(x, y, rng=None, n_boot: int = 500) -> tuple[float, float, float]:
    """Spearman's rank correlation of ``y`` with ``x`` and a bootstrap 95 % interval over the pairs
    (``n_boot`` resamples drawn from ``rng``; resamples with one distinct ``x`` are skipped). Without
    ``rng`` a fresh generator seeded 0 is used, so an interval depends on its own pairs alone."""
    from scipy import stats

    rng = np.random.default_rng(0) if rng is None else rng
    x, y = np.asarray(x, float), np.asarray(y, float)
    rho = stats.spearmanr(x, y).statistic
    boot = []
    for _ in range(n_boot):
        i = rng.integers(0, len(x), len(x))
        if len(np.unique(x[i])) > 1:
            boot.append(stats.spearmanr(x[i], y[i]).statistic)
    lo, hi = np.nanquantile(boot, [0.025, 0.975]) if boot else (np.nan, np.nan)
    return float(rho), float(lo), float(hi)


def monotonicity(store):
    """Per task and method: Spearman's rank correlation of the score with log N (over sizes and
    seeds) and with log size (over N and seeds), with a bootstrap 95 % interval over runs. The paper:
    on the inconsistent task, performance rises with both. Each interval has its own generator and
    takes the runs in hash order, so it depends on its group's runs alone (not on other groups, nor
    on the order a store or a bundle lists them)."""
    import pandas as pd

    cols = ["task", "consistent", "method", "axis", "spearman", "ci_low", "ci_high", "runs"]
    df = _results(store)
    rows = []
    if df.empty:
        return pd.DataFrame(rows, columns=cols)
    if "run" in df.columns:
        df = df.sort_values("run", kind="stable")
    for (task, method), part in df.groupby(["task", "method"]):
        for axis in ("n_shots", "size"):
            x, y = np.log(part[axis].to_numpy(float)), part["test_acc"].to_numpy(float)
            if len(np.unique(x)) < 2:
                continue
            rho, lo, hi = spearman_interval(x, y)
            rows.append({"task": task, "consistent": consistent(task), "method": method, "axis": axis,
                         "spearman": rho, "ci_low": lo, "ci_high": hi, "runs": len(x)})
    return pd.DataFrame(rows, columns=cols)


def _slope(x, y):
    """OLS slope of y on x with its 95 % t-interval."""
    from scipy import stats

    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(np.unique(x)) < 2 or len(x) < 3:
        return np.nan, np.nan, np.nan
    r = stats.linregress(x, y)
    h = stats.t.ppf(0.975, len(x) - 2) * r.stderr
    return float(r.slope), float(r.slope - h), float(r.slope + h)


def data_slope(store):
    """Per task, method and size: the slope of the score against log10 N (score units per tenfold
    data) with its 95 % interval, over every N and seed. The paper: on the consistent task data size
    stops mattering (a slope near 0), on the inconsistent one it keeps paying."""
    import pandas as pd

    df = _results(store)
    rows = []
    for (task, method, size), part in df.groupby(["task", "method", "size"]):
        b, lo, hi = _slope(np.log10(part["n_shots"]), part["test_acc"])
        rows.append({"task": task, "consistent": consistent(task), "method": method, "size": size,
                     "slope_per_decade": b, "ci_low": lo, "ci_high": hi, "runs": len(part)})
    return pd.DataFrame(rows, columns=["task", "consistent", "method", "size", "slope_per_decade", "ci_low",
                                       "ci_high", "runs"])


def size_optimum(store):
    """Per task, method and N: the size with the best mean score, and whether it is interior and
    significantly better than both ends (paired over seeds: the difference to each end and its 95 %
    t-interval). The paper: on the consistent task an interior size is best."""
    import pandas as pd

    df = _results(store)
    rows = []
    for (task, method, n), part in df.groupby(["task", "method", "n_shots"]):
        by_size = part.pivot_table(index="seed", columns="size", values="test_acc")
        if by_size.shape[1] < 3:
            continue
        sizes = sorted(by_size.columns)
        best = by_size.mean().idxmax()
        row = {"task": task, "consistent": consistent(task), "method": method, "n_shots": n, "best_size": best,
               "interior": sizes[0] < best < sizes[-1]}
        for end, name in ((sizes[0], "smallest"), (sizes[-1], "largest")):
            d = (by_size[best] - by_size[end]).dropna().to_numpy()
            m, lo, hi, k = t_interval(d) if best != end else (0.0, np.nan, np.nan, len(d))
            row.update({f"vs_{name}": m, f"vs_{name}_ci_low": lo, f"vs_{name}_ci_high": hi})
        row["significant_interior"] = bool(row["interior"] and row["vs_smallest_ci_low"] > 0
                                           and row["vs_largest_ci_low"] > 0)
        rows.append(row)
    return pd.DataFrame(rows)


def composition(store):
    """Layer against embedding composition at about equal parameters: for each task, N and embedding
    configuration (prompt or prefix at a size), the layer configuration (LoRA or an adapter at a size)
    whose trainable count is nearest on a log scale, paired over seeds: the mean difference (layer -
    embedding), its 95 % interval, and the two counts. The paper: layer composition wins."""
    import pandas as pd

    df = _results(store)
    rows = []
    params = df.groupby(["method", "size"])["trainable"].first()
    layer_cfgs = [k for k in params.index if COMPOSITION[k[0]] == "layer"]
    for (task, n), part in df.groupby(["task", "n_shots"]):
        for emb in [k for k in params.index if COMPOSITION[k[0]] == "embedding"]:
            if not layer_cfgs:
                break
            near = min(layer_cfgs, key=lambda k: abs(np.log(params[k]) - np.log(params[emb])))
            a = part[(part["method"] == near[0]) & (part["size"] == near[1])].set_index("seed")["test_acc"]
            b = part[(part["method"] == emb[0]) & (part["size"] == emb[1])].set_index("seed")["test_acc"]
            common = a.index.intersection(b.index)
            if not len(common):
                continue
            m, lo, hi, k = t_interval((a[common] - b[common]).to_numpy())
            rows.append({"task": task, "consistent": consistent(task), "n_shots": n,
                         "embedding": f"{emb[0]} {emb[1]}", "layer": f"{near[0]} {near[1]}",
                         "embedding_params": int(params[emb]), "layer_params": int(params[near]),
                         "layer_minus_embedding": m, "ci_low": lo, "ci_high": hi, "seeds": k})
    return pd.DataFrame(rows)


def representation_shift(store, cells=None, max_samples: int = 256):
    """How far each method moves the encoder from the pre-trained one: per layer, linear CKA between
    the frozen backbone's and the tuned model's residual stream (each layer's input, and the final
    encoder output), mean-pooled over valid tokens, on the test questions of the task. ``cells``:
    (task, method, size, N) tuples; default every seed-13 run of the store that has weights.
    1 = unchanged representations (up to a linear map), lower = moved."""
    import pandas as pd

    from ..models import capture, load_backbone
    from ..probes import cka
    from ..train import RunStore, load_run, restore_run

    store = store if isinstance(store, RunStore) else RunStore(store)
    df = _results(store, default_lr_only=False)  # a tuned run at another lr is looked into as well
    if df.empty:
        return pd.DataFrame()
    df = df[df["seed"] == 13]
    rows = []
    for _, row in df.iterrows():
        key = (row["task"], row["method"], row["size"], row["n_shots"])
        if cells is not None and key not in set(cells):
            continue
        path = store.locate(row["run"])
        if path is None or not (path / "method.safetensors").is_file():
            continue
        r = restore_run(load_run(row["run"], store), store=store)
        n_layers = r.model.config.n_enc_layers
        points = [f"encoder.{i}.attn:input" for i in range(1, n_layers)] + ["encoder.final"]
        data = r.batches("test", max_samples=max_samples)
        frozen = load_backbone(r.config.backbone, **r.config.backbone_options)
        a = capture(frozen, points, data=data, max_samples=max_samples, dtype=torch.float64)
        b = capture(r.model, points, data=data, max_samples=max_samples, dtype=torch.float64)
        for i, p in enumerate(points):
            rows.append({"task": key[0], "consistent": consistent(key[0]), "method": key[1], "size": key[2],
                         "n_shots": key[3], "layer": i + 1, "point": p, "cka_frozen_tuned": float(cka(a[p], b[p]))})
    return pd.DataFrame(rows)


# "Data stops mattering": the slope per tenfold N counts as flat when its 95 % interval lies within
# +- this share of the mean score of the (task, method, size) over the grid.
FLAT_MARGIN = 0.05


def verdicts(store):
    """Each finding of the paper, its wording, what the embedded world shows, and the verdict.

    - inconsistent task (shapes-vqa): the score rises with N, and with parameter size (Spearman over
      the grid per method; reproduced for a method when the bootstrap interval is above 0);
    - consistent task (shapes-caption): data size stops mattering (the slope per tenfold N lies
      within +- ``FLAT_MARGIN`` of the mean score: reproduced; above it: not reproduced);
    - consistent task: an interior parameter size is best (reproduced in a cell when the best mean size
      is interior and beats both ends paired over seeds; not reproduced when an end is best and beats
      the other end);
    - layer composition beats embedding composition at about equal parameters (paired over seeds, on
      both tasks).

    A finding tested in several places is combined with :func:`~._common.overall`.
    """
    import pandas as pd

    from ._common import overall, verdict

    rows = []
    mono = monotonicity(store)
    for axis, finding in (("n_shots", "on the inconsistent task performance rises with data size"),
                          ("size", "on the inconsistent task performance rises with parameter size")):
        part = mono[(~mono["consistent"]) & (mono["axis"] == axis)] if len(mono) else mono
        text = "; ".join(f"{r.method} {r.spearman:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}]" for r in part.itertuples())
        rows.append({"finding": finding,
                     "paper": "yes (finding 1: on a task not consistent with pre-training, more data and more "
                              "parameters help)",
                     "workbench": f"Spearman with log {'N' if axis == 'n_shots' else 'size'}: {text or 'no runs yet'}",
                     "verdict": overall(verdict(r.ci_low, r.ci_high) for r in part.itertuples()) if len(part)
                     else "inconclusive"})
    slope = data_slope(store)
    means = _results(store).groupby(["task", "method", "size"])["test_acc"].mean() if len(slope) else None
    part = slope[slope["consistent"]] if len(slope) else slope
    vs, texts = [], []
    for r in part.itertuples():
        m = FLAT_MARGIN * abs(means.get((r.task, r.method, r.size), np.nan))
        if not (np.isfinite(r.ci_low) and np.isfinite(m)):
            vs.append("inconclusive")
        elif -m <= r.ci_low and r.ci_high <= m:
            vs.append("reproduced")
        elif r.ci_low > m:
            vs.append("not reproduced")
        else:
            vs.append("inconclusive")
        if np.isfinite(r.ci_low):
            texts.append(f"{r.method} {r.size}: {r.slope_per_decade:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]")
    rows.append({"finding": "on the consistent task data size stops mattering",
                 "paper": "yes (finding 2: on a task consistent with pre-training, data size barely matters)",
                 "workbench": (f"slope per tenfold N (flat: within +-{FLAT_MARGIN:.0%} of the mean score), "
                               f"{sum(v == 'reproduced' for v in vs)} of {len(vs)} flat: " + "; ".join(texts[:6])
                               + ("; ..." if len(texts) > 6 else "")) if texts
                 else "no slope yet (it needs runs at two N or more)" if vs else "no runs yet",
                 "verdict": overall(vs) if vs else "inconclusive"})
    opt = size_optimum(store)
    part = opt[opt["consistent"]] if len(opt) else opt
    vs = []
    for r in part.itertuples():
        if r.significant_interior:
            vs.append("reproduced")
        elif not r.interior and (r.vs_smallest_ci_low > 0 or r.vs_largest_ci_low > 0):
            vs.append("not reproduced")
        else:
            vs.append("inconclusive")
    rows.append({"finding": "on the consistent task an interior parameter size is best",
                 "paper": "yes (finding 2: an optimal, not the largest, parameter size)",
                 "workbench": (f"{sum(v == 'reproduced' for v in vs)} of {len(vs)} (method, N) cells have a "
                               f"significant interior optimum, {sum(v == 'not reproduced' for v in vs)} a "
                               "significantly better end") if vs else "no runs yet",
                 "verdict": overall(vs) if vs else "inconclusive"})
    comp = composition(store)
    texts = []
    for task, part in (comp.groupby("task", sort=False) if len(comp) else ()):
        texts.append(f"{task}: {sum(r.ci_low > 0 for r in part.itertuples())} of {len(part)} matched pairs "
                     f"significantly better for the layer method, {sum(r.ci_high < 0 for r in part.itertuples())} "
                     "worse")
    rows.append({"finding": "layer composition (LoRA, adapters) beats embedding composition (prompt, prefix) "
                            "at equal parameters",
                 "paper": "yes (finding 3: layer composition beats embedding composition)",
                 "workbench": "; ".join(texts) if texts else "no runs yet",
                 "verdict": overall(verdict(r.ci_low, r.ci_high) for r in comp.itertuples()) if len(comp)
                 else "inconclusive"})
    return pd.DataFrame(rows, columns=["finding", "paper", "workbench", "verdict"])


STUDY = register_study(Study(
    NAME,
    "Data size x parameter size for prompt, prefix, LoRA, serial and parallel adapters on a task consistent "
    "with pre-training (shapes-caption) and one that is not (shapes-vqa): 5 methods x 4 sizes x 5 N x 2 tasks "
    "x 3 seeds.",
    grids=empirical_configs,
    keep_weights=keep_weights,
    analyses={"grid_table": grid_table, "monotonicity": monotonicity, "data_slope": data_slope,
              "size_optimum": size_optimum, "composition": composition,
              "representation_shift": representation_shift, "verdicts": verdicts},
))
