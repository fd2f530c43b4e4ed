"""The MixPHM study (Jiang & Zheng, CVPR 2023): the low-resource table, its ablations, the
redundancy analysis of section 3.1 and what MixPHM's routing statistics mean, on shapes-vqa.

Grids (all at the protocol's and the methods' defaults unless an ablation says otherwise):

- **table** (the paper's Table 1): full fine-tuning, BitFit, LoRA, Houlsby, Pfeiffer, Compacter,
  AdaMix and MixPHM at N in {16, 32, 64, 100, 500, 1000} x the protocol's five seeds (240 runs;
  the gallery study's runs at N = 16, 64, 1000 and seeds 13, 21, 42 are the same runs).
- **ablations** of MixPHM at N = 64 over the same five seeds (one axis at a time, the rest official):
  experts {1, 2, 4, 8}, PHM rank {1, 4, 8, 16}, the projection the experts share {down, up,
  none}, the regularisers {none, redundancy only, MI only, both} and their common weight
  {0.05, 0.2, 0.5, 1.0}. The inference merge needs no training: :func:`merges` evaluates the
  trained default runs with each route.

The bundle keeps the method weights the analyses load: every table method but full fine-tuning at
N = 64 and seed 13 (the redundancy analysis), and MixPHM with and without its regularisers at
N = 64 on the five seeds (the regulariser comparison, the merges, the experts' similarity).

    python -m workbench.studies run mixphm --executor processes --workers 2 --threads 1
    python -m workbench.studies export mixphm
"""

from __future__ import annotations

import numpy as np
import torch

from ..data import SEEDS
from ..train import RunConfig, grid
from ._common import as_store, overall, t_interval, verdict
from .study import Study, register_study

NAME = "mixphm"
TASK = "shapes-vqa"
TABLE_METHODS = ("full", "bitfit", "lora", "houlsby", "pfeiffer", "compacter", "adamix", "mixphm")
PEFT_METHODS = TABLE_METHODS[1:]
TABLE_N = (16, 32, 64, 100, 500, 1000)
TABLE_SEEDS = tuple(SEEDS)  # 13, 21, 42, 87, 100
ABLATION_N = 64
ABLATION_SEEDS = tuple(SEEDS)  # the table's five (on three, every ablation claim was inconclusive)
# One axis at a time; the first value of each is the official setting (the table's run).
ABLATIONS = {
    "num_experts": [4, 1, 2, 8],
    "rank": [8, 1, 4, 16],
    "shared_side": ["down", "up", "none"],
    "regularisers": ["both", "none", "redundancy", "mi"],
    "reg_weight": [0.2, 0.05, 0.5, 1.0],
}
_REGULARISERS = {"both": (0.2, 0.2), "none": (0.0, 0.0), "redundancy": (0.2, 0.0), "mi": (0.0, 0.2)}
# The inference routes of merges(): the official soup, the product soup, the outputs' mean, one expert.
ROUTES = ("official soup", "product soup", "output average", "expert 0", "expert 1", "expert 2", "expert 3")
# Sub-layer methods of the table (the redundancy analysis reads their modules); LoRA sits on projections.
SUBLAYER_METHODS = ("houlsby", "pfeiffer", "compacter", "adamix", "mixphm")


def base_config() -> RunConfig:
    """The study's base: shapes-vqa at the protocol's and the methods' defaults."""
    return RunConfig(task=TASK, quiet=True)


def table_configs() -> list[RunConfig]:
    """The paper's Table 1 grid: 8 methods x 6 N x 5 seeds."""
    return grid(base_config(), method=list(TABLE_METHODS), n_shots=list(TABLE_N), seed=list(TABLE_SEEDS))


def ablation_config(axis: str, value, seed: int = 13, n_shots: int = ABLATION_N) -> RunConfig:
    """MixPHM with one ablation axis set (``ABLATIONS``' names; the official value gives the table's run)."""
    if axis not in ABLATIONS:
        raise ValueError(f"unknown ablation axis {axis!r}; the axes are {', '.join(ABLATIONS)}")
    mc: dict = {}
    if axis == "regularisers":
        if value not in _REGULARISERS:
            raise ValueError(f"regularisers must be one of {tuple(_REGULARISERS)}, got {value!r}")
        w_red, w_mi = _REGULARISERS[value]
        if (w_red, w_mi) != (0.2, 0.2):
            mc = {"w_red": w_red, "w_mi": w_mi}
    elif axis == "reg_weight":
        if value != 0.2:
            mc = {"w_red": float(value), "w_mi": float(value)}
    elif value != ABLATIONS[axis][0]:
        mc = {axis: value}
    return base_config().replace(method="mixphm", n_shots=n_shots, seed=seed, method_config=mc)


