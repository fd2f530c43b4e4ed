"""The empirical study of PEFT on vision-language models (arXiv 2403.08433): data size x parameter
size for five methods, on a task consistent with pre-training (``shapes-caption``: vlt5-tiny was
pre-trained on captions) and on one that is not (``shapes-vqa``).

The grid: prompt tuning, prefix tuning, LoRA, the serial adapter (``houlsby``) and the parallel
adapter (``parallel``), each at 4 parameter sizes spanning about two orders of magnitude (prompt and
prefix length 2, 8, 32, 128; LoRA rank 1, 4, 16, 64; adapter bottleneck 2, 8, 32, 128), x N in
{16, 64, 250, 1000, 4000} x both tasks x seeds 13, 21, 42 (600 runs), and the caption
configurations the composition test pairs at seeds 87 and 100 as well (60 runs). The pools are
enlarged to 10,000 examples (``pool_size``) so that N = 4000 has its 4,000 dev examples; captioning
is scored with CIDEr-D (the headline) and BLEU-4, VQA with accuracy.

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
# Composition on captions, the one finding three seeds left open with a small seeds-to-settle estimate
# (about 5), runs on the protocol's five seeds: its pairs' configurations only (below), on captions.
CLAIM_SEEDS = tuple(SEEDS)  # 13, 21, 42, 87, 100
POOL_SIZE = 10_000
# method -> (its size option, the 4 sizes); layer composition vs embedding composition
SIZES = {
    "prompt": ("length", (2, 8, 32, 128)),
    "prefix": ("length", (2, 8, 32, 128)),
    "lora": ("r", (1, 4, 16, 64)),
    "houlsby": ("bottleneck", (2, 8, 32, 128)),
    "parallel": ("bottleneck", (2, 8, 32, 128)),
}
# The learning rate a method's runs share where it is not the method's current default: empty when
# every method's runs are at its default. When a default changes, the method goes in here at its old
# value until its 120 runs are re-trained at the new one (:func:`retrain_configs`; docs/studies.md,
# "When a default changes"), so the bundle stays whole and its findings stay the ones measured.
# (LoRA was held at 3e-3 here while its default moved to 1.5e-3, until its runs were re-trained.)
SHARED_LR: dict[str, float] = {}
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
                     method_config={option: size}, lr=SHARED_LR.get(method))


def shared_lr(method: str, method_config: dict | None = None) -> float | None:
    """The learning rate the study's runs of ``method`` share: :data:`SHARED_LR`, else the default."""
    return SHARED_LR.get(method) or RunConfig(method=method, method_config=method_config or {}).default_lr()


def _analysed_configs() -> list[RunConfig]:
    return [config(t, m, s, n, seed) for t in TASKS for m in SIZES for s in SIZES[m][1] for n in N_SHOTS
            for seed in STUDY_SEEDS]


# The configurations the composition finding pairs on captions (prompt tuning at its four lengths
# against the layer configuration nearest in trainable parameters, :func:`composition`; prefix tuning
# has no partner within MATCH_RATIO). A test checks that these are the pairs the bundle matches.
CLAIM_TASK = "shapes-caption"
CLAIM_CONFIGS = (("prompt", 2), ("prompt", 8), ("prompt", 32), ("prompt", 128), ("parallel", 2), ("lora", 4))


def claim_configs() -> list[RunConfig]:
    """The composition pairs' configurations on captions at the seeds beyond :data:`STUDY_SEEDS`
    (:data:`CLAIM_SEEDS`), the cheapest N first so that a partial bundle has whole N."""
    return [config(CLAIM_TASK, m, s, n, seed) for n in N_SHOTS for seed in CLAIM_SEEDS if seed not in STUDY_SEEDS
            for m, s in CLAIM_CONFIGS]


def empirical_configs() -> list[RunConfig]:
    """The grid the analyses read, then :func:`retrain_configs` and :func:`claim_configs`."""
    return _analysed_configs() + retrain_configs() + claim_configs()