def ablation_configs() -> list[RunConfig]:
    return [ablation_config(axis, v, seed) for axis, values in ABLATIONS.items() for v in values
            for seed in ABLATION_SEEDS]


def mixphm_configs() -> list:
    return [table_configs(), ablation_configs()]


def _no_regularisers(cfg: RunConfig) -> bool:
    return cfg.method_config == {"w_red": 0.0, "w_mi": 0.0}


def keep_weights(cfg: RunConfig) -> bool:
    """N = 64: seed 13 of every table method but full fine-tuning and of every ablation setting;
    MixPHM with and without its regularisers on the ablation seeds."""
    if cfg.n_shots != ABLATION_N:
        return False
    if cfg.method == "mixphm" and (not cfg.method_config or _no_regularisers(cfg)):
        return cfg.seed in ABLATION_SEEDS
    if cfg.method == "mixphm":
        return cfg.seed == 13
    return cfg.seed == 13 and cfg.method in TABLE_METHODS and cfg.method != "full" and not cfg.method_config


def keep_predictions(cfg: RunConfig) -> bool:
    """Test predictions of the table's runs at N = 64, seed 13 (the answers a reader may inspect)."""
    return cfg.n_shots == ABLATION_N and cfg.seed == 13 and not cfg.method_config


# ------------------------------------------------------------------------------------------- analyses
def _results(store):
    from ..train import load_results

    return load_results(store)





def _table_rows(df):
    """The rows of the table grid (default method configs, the table's methods and N)."""
    mc = df["method_config"] if "method_config" in df else None
    plain = mc.apply(lambda v: not v) if mc is not None else True
    return df[df["method"].isin(TABLE_METHODS) & df["n_shots"].isin(TABLE_N) & plain]


def table(store):
    """Test accuracy per method and N over the seeds (mean, std, n, 95 % interval) with trainable %,
    one row per (method, N), methods in the paper's order."""
    import pandas as pd

    from ..train import summarize

    df = _table_rows(_results(store))
    if df.empty:
        return df
    out = summarize(df, by=("method", "n_shots"))
    pct = df.groupby("method")["trainable_pct"].first()
    out["trainable_pct"] = out["method"].map(pct)
    out["method"] = pd.Categorical(out["method"], TABLE_METHODS, ordered=True)
    return out.sort_values(["method", "n_shots"]).reset_index(drop=True)


def versus(store):
    """MixPHM against full fine-tuning and against the best other PEFT method at each N (paired over
    seeds: mean difference, 95 % interval, p). The best other method is chosen by its mean at that N,
    which favours it (a winner's curse the interval does not include)."""
    import pandas as pd

    from ..train import compare

    df = _table_rows(_results(store))
    rows = []
    for n in sorted(df["n_shots"].unique()):
        at = df[df["n_shots"] == n]
        means = at.groupby("method")["test_acc"].mean()
        others = [m for m in PEFT_METHODS if m != "mixphm" and m in means]
        if "mixphm" not in means:
            continue
        rivals = [("full fine-tuning", "full")] if "full" in means else []
        if others:
            best = max(others, key=lambda m: means[m])
            rivals.append((f"best other PEFT ({best})", best))
        for label, rival in rivals:
            c = compare(at, "mixphm", rival)
            if c.empty:
                continue
            r = c.iloc[0]
            rows.append({"n_shots": int(n), "against": label, "n": int(r["n"]), "mean_diff": r["mean_diff"],
                         "ci_low": r["ci_low"], "ci_high": r["ci_high"], "p": r["p"]})
    return pd.DataFrame(rows, columns=["n_shots", "against", "n", "mean_diff", "ci_low", "ci_high", "p"])


def _ablation_label(cfg_mc: dict) -> tuple[str, object]:
    """(axis, value) of an ablation run's method_config ({} is the official run)."""
    if not cfg_mc:
        return "official", "official"
    if set(cfg_mc) == {"w_red", "w_mi"}:
        w = (cfg_mc["w_red"], cfg_mc["w_mi"])
        for name, pair in _REGULARISERS.items():
            if w == pair:
                return "regularisers", name
        if w[0] == w[1]:
            return "reg_weight", w[0]
    if len(cfg_mc) == 1:
        (axis, value), = cfg_mc.items()
        return axis, value
    return ", ".join(cfg_mc), ", ".join(str(v) for v in cfg_mc.values())  # not one of the study's axes


def _ablation_runs(store):
    """MixPHM's runs at the ablation N and seeds (the official setting and every ablation)."""
    df = _results(store)
    if df.empty:
        return df
    return df[(df["method"] == "mixphm") & (df["n_shots"] == ABLATION_N) & df["seed"].isin(ABLATION_SEEDS)]


def _experts_accuracy(store) -> dict:
    """Test accuracy by seed (a Series) for each number of experts of the ablation (4 is official)."""
    df = _ablation_runs(store)
    if df.empty:
        return {}
    labels = df["method_config"].apply(lambda mc: _ablation_label(mc or {}))
    official = ABLATIONS["num_experts"][0]
    out = {}
    for k in ABLATIONS["num_experts"]:
        want = ("official", "official") if k == official else ("num_experts", k)
        sel = labels.apply(lambda lv, w=want: lv == w)
        if sel.any():
            out[k] = df[sel].set_index("seed")["test_acc"]
    return out


def ablations(store):
    """Accuracy of each ablation setting (mean, std, n, 95 % interval over the ablation seeds) and its
    paired difference from the official setting. One row per (axis, value); the official setting
    appears under every axis as its first value."""
    import pandas as pd

    from ..train import summarize

    df = _ablation_runs(store)
    if df.empty:
        return pd.DataFrame()
    labels = df["method_config"].apply(lambda mc: _ablation_label(mc or {}))
    official = df[labels.apply(lambda lv: lv[0] == "official")].set_index("seed")["test_acc"]
    rows = []
    for axis, values in ABLATIONS.items():
        for i, value in enumerate(values):
            sel = labels.apply(lambda lv, a=axis, v=value: lv == (a, v)) if i else \
                labels.apply(lambda lv: lv[0] == "official")
            part = df[sel]
            if part.empty:
                continue
            s = summarize(part.assign(axis=axis), by="axis").iloc[0]
            acc = part.set_index("seed")["test_acc"]
            common = acc.index.intersection(official.index)
            diff = (acc[common] - official[common]).to_numpy()
            rows.append({"axis": axis, "value": value, "official": i == 0, "mean": s["mean"], "std": s["std"],
                         "n": int(s["n"]), "ci_low": s["ci_low"], "ci_high": s["ci_high"],
                         "diff_vs_official": float(diff.mean()) if i and len(diff) else 0.0})
    return pd.DataFrame(rows)


def _weighted_runs(store, method: str, seeds=(13,), method_config=None):
    """Stored runs of ``method`` at N = 64 that hold method weights, seed order."""
    from ..train import load_run

    store = as_store(store)
    out = []
    df = _results(store)
    mc = method_config or {}
    sel = df[(df["method"] == method) & (df["n_shots"] == ABLATION_N) & df["seed"].isin(seeds)
             & df["method_config"].apply(lambda v: (v or {}) == mc)]
    for _, row in sel.sort_values("seed").iterrows():
        path = store.locate(row["run"])
        if path is not None and (path / "method.safetensors").is_file():
            out.append(load_run(row["run"], store))
    return out