def retrain_configs() -> list[RunConfig]:
    """The runs of a method held at :data:`SHARED_LR`, at the method's current default instead: the
    re-training that lifts the pin (cheapest N first, so a partial bundle has them). The analyses do
    not read them until the pin is lifted; they are in the grid so that they resume and are exported
    across sittings."""
    return sorted((c.replace(lr=None) for c in _analysed_configs() if c.method in SHARED_LR),
                  key=lambda c: c.n_shots)


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
    resolved ``lr`` and ``default_lr`` (whether it is the lr the study's runs of the method share:
    the method's default, or :data:`SHARED_LR`)."""
    from ..train import RunConfig, RunStore, load_results

    df = load_results(store if isinstance(store, RunStore) else RunStore(store))
    if df.empty:
        return df
    df = df[df["method"].isin(list(SIZES)) & df["task"].apply(lambda t: _kind_or_none(t) in _KIND_CONSISTENT)]
    # The resolved lr, and whether it is the method's default (an explicit lr equal to the default is
    # the same run: the hash resolves lr).
    raw = (np.array([np.nan if v is None else v for v in df["lr"]], dtype=float) if "lr" in df.columns
           else np.full(len(df), np.nan))
    # (lr None is the method's current default, which need not be the study's shared lr: SHARED_LR)
    default = np.array([RunConfig(method=m, method_config=mc or {}).default_lr()
                        for m, mc in zip(df["method"], df["method_config"])], dtype=float)
    unpinned = ~df["method"].isin(list(SHARED_LR)).to_numpy(bool)
    shared = np.where(unpinned, default, df["method"].map(SHARED_LR).to_numpy(dtype=float, na_value=np.nan))
    lr = np.where(np.isfinite(raw), raw, default)
    df = df.assign(lr=lr, default_lr=(~np.isfinite(raw) & unpinned) | np.isclose(lr, shared, rtol=1e-9, atol=0),
                   retrain=~np.isfinite(raw) & ~unpinned)  # a retrain_configs() run
    if default_lr_only:
        df = df[df["default_lr"].to_numpy(bool)]
    df = df.assign(size=[size_of(m, mc or {}) for m, mc in zip(df["method"], df["method_config"])],
                   composition=df["method"].map(COMPOSITION))
    # (a bool array: an empty list would select no columns instead of no rows)
    return df[np.array([size in SIZES[m][1] for m, size in zip(df["method"], df["size"])], dtype=bool)]


def _grid(store):
    """:func:`_results` at :data:`STUDY_SEEDS`: the runs the grid's analyses read (the table, the
    trends, the slopes, the size optima), the same seeds in every cell. The composition pairs' extra
    seeds (:func:`claim_configs`) enter :func:`composition` alone."""
    df = _results(store)
    return df[df["seed"].isin(STUDY_SEEDS)] if len(df) else df


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

    df = _grid(store)
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


def spearman_interval(x, y, rng=None, n_boot: int = 500, strata=None) -> tuple[float, float, float]:
    """Spearman's rank correlation of ``y`` with ``x`` and a bootstrap 95 % interval over the pairs
    (``n_boot`` resamples drawn from ``rng``; resamples with one distinct ``x`` are skipped). Without
    ``rng`` a fresh generator seeded 0 is used, so an interval depends on its own pairs alone.

    With ``strata`` (one label per pair), the statistic is the mean of the correlations within each
    stratum (those with two distinct ``x`` or more and a ``y`` that varies), and the bootstrap
    resamples within each stratum (a resample in which a stratum loses its correlation is skipped):
    a trend in ``x`` is then read holding the stratum fixed, so another factor that varies across
    strata (N, when the trend is in size) neither adds to it nor hides it."""
    from scipy import stats

    rng = np.random.default_rng(0) if rng is None else rng
    x, y = np.asarray(x, float), np.asarray(y, float)
    groups = [np.arange(len(x))] if strata is None else \
        [np.flatnonzero(np.asarray(strata) == v) for v in dict.fromkeys(np.asarray(strata).tolist())]

    def statistic(parts):
        # (a stratum, or a resample of one, with a single x or a constant y has no correlation)
        rhos = [stats.spearmanr(x[i], y[i]).statistic for i in parts
                if len(np.unique(x[i])) > 1 and len(np.unique(y[i])) > 1]
        return (float(np.mean(rhos)) if rhos else np.nan), len(rhos)

    rho, counted = statistic(groups)
    boot = []
    for _ in range(n_boot):
        b, k = statistic([g[rng.integers(0, len(g), len(g))] for g in groups])
        if k == counted and np.isfinite(b):  # a resample that lost a stratum would average others
            boot.append(b)
    lo, hi = np.quantile(boot, [0.025, 0.975]) if boot else (np.nan, np.nan)
    return float(rho), float(lo), float(hi)


def monotonicity(store):
    """Per task and method: Spearman's rank correlation of the score with log N holding the size
    fixed, and with log size holding N fixed (the mean of the correlations within each size, or
    each N), with a bootstrap 95 % interval that resamples runs within each of them. The paper: on
    the inconsistent task, performance rises with both. The bootstrap treats runs as independent,
    though a seed's runs at different N share training examples (:func:`data_slope` fits per seed
    for that reason); with 3 seeds per cell a seed-level resample would have too few distinct draws.
    Each interval has its own generator and takes the runs in hash order, so it depends on its
    group's runs alone (not on other groups, nor on the order a store or a bundle lists them)."""
    import pandas as pd

    cols = ["task", "consistent", "method", "axis", "spearman", "ci_low", "ci_high", "runs"]
    df = _grid(store)
    rows = []
    if df.empty:
        return pd.DataFrame(rows, columns=cols)
    if "run" in df.columns:
        df = df.sort_values("run", kind="stable")
    for (task, method), part in df.groupby(["task", "method"]):
        for axis, held in (("n_shots", "size"), ("size", "n_shots")):
            x, y = np.log(part[axis].to_numpy(float)), part["test_acc"].to_numpy(float)
            if part.groupby(held)[axis].nunique().max() < 2:
                continue
            rho, lo, hi = spearman_interval(x, y, strata=part[held].to_numpy())
            rows.append({"task": task, "consistent": consistent(task), "method": method, "axis": axis,
                         "spearman": rho, "ci_low": lo, "ci_high": hi, "runs": len(x)})
    return pd.DataFrame(rows, columns=cols)


def data_slope(store):
    """Per task, method and size: the slope of the score against log10 N (score units per tenfold
    data) with its 95 % interval. The slope is fitted per seed (a seed's runs at different N share
    their training examples: the smaller split is a prefix of the larger), and the interval is the
    t-interval over the seeds' slopes. The paper: on the consistent task data size stops mattering
    (a slope near 0), on the inconsistent one it keeps paying."""
    import pandas as pd

    cols = ["task", "consistent", "method", "size", "slope_per_decade", "ci_low", "ci_high", "seeds", "runs"]
    df = _grid(store)
    rows = []
    if df.empty:
        return pd.DataFrame(rows, columns=cols)
    for (task, method, size), part in df.groupby(["task", "method", "size"]):
        slopes = [np.polyfit(np.log10(g["n_shots"].to_numpy(float)), g["test_acc"].to_numpy(float), 1)[0]
                  for _, g in part.groupby("seed") if g["n_shots"].nunique() > 1]
        b, lo, hi, k = t_interval(slopes)
        rows.append({"task": task, "consistent": consistent(task), "method": method, "size": size,
                     "slope_per_decade": b, "ci_low": lo, "ci_high": hi, "seeds": k, "runs": len(part)})
    return pd.DataFrame(rows, columns=cols)


def size_optimum(store):
    """Per task, method and N: the best size, picked by the mean **dev** score (so that picking it
    and testing it are not done on the same numbers), and its test score paired over seeds against
    both ends of the method's sizes (the difference and its 95 % t-interval), over the seeds every
    size has. A cell needs every one of the method's sizes (an end still missing would make a pick
    look interior) on two common seeds or more; a cell without them has no row yet.

    ``significant_interior``: the pick is interior and beats both ends; ``end_beats_interior``: the
    pick is an end and beats every interior size (each paired over seeds). The paper: on the
    consistent task an interior size is best."""
    import pandas as pd

    df = _grid(store)
    rows = []
    if df.empty:
        return pd.DataFrame(rows)
    for (task, method, n), part in df.groupby(["task", "method", "n_shots"]):
        sizes = list(SIZES[method][1])
        test = part.pivot_table(index="seed", columns="size", values="test_acc").reindex(columns=sizes)
        dev = part.pivot_table(index="seed", columns="size", values="dev_best").reindex_like(test)
        seeds = test.index[test.notna().all(axis=1) & dev.notna().all(axis=1)]
        if len(seeds) < 2:
            continue
        test, dev = test.loc[seeds], dev.loc[seeds]
        best = dev.mean().idxmax()
        row = {"task": task, "consistent": consistent(task), "method": method, "n_shots": n, "best_size": best,
               "interior": sizes[0] < best < sizes[-1], "seeds": len(seeds)}
        # the pick against every size, paired over seeds: (mean, low, high, n); against itself 0, no interval
        vs = {size: t_interval((test[best] - test[size]).to_numpy()) if size != best else (0.0, np.nan, np.nan, 0)
              for size in sizes}
        for end, name in ((sizes[0], "smallest"), (sizes[-1], "largest")):
            row.update({f"vs_{name}": vs[end][0], f"vs_{name}_ci_low": vs[end][1], f"vs_{name}_ci_high": vs[end][2]})
        row["significant_interior"] = bool(row["interior"] and vs[sizes[0]][1] > 0 and vs[sizes[-1]][1] > 0)
        row["end_beats_interior"] = bool(not row["interior"] and all(vs[s][1] > 0 for s in sizes[1:-1]))
        rows.append(row)
    return pd.DataFrame(rows)


# Layer and embedding configurations count as matched when their trainable counts are within this
# factor of each other.
MATCH_RATIO = 2.0


def _matches(df, max_ratio: float):
    """The trainable count per (method, size) and, per embedding configuration, the layer
    configurations within ``max_ratio`` of it, nearest (on a log scale) first."""
    params = df.groupby(["method", "size"])["trainable"].first()
    layer = [k for k in params.index if COMPOSITION[k[0]] == "layer"]
    near = {emb: sorted((k for k in layer if abs(np.log(params[k] / params[emb])) <= np.log(max_ratio)),
                        key=lambda k: abs(np.log(params[k] / params[emb])))
            for emb in params.index if COMPOSITION[emb[0]] == "embedding"}
    return params, near


def composition(store, max_ratio: float = MATCH_RATIO):
    """Layer against embedding composition at about equal parameters: for each task, N and embedding
    configuration (prompt or prefix at a size), the layer configuration (LoRA or an adapter at a size)
    whose trainable count is nearest on a log scale among those with runs there and within
    ``max_ratio`` of it, paired over seeds: the mean difference (layer - embedding), its 95 %
    interval, and the two counts. An embedding configuration with no layer configuration within
    ``max_ratio`` has no row (:func:`unmatched`). The paper: layer composition wins."""
    import pandas as pd

    df = _results(store)
    rows = []
    if df.empty:
        return pd.DataFrame(rows)
    params, matches = _matches(df, max_ratio)
    for (task, n), part in df.groupby(["task", "n_shots"]):
        for emb, near in matches.items():
            b = part[(part["method"] == emb[0]) & (part["size"] == emb[1])].set_index("seed")["test_acc"]
            for layer in near:  # the nearest that has runs on common seeds here
                a = part[(part["method"] == layer[0]) & (part["size"] == layer[1])].set_index("seed")["test_acc"]
                common = a.index.intersection(b.index)
                if len(common):
                    break
            else:
                continue
            d = (a[common] - b[common])
            m, lo, hi, k = t_interval(d.to_numpy())
            rows.append({"task": task, "consistent": consistent(task), "n_shots": n,
                         "embedding": f"{emb[0]} {emb[1]}", "layer": f"{layer[0]} {layer[1]}",
                         "embedding_params": int(params[emb]), "layer_params": int(params[layer]),
                         "layer_minus_embedding": m, "ci_low": lo, "ci_high": hi, "seeds": k,
                         "by_seed": {int(s): float(v) for s, v in d.items()}})
    return pd.DataFrame(rows)


def unmatched(store, max_ratio: float = MATCH_RATIO) -> dict:
    """The embedding configurations with no layer configuration within ``max_ratio`` trainable
    parameters of theirs, ``{"prefix 2": 1393536, ...}`` (prefix tuning's reparameterisation MLP
    puts its 1.4M trainable parameters far above the largest layer configuration here)."""
    df = _results(store)
    if df.empty:
        return {}
    params, matches = _matches(df, max_ratio)
    return {f"{m} {s}": int(params[(m, s)]) for (m, s), near in matches.items() if not near}


def composition_effect(store, max_ratio: float = MATCH_RATIO, seeds=None):
    """The layer-composition finding tested once per task and embedding method, not once per pair
    (69 pairs with 3 seeds each would call some difference significant by chance): per seed, the mean
    of the matched pairs' differences (layer - embedding) over every N and size, and the 95 %
    t-interval over seeds. The seeds are those most pairs have (``seeds``: these instead, e.g.
    :data:`STUDY_SEEDS` for the three-seed reading), and only pairs with all of them enter, so each
    seed averages the same pairs."""
    from collections import Counter

    import pandas as pd

    comp = composition(store, max_ratio)
    cols = ["task", "consistent", "embedding_method", "layer_minus_embedding", "ci_low", "ci_high", "pairs",
            "seeds"]
    rows = []
    if comp.empty:
        return pd.DataFrame(rows, columns=cols)
    comp = comp.assign(embedding_method=comp["embedding"].str.split().str[0])
    for (task, method), part in comp.groupby(["task", "embedding_method"], sort=False):
        # the seed set most pairs have (a partial bundle's or a stray seed's pairs do not shrink it)
        common = sorted(seeds) if seeds is not None else \
            sorted(Counter(frozenset(d) for d in part["by_seed"]).most_common(1)[0][0])
        full = [d for d in part["by_seed"] if set(common) <= set(d)]
        m, lo, hi, k = t_interval([np.mean([d[s] for d in full]) for s in common] if full else [])
        rows.append({"task": task, "consistent": consistent(task), "embedding_method": method,
                     "layer_minus_embedding": m, "ci_low": lo, "ci_high": hi, "pairs": len(full), "seeds": k})
    return pd.DataFrame(rows, columns=cols)


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
    df = df[(df["seed"] == 13) & ~df["retrain"].to_numpy(bool)]
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

    - inconsistent task (shapes-vqa): the score rises with N holding the size fixed, and with
      parameter size holding N fixed (:func:`monotonicity`; reproduced for a method when the
      bootstrap interval is above 0);
    - consistent task (shapes-caption): data size stops mattering (reproduced where the 95 % interval
      of the slope per tenfold N lies within +- ``FLAT_MARGIN`` of the mean score; not reproduced
      where it lies wholly above or below that band);
    - consistent task: an interior parameter size is best (reproduced in a cell when the dev-picked
      size is interior and beats both ends on test, paired over seeds; not reproduced when it is an
      end and beats every interior size);
    - layer composition beats embedding composition at about equal parameters (within
      ``MATCH_RATIO``): tested once per task and embedding method over its matched pairs
      (:func:`composition_effect`), the pairs' own intervals counted beside it.

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
        held = "each size" if axis == "n_shots" else "each N"
        rows.append({"finding": finding,
                     "paper": "yes (finding 1: on a task not consistent with pre-training, more data and more "
                              "parameters help)",
                     "workbench": f"Spearman with log {'N' if axis == 'n_shots' else 'size'} within {held}: "
                                  f"{text or 'no runs yet'}",
                     "verdict": overall(verdict(r.ci_low, r.ci_high) for r in part.itertuples()) if len(part)
                     else "inconclusive"})
    slope = data_slope(store)
    means = _grid(store).groupby(["task", "method", "size"])["test_acc"].mean() if len(slope) else None
    part = slope[slope["consistent"]] if len(slope) else slope
    vs, texts = [], []
    for r in part.itertuples():
        m = FLAT_MARGIN * abs(means.get((r.task, r.method, r.size), np.nan))
        if not (np.isfinite(r.ci_low) and np.isfinite(m)):
            vs.append("inconclusive")
        elif -m <= r.ci_low and r.ci_high <= m:
            vs.append("reproduced")
        elif r.ci_low > m or r.ci_high < -m:
            vs.append("not reproduced")
        else:
            vs.append("inconclusive")
        if np.isfinite(r.ci_low):
            texts.append(f"{r.method} {r.size}: {r.slope_per_decade:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]")
    counts = ", ".join(f"{sum(v == k for v in vs)} {k}" for k in ("reproduced", "not reproduced", "inconclusive")
                       if any(v == k for v in vs))
    rows.append({"finding": "on the consistent task data size stops mattering",
                 "paper": "yes (finding 2: on a task consistent with pre-training, data size barely matters)",
                 "workbench": (f"slope per tenfold N, fitted per seed, its interval over seeds (flat: within "
                               f"+-{FLAT_MARGIN:.0%} of the mean score), {sum(v == 'reproduced' for v in vs)} of "
                               f"{len(vs)} flat ({counts}): " + "; ".join(texts[:6])
                               + ("; ..." if len(texts) > 6 else "")) if texts
                 else "no slope yet (it needs runs at two N or more)" if vs else "no runs yet",
                 "verdict": overall(vs) if vs else "inconclusive"})
    opt = size_optimum(store)
    part = opt[opt["consistent"]] if len(opt) else opt
    vs = ["reproduced" if r.significant_interior else "not reproduced" if r.end_beats_interior else "inconclusive"
          for r in part.itertuples()]
    rows.append({"finding": "on the consistent task an interior parameter size is best",
                 "paper": "yes (finding 2: an optimal, not the largest, parameter size)",
                 "workbench": (f"size picked by dev, tested on test: {sum(v == 'reproduced' for v in vs)} of "
                               f"{len(vs)} (method, N) cells have a significant interior optimum, "
                               f"{sum(v == 'not reproduced' for v in vs)} an end significantly better than every "
                               "interior size") if vs else "no runs yet",
                 "verdict": overall(vs) if vs else "inconclusive"})
    comp, effect, alone = composition(store), composition_effect(store), unmatched(store)
    texts = []
    for task, part in (effect.groupby("task", sort=False) if len(effect) else ()):
        pairs = comp[comp["task"] == task]
        texts.append(f"{task}: " + ", ".join(
            f"vs {r.embedding_method} {r.layer_minus_embedding:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}] "
            f"over {r.pairs} pairs x {r.seeds} seeds" for r in part.itertuples())
            + f" (pair by pair: {sum(r.ci_low > 0 for r in pairs.itertuples())} of {len(pairs)} better, "
              f"{sum(r.ci_high < 0 for r in pairs.itertuples())} worse)")
    if alone:
        texts.append(f"no layer configuration within {MATCH_RATIO:g}x the parameters of "
                     + ", ".join(f"{k} ({v / 1e6:.2f}M)" for k, v in alone.items()) + ": not compared")
    rows.append({"finding": "layer composition (LoRA, adapters) beats embedding composition (prompt, prefix) "
                            "at equal parameters",
                 "paper": "yes (finding 3: layer composition beats embedding composition)",
                 "workbench": "; ".join(texts) if texts else "no runs yet",
                 "verdict": overall(verdict(r.ci_low, r.ci_high) for r in effect.itertuples()) if len(effect)
                 else "inconclusive"})
    return pd.DataFrame(rows, columns=["finding", "paper", "workbench", "verdict"])


STUDY = register_study(Study(
    NAME,
    "Data size x parameter size for prompt, prefix, LoRA, serial and parallel adapters on a task consistent "
    "with pre-training (shapes-caption) and one that is not (shapes-vqa): 5 methods x 4 sizes x 5 N x 2 tasks "
    "x 3 seeds; the caption configurations the composition test pairs on 5 seeds.",
    grids=empirical_configs,
    keep_weights=keep_weights,
    analyses={"grid_table": grid_table, "monotonicity": monotonicity, "data_slope": data_slope,
              "size_optimum": size_optimum, "composition": composition, "composition_effect": composition_effect,
              "representation_shift": representation_shift, "verdicts": verdicts},
))