def redundancy(store, methods=SUBLAYER_METHODS, states=("init", "trained"), max_samples: int = 256,
               n_perm: int = 200, n_boot: int = 200, seed: int = 0, mi: bool = True, progress: bool = False,
               seeds=(13,)):
    """Section 3.1 of the paper on the embedded world, per layer: RSA / CKA / MI of each module's
    contribution u = Delta(f) with the frozen sub-layer output f ("pretrained") and with its stack's
    final representation ("task"), before and after training, with permutation null bands and
    bootstrap intervals (:func:`~workbench.studies.redundancy_analysis`). Reads the N = 64, seed 13
    runs' weights from ``store`` (and MixPHM without its regularisers as ``"mixphm (no reg.)"``;
    ``seeds`` adds other seeds where the bundle keeps weights, i.e. for the two MixPHM variants),
    on the first ``max_samples`` test questions. A method whose initial contribution is zero (an
    adapter with ``init="zero_up"``) has NaN before training, by construction; the official inits
    (torch's default Linear, MixPHM's Glorot PHM layers) are measurable."""
    import pandas as pd
    from tqdm.auto import tqdm

    from ..train import restore_run
    from .redundancy import redundancy_analysis

    jobs = []
    for method in methods:
        for res in _weighted_runs(store, method, seeds=seeds):
            jobs.append((method, res))
        if method == "mixphm":
            for res in _weighted_runs(store, "mixphm", seeds=seeds, method_config={"w_red": 0.0, "w_mi": 0.0}):
                jobs.append(("mixphm (no reg.)", res))
    frames = []
    for label, res in tqdm(jobs, desc="redundancy", disable=not progress):
        for state in states:
            r = restore_run(res, store=store, weights=state)
            data = r.batches("test", max_samples=max_samples)
            df = redundancy_analysis(r.model, data, mi=mi, max_samples=max_samples, n_perm=n_perm, n_boot=n_boot,
                                     seed=seed)
            df.insert(0, "state", state)
            df.insert(1, "seed", res.config.seed)
            df["method"] = label
            frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def ablation_redundancy(store, max_samples: int = 256, seed: int = 13):
    """What each ablation setting does to redundancy and task correlation: the mean over modules of
    RSA and CKA of u with f ("pretrained") and with g ("task"), per stack, for the seed-13 run of every
    ablation setting (no resampling: one number per setting, read beside its accuracy)."""
    import pandas as pd

    from ..train import load_run, restore_run
    from .redundancy import redundancy_analysis

    store = as_store(store)
    df = _results(store)
    df = df[(df["method"] == "mixphm") & (df["n_shots"] == ABLATION_N) & (df["seed"] == seed)]
    rows = []
    for _, row in df.iterrows():
        path = store.locate(row["run"])
        if path is None or not (path / "method.safetensors").is_file():
            continue
        axis, value = _ablation_label(row["method_config"] or {})
        r = restore_run(load_run(row["run"], store), store=store)
        red = redundancy_analysis(r.model, r.batches("test", max_samples=max_samples), max_samples=max_samples)
        means = red.groupby(["stack", "measure", "target"])["value"].mean()
        for (stack, measure, target), v in means.items():
            rows.append({"axis": axis, "value": value, "stack": stack, "measure": measure, "target": target,
                         "mean": float(v), "test_acc": row["test_acc"]})
    return pd.DataFrame(rows, columns=["axis", "value", "stack", "measure", "target", "mean", "test_acc"])


def merges(store, seeds=ABLATION_SEEDS, routes=ROUTES):
    """Test accuracy of the trained default MixPHM runs (N = 64) under each inference route: the
    official soup (average S, T, b), the product soup (average S T), the average of the experts'
    outputs, and each expert alone. One row per (seed, route)."""
    import pandas as pd

    from ..train import restore_run

    rows = []
    for res in _weighted_runs(store, "mixphm", seeds=seeds):
        r = restore_run(res, store=store)
        for route in routes:
            for mod in r.handle.modules.values():
                mod.merge_mode = "product" if route == "product soup" else "official"
            r.handle.inference(int(route.split()[1]) if route.startswith("expert") else
                               ("outputs" if route == "output average" else "soup"))
            rows.append({"seed": res.config.seed, "route": route, "test_acc": r.score("test")["overall"],
                         "stored": res.metrics["test"]["overall"] if route == "official soup" else np.nan})
    return pd.DataFrame(rows, columns=["seed", "route", "test_acc", "stored"])


def experts(store, seed: int = 13, max_samples: int = 256):
    """How alike MixPHM's experts are, per module, in the trained default run (N = 64, ``seed``).

    Each expert's contribution Delta_k is read with the model routed to expert k everywhere
    (``handle.inference(k)``), the soup's with the official merge, mean-pooled per test question.
    Columns: ``cka_between`` (mean linear CKA between two experts' outputs), ``weight_distance``
    (mean distance between two experts' Up weights S, T, b, relative to their mean norm),
    ``soup_gap`` (mean ||Delta_soup - Delta_k|| / ||Delta_k||) and ``soup_cka`` (mean CKA of the
    soup with an expert). The official init copies one expert into all: what differs after
    training, only the random routing made differ."""
    import pandas as pd

    from ..models import capture
    from ..probes import expert_similarity
    from ..train import restore_run

    runs = _weighted_runs(store, "mixphm", seeds=(seed,))
    if not runs:
        return pd.DataFrame()
    r = restore_run(runs[0], store=store)
    data = r.batches("test", max_samples=max_samples)
    points = list(r.handle.modules)
    names = {p: f"{p}@{r.model.modifications()[p][0][0]}:delta" for p in points}
    outs = {}
    for route in list(range(r.handle.config.num_experts)) + ["soup"]:
        r.handle.inference(route)
        outs[route] = capture(r.model, list(names.values()), data=data, max_samples=max_samples, pool="mean",
                              dtype=torch.float64)
    r.handle.inference("soup")
    rows = []
    E = r.handle.config.num_experts
    off = ~np.eye(E, dtype=bool)
    for p in points:
        mod = r.handle.modules[p]
        expert_outs = [outs[k][names[p]] for k in range(E)]
        up = [t.detach() for t in ((mod.up.S, mod.up.T, mod.up.b) if getattr(mod.up, "S", None) is not None
                                   else (mod.up.W, mod.up.b)) if t is not None]
        weights = [[t[k] for t in up] for k in range(E)]
        sim = expert_similarity(expert_outs, weights=weights, merged_output=outs["soup"][names[p]])
        norms = np.mean([float(torch.cat([w.reshape(-1) for w in ws]).norm()) for ws in weights])
        rows.append({"point": p, "stack": p.split(".")[0], "cka_between": float(np.asarray(sim["cka"])[off].mean()),
                     "weight_distance": float(np.asarray(sim["weight_distance"])[off].mean() / norms),
                     "soup_gap": float(np.mean(np.asarray(sim["merged_gap"]))),
                     "soup_cka": float(np.mean(np.asarray(sim["merged_cka"])))})
    return pd.DataFrame(rows)


def verdicts(store, redundancy_rows=None):
    """The verdict table: each claim of the paper, what it reports, what the study measures (with its
    95 % interval) and reproduced / not reproduced / inconclusive, computed from the bundle (and
    from :func:`redundancy` rows when given)."""
    import pandas as pd

    rows = []
    vs = versus(store)
    for against, claim in (("full fine-tuning", "MixPHM beats full fine-tuning at every N"),
                           ("best other PEFT", "MixPHM beats every other PEFT method at every N")):
        part = vs[vs["against"].str.startswith(against)]
        if part.empty:
            rows.append({"claim": claim, "paper": "yes, on VQA v2, GQA, OK-VQA (N = 16 ... 1000, 5 seeds)",
                         "workbench": "no runs yet", "verdict": "inconclusive"})
            continue
        result = overall(verdict(r.ci_low, r.ci_high) for r in part.itertuples())
        text = "; ".join(f"N={r.n_shots}: {r.mean_diff:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}] (n={r.n})"
                         for r in part.itertuples())
        rows.append({"claim": claim, "paper": "yes, on VQA v2, GQA, OK-VQA (N = 16 ... 1000, 5 seeds)",
                     "workbench": text, "verdict": result})
    by_k = _experts_accuracy(store)
    official = ABLATIONS["num_experts"][0]
    tests = []
    for fewer, more, positive in ((1, official, True), (official, max(ABLATIONS["num_experts"]), False)):
        if fewer in by_k and more in by_k:
            common = by_k[fewer].index.intersection(by_k[more].index)
            m, lo, hi, n = t_interval((by_k[more][common] - by_k[fewer][common]).to_numpy())
            tests.append((f"{more} - {fewer} experts = {m:+.3f} [{lo:+.3f}, {hi:+.3f}] (n={n})",
                          verdict(lo, hi, positive)))
    if tests:
        means = ", ".join(f"K={k}: {by_k[k].mean():.3f}" for k in sorted(by_k))
        rows.append({"claim": "more experts help, up to a point (K = 4 beats K = 1; K = 8 does not beat K = 4)",
                     "paper": "yes (ablation of the number of experts; K = 4 is the official choice)",
                     "workbench": f"N={ABLATION_N}: " + "; ".join(t for t, _ in tests) + f" ({means})",
                     "verdict": overall(v for _, v in tests)})
    if redundancy_rows is not None and len(redundancy_rows):
        d = redundancy_rows[(redundancy_rows["state"] == "trained") & (redundancy_rows["measure"] == "rsa")]
        ad = d[d["method"].isin(["houlsby", "pfeiffer"])]
        if len(ad):
            wide = ad.pivot_table(index=["method", "seed", "point"], columns="target", values="value")
            m, lo, hi, n = t_interval(wide["pretrained"] - wide["task"])
            rows.append({"claim": "adapter outputs are more similar to the frozen output than to the task "
                                  "representation (RSA)",
                         "paper": "yes (section 3.1, VQA v2)",
                         "workbench": f"RSA(u, f) - RSA(u, final) = {m:+.2f} [{lo:+.2f}, {hi:+.2f}] over {n} modules",
                         "verdict": verdict(lo, hi)})
        pair = d[d["method"].isin(["mixphm", "mixphm (no reg.)"])]
        if pair["method"].nunique() == 2:
            wide = pair.pivot_table(index=["seed", "point", "target"], columns="method", values="value")
            for target, claim, positive in (("pretrained", "the regularisers lower redundancy with the frozen "
                                                           "output (RSA)", False),
                                            ("task", "the regularisers raise correlation with the task "
                                                     "representation (RSA)", True)):
                w = wide.xs(target, level="target")
                per_seed = (w["mixphm"] - w["mixphm (no reg.)"]).groupby(level="seed").mean()
                m, lo, hi, n = t_interval(per_seed)
                rows.append({"claim": claim, "paper": "yes (ablation of the two terms)",
                             "workbench": f"with - without = {m:+.2f} [{lo:+.2f}, {hi:+.2f}] over {n} seeds "
                                          "(mean over modules per seed)",
                             "verdict": verdict(lo, hi, positive)})
    return pd.DataFrame(rows, columns=["claim", "paper", "workbench", "verdict"])


def routing(store):
    """MixPHM's and AdaMix's expert draws over training, per module (from the runs' ``method_stats``):
    counts, the chi-square test of uniformity (:func:`~workbench.probes.routing_stats`' draw test).
    Both draw an expert uniformly at random, so uniformity is the null *by construction*: a small
    p-value would mean a broken sampler, not a preference."""
    import pandas as pd
    from scipy import stats

    df = _results(store)
    rows = []
    for _, row in df[df["method"].isin(["mixphm", "adamix"])].iterrows():
        counts = (row.get("method_stats") or {}).get("draw_counts") if isinstance(row.get("method_stats"), dict) \
            else None
        if not counts:
            continue
        for point, c in counts.items():
            c = np.asarray(c, dtype=float)
            chi2, p = stats.chisquare(c) if c.sum() > 0 else (np.nan, np.nan)
            rows.append({"method": row["method"], "n_shots": row["n_shots"], "seed": row["seed"],
                         "run": row["run"], "module": point, "draws": c.astype(int).tolist(), "total": int(c.sum()),
                         "chi2": float(chi2), "p": float(p)})
    return pd.DataFrame(rows, columns=["method", "n_shots", "seed", "run", "module", "draws", "total", "chi2", "p"])


STUDY = register_study(Study(
    NAME,
    "MixPHM's low-resource table (8 methods x N = 16 ... 1000 x 5 seeds) and its ablations at N = 64, "
    "with the redundancy analysis of its section 3.1, on shapes-vqa (vlt5-tiny).",
    grids=mixphm_configs,
    keep_weights=keep_weights,
    keep_predictions=keep_predictions,
    analyses={"table": table, "versus": versus, "ablations": ablations, "redundancy": redundancy,
              "ablation_redundancy": ablation_redundancy, "merges": merges, "routing": routing, "experts": experts, "verdicts": verdicts},
))
