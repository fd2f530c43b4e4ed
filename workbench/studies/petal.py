"""The PETAL study (arXiv 2312.12458): mode approximation, the learnable threshold, the instruction
mixture-of-experts and its routing, the information-bottleneck loss, and few-shot accuracy against
LoRA, VL-PET and full fine-tuning, on shapes-vqa (vlt5-tiny).

PETAL is the workbench's reading of the paper (``variant="paper"``: CP modes with a soft learnable
threshold, a gated instruction mixture, a score-based information bottleneck); ``variant="released"``
is what the released code computes (no threshold, experts averaged uniformly, no loss of its own).

Grids:

- **few-shot**: PETAL, LoRA, VL-PET and full fine-tuning at N in {16, 64, 1000} x the protocol's five
  seeds 13, 21, 42, 87, 100 (60 runs; those on seeds 13, 21, 42 are the gallery study's, and full
  fine-tuning's and LoRA's on 87 and 100 the MixPHM study's, by hash);
- **ablations** at N = 64, one axis at a time around the defaults (R = 64 CP modes, learnable
  threshold, K = 4 experts, M = 4 templates, IB weight 0.1): modes R {4, 16, 128} in CP and
  R {4, 16, 64} in Tucker form, the threshold frozen, no mixture (and so no bottleneck, which reads
  it), K {2, 8}, M {1, 8}, IB weight {0, 0.03, 0.3, 1.0}, and the released variant (17 settings).
  The two settings the verdict table reads (no mixture, IB weight 0) run over the five seeds, paired
  with the default's five; the others over seeds 13, 21, 42 (55 runs).

The bundle keeps the weights of every PETAL run at N = 64, seed 13 (routing and mode analyses).
Runs trained since the trainer records method statistics at every evaluation carry the mode gates
over training in their history (``history[i]["method"]``); older runs of the same config do not (run
``run(cfg, force=True)`` to retrain one: the numbers are the same, the record is richer).

    python -m workbench.studies run petal --executor processes --workers 2 --threads 1
"""

from __future__ import annotations

import numpy as np
import torch

from ..data import SEEDS
from ..train import RunConfig, grid
from ._common import as_store, has_weights, overall, t_interval, verdict
from .study import Study, register_study

NAME = "petal"
TASK = "shapes-vqa"
FEW_SHOT_METHODS = ("petal", "lora", "vlpet", "full")
FEW_SHOT_N = (16, 64, 1000)
FEW_SHOT_SEEDS = tuple(SEEDS)  # 13, 21, 42, 87, 100: the few-shot grid, as the MixPHM study's table
STUDY_SEEDS = tuple(SEEDS[:3])  # the exploratory ablations
ANALYSIS_N = 64
# One axis at a time; the first value of each is the default (the few-shot grid's run).
ABLATIONS = {
    "rank (CP)": [64, 4, 16, 128],
    "rank (Tucker)": [64, 4, 16],
    "threshold": ["learned", "frozen"],
    "mixture": ["on", "off"],
    "experts K": [4, 2, 8],
    "templates M": [4, 1, 8],
    "IB weight": [0.1, 0.0, 0.03, 0.3, 1.0],
    "variant": ["paper", "released"],
}
# The settings the verdict table reads (the mixture's and the bottleneck's claims): five seeds.
CLAIM_ABLATIONS = (("mixture", "off"), ("IB weight", 0.0))


def base_config() -> RunConfig:
    """The study's base: shapes-vqa at the protocol's and the methods' defaults."""
    return RunConfig(task=TASK, quiet=True)


def _options(axis: str, value) -> dict:
    if axis not in ABLATIONS:
        raise ValueError(f"unknown ablation axis {axis!r}; the axes are {', '.join(ABLATIONS)}")
    if value not in ABLATIONS[axis]:
        raise ValueError(f"{axis} must be one of {ABLATIONS[axis]}, got {value!r}")
    if value == ABLATIONS[axis][0] and axis != "rank (Tucker)":
        return {}
    return {
        "rank (CP)": lambda v: {"rank": v},
        "rank (Tucker)": lambda v: {"rank": v, "form": "tucker"} if v != 64 else {"form": "tucker"},
        "threshold": lambda v: {"learn_threshold": False},
        "mixture": lambda v: {"moe": False, "w_ib": 0.0},  # the bottleneck reads the mixture: off with it
        "experts K": lambda v: {"n_experts": v},
        "templates M": lambda v: {"n_templates": v},
        "IB weight": lambda v: {"w_ib": float(v)},
        "variant": lambda v: {"variant": "released"},
    }[axis](value)


def ablation_config(axis: str, value, seed: int = 13, n_shots: int = ANALYSIS_N) -> RunConfig:
    """PETAL with one ablation axis set (``ABLATIONS``' names and values)."""
    return base_config().replace(method="petal", n_shots=n_shots, seed=seed, method_config=_options(axis, value))


def few_shot_configs() -> list[RunConfig]:
    return grid(base_config(), method=list(FEW_SHOT_METHODS), n_shots=list(FEW_SHOT_N), seed=list(FEW_SHOT_SEEDS))


def ablation_seeds(axis: str, value) -> tuple[int, ...]:
    """The seeds of one ablation setting: the five of the few-shot grid for the settings a verdict
    reads (``CLAIM_ABLATIONS``, paired with the default's five runs), the first three otherwise."""
    return FEW_SHOT_SEEDS if (axis, value) in CLAIM_ABLATIONS else STUDY_SEEDS


def ablation_configs() -> list[RunConfig]:
    return [ablation_config(a, v, s) for a, values in ABLATIONS.items() for v in values for s in ablation_seeds(a, v)]


def petal_configs() -> list:
    return [few_shot_configs(), ablation_configs()]


def keep_weights(cfg: RunConfig) -> bool:
    """Every PETAL run at N = 64, seed 13."""
    return cfg.method == "petal" and cfg.n_shots == ANALYSIS_N and cfg.seed == 13


def keep_predictions(cfg: RunConfig) -> bool:
    return cfg.n_shots == ANALYSIS_N and cfg.seed == 13 and not cfg.method_config


# ------------------------------------------------------------------------------------------- analyses
def _results(store):
    from ..train import load_results

    return load_results(as_store(store))


def ablation_label(method_config: dict | None) -> tuple[str, object]:
    """(axis, value) of a PETAL run's options ({} is the default setting)."""
    mc = dict(method_config or {})
    if not mc:
        return "default", "default"
    for axis, values in ABLATIONS.items():
        for v in values[1:] if axis != "rank (Tucker)" else values:
            if _options(axis, v) == mc:
                return axis, v
    return ", ".join(mc), ", ".join(str(v) for v in mc.values())


def few_shot(store):
    """Test accuracy per method and N (mean, std, n, 95 % interval over seeds) with trainable %."""
    import pandas as pd

    from ..train import summarize

    df = _results(store)
    df = df[df["method"].isin(FEW_SHOT_METHODS) & df["n_shots"].isin(FEW_SHOT_N)
            & df["method_config"].apply(lambda v: not v)]
    if df.empty:
        return df
    out = summarize(df, by=("method", "n_shots"))
    out["trainable_pct"] = out["method"].map(df.groupby("method")["trainable_pct"].first())
    out["method"] = pd.Categorical(out["method"], FEW_SHOT_METHODS, ordered=True)
    return out.sort_values(["method", "n_shots"]).reset_index(drop=True)


def versus(store):
    """PETAL minus each other method, paired over seeds, per N."""
    import pandas as pd

    from ..train import compare

    df = _results(store)
    df = df[df["method_config"].apply(lambda v: not v)]
    rows = []
    for other in FEW_SHOT_METHODS[1:]:
        for n in FEW_SHOT_N:
            at = df[df["n_shots"] == n]
            if not {"petal", other} <= set(at["method"]):
                continue
            c = compare(at, "petal", other)
            if len(c):
                r = c.iloc[0]
                rows.append({"n_shots": n, "against": other, "n": int(r["n"]), "mean_diff": r["mean_diff"],
                             "ci_low": r["ci_low"], "ci_high": r["ci_high"], "p": r["p"]})
    return pd.DataFrame(rows, columns=["n_shots", "against", "n", "mean_diff", "ci_low", "ci_high", "p"])


def ablations(store):
    """Each ablation setting at N = 64: mean, std, n, 95 % interval over seeds, trainable %, and the
    paired difference from the default setting."""
    import pandas as pd

    from ..train import summarize

    df = _results(store)
    df = df[(df["method"] == "petal") & (df["n_shots"] == ANALYSIS_N) & df["seed"].isin(FEW_SHOT_SEEDS)]
    if df.empty:
        return pd.DataFrame()
    labels = df["method_config"].apply(ablation_label)
    default = df[labels.apply(lambda lv: lv[0] == "default")].set_index("seed")["test_acc"]
    rows = []
    for axis, values in ABLATIONS.items():
        for i, value in enumerate(values):
            if i == 0 and axis != "rank (Tucker)":
                part = df[labels.apply(lambda lv: lv[0] == "default")]
            else:
                part = df[labels.apply(lambda lv, a=axis, v=value: lv == (a, v))]
            if part.empty:
                continue
            s = summarize(part.assign(axis=axis), by="axis").iloc[0]
            acc = part.set_index("seed")["test_acc"]
            common = acc.index.intersection(default.index)
            diff, lo, hi, _ = t_interval((acc[common] - default[common]).to_numpy())
            rows.append({"axis": axis, "value": value, "official": i == 0 and axis != "rank (Tucker)",
                         "mean": s["mean"], "std": s["std"], "n": int(s["n"]), "ci_low": s["ci_low"],
                         "ci_high": s["ci_high"], "trainable_pct": float(part["trainable_pct"].iloc[0]),
                         "diff_vs_default": diff, "diff_ci_low": lo, "diff_ci_high": hi})
    return pd.DataFrame(rows)


def mode_gates(store, method_config: dict | None = None, seed: int = 13):
    """The soft mode gates over training of one PETAL run (N = 64): one row per (evaluation step,
    mode) with the gate value, from the run's history; empty for a run trained before the trainer
    recorded them."""
    import pandas as pd

    from ..train import load_run

    df = _results(store)
    mc = method_config or {}
    sel = df[(df["method"] == "petal") & (df["n_shots"] == ANALYSIS_N) & (df["seed"] == seed)
             & df["method_config"].apply(lambda v: (v or {}) == mc)]
    rows = []
    for h in sel["run"]:
        for rec in load_run(h, as_store(store)).history:
            stats = rec.get("method") or {}
            for r, g in enumerate(stats.get("mode_gates", [])):
                rows.append({"step": rec["step"], "mode": r, "gate": g, "modes_on": stats["modes_on"],
                             "threshold": stats["threshold"], "dev": rec["dev"]})
    return pd.DataFrame(rows, columns=["step", "mode", "gate", "modes_on", "threshold", "dev"])


def _restored(store, df, method_config: dict | None = None, seed: int = 13):
    """The PETAL run at N = 64 with ``method_config`` and ``seed`` rebuilt from ``store`` (the first
    with weights), or None."""
    from ..train import load_run, restore_run

    mc = method_config or {}
    sel = df[(df["method"] == "petal") & (df["n_shots"] == ANALYSIS_N) & (df["seed"] == seed)
             & df["method_config"].apply(lambda v: (v or {}) == mc)]
    hashes = [h for h in sel["run"] if has_weights(store, h)]
    return restore_run(load_run(hashes[0], store), store=store) if hashes else None


def mode_usage(store, method_config: dict | None = None, seed: int = 13, mass: float = 0.9):
    """How many modes each targeted matrix uses after training (a PETAL run in CP form at N = 64 with
    its weights, default setting): the share of mode r in Delta W_j = sum_r c_jr u_r v_r^T is
    ``|c_jr| ||u_r|| ||v_r||`` normalised over r (an upper bound of its Frobenius share, exact when the
    modes are orthogonal), where ``c_jr = lambda_r p_jr gate_r``. The modes are shared and switched off
    globally by the threshold, but each matrix weights them with its own p_j: this is the per-matrix
    view.

    Returns ``(shares, summary)``: rows (point, mode, share, gate) and per matrix the number of
    modes that carry ``mass`` of its weight, the participation ratio 1 / sum share^2, and the modes on
    globally (gate > 0.5). ``(None, None)`` without such a run (or for the Tucker form)."""
    import pandas as pd

    store = as_store(store)
    df = _results(store)
    r = None if df.empty else _restored(store, df, method_config, seed)
    if r is None:
        return None, None
    handle = r.handle
    if getattr(handle, "variant", "paper") != "paper" or handle.bank.form != "cp":
        return None, None
    rows, summary = [], []
    with torch.no_grad():
        gate = handle.bank.gate().float()
        for point, module in handle.modules.items():
            U, V = handle.bank.U[module.group].float(), handle.bank.V[module.group].float()
            w = handle.bank.mixing(module.p).float().abs() * U.norm(dim=0) * V.norm(dim=0)
            share = (w / w.sum().clamp_min(1e-30)).numpy()
            order = np.sort(share)[::-1]
            summary.append({"point": point, "modes_for_mass": int(np.searchsorted(np.cumsum(order), mass) + 1),
                            "participation": float(1.0 / max((share ** 2).sum(), 1e-30)),
                            "modes_on": int((gate > 0.5).sum())})
            rows += [{"point": point, "mode": k, "share": float(share[k]), "gate": float(gate[k])}
                     for k in range(len(share))]
    return pd.DataFrame(rows), pd.DataFrame(summary)


def routing(store, seed: int = 13, max_samples: int | None = None):
    """Where the instruction mixture sends each test question (default PETAL, N = 64, ``seed``):
    the mean gate probability per question type and expert, the routing statistics
    (:func:`~workbench.probes.routing_stats`: utilisation, importance, entropy, balance and z-loss),
    and a chi-square test of independence between question type and the top expert.

    Returns ``(per_type, stats, test)``: a type x expert DataFrame of mean probabilities, a dict,
    and ``{"chi2", "dof", "p", "n"}``. ``(None, None, None)`` without the run's weights."""
    import pandas as pd
    from scipy import stats as sstats

    from ..probes import routing_stats

    store = as_store(store)
    df = _results(store)
    r = None if df.empty else _restored(store, df, seed=seed)
    if r is None:
        return None, None, None
    probs = []
    with torch.no_grad():
        for batch in r.batches("test", max_samples=max_samples):
            r.model(**batch)
            probs.append(r.handle.routing_probs().float().cpu())
    P = torch.cat(probs)
    types = [e.question_type for e in r.test.examples[: P.shape[0]]]
    per_type = pd.DataFrame(P.numpy(), columns=[f"expert {k}" for k in range(P.shape[1])]).assign(type=types)
    per_type = per_type.groupby("type").mean()
    st = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in routing_stats(probs=P).items()}
    top = P.argmax(1).numpy()
    table = pd.crosstab(pd.Series(types, name="type"), pd.Series(top, name="expert"))
    table = table.loc[:, table.sum(0) > 0]
    if table.shape[1] < 2:
        test = {"chi2": float("nan"), "dof": 0, "p": float("nan"), "n": int(len(top))}
    else:
        chi2, p, dof, _ = sstats.chi2_contingency(table.to_numpy())
        test = {"chi2": float(chi2), "dof": int(dof), "p": float(p), "n": int(len(top))}
    return per_type, st, test


def information(store, seed: int = 13, max_samples: int | None = None, components: int = 16,
                estimators=("infonce", "nwj"), mi_steps: int = 1000):
    """The information bottleneck's effect: for each IB weight of the ablation (N = 64, ``seed``), the
    run rebuilt from the bundle, its instruction vector mu (what the mixture adds to every prompt token
    and what the bottleneck reads) collected on the test questions, and the mutual information
    I(mu; answer) estimated with the workbench's variational lower bounds (:func:`~workbench.probes.
    estimate_mi` on the ``components`` leading principal components of mu against the one-hot answer,
    held-out estimate). The bottleneck is meant to raise it. ``h_answer`` is the entropy of the test
    answers (the ceiling of any estimate; InfoNCE is also capped at log of its batch size).

    Returns a DataFrame: ``w_ib``, ``test_acc`` (this run), ``acc_mean`` / ``acc_n`` over the seeds,
    one ``mi_<estimator>`` column per estimator (nats), ``h_answer``, ``n``; a row per weight whose
    run has weights in the store (empty when none has).
    """
    import pandas as pd

    from ..probes import estimate_mi

    store = as_store(store)
    df = _results(store)
    rows = []
    if df.empty:
        return pd.DataFrame()
    petal = df[(df["method"] == "petal") & (df["n_shots"] == ANALYSIS_N)]
    for w in ABLATIONS["IB weight"]:
        options = _options("IB weight", w)
        r = _restored(store, df, options, seed)
        if r is None:
            continue
        same = petal[petal["method_config"].apply(lambda mc: (mc or {}) == options)]
        mus = []
        with torch.no_grad():
            for batch in r.batches("test", max_samples=max_samples):
                r.model(**batch)
                mus.append(r.handle.instruction().float().cpu())
        X = torch.cat(mus).numpy()
        answers = [e.answers[0] for e in r.test.examples[: X.shape[0]]]
        Xc = X - X.mean(0)
        _, _, vt = np.linalg.svd(Xc, full_matrices=False)
        Z = Xc @ vt[: min(components, vt.shape[0])].T
        Z = Z / (Z.std(0) + 1e-12)
        classes = {a: i for i, a in enumerate(sorted(set(answers)))}
        Y = np.eye(len(classes), dtype=np.float32)[[classes[a] for a in answers]]
        p = Y.mean(0)
        row = {"w_ib": float(w), "test_acc": float(r.result.metrics["test"]["overall"])}
        accs = same[same["seed"].isin(STUDY_SEEDS)]["test_acc"]
        row.update(acc_mean=float(accs.mean()), acc_n=int(len(accs)))
        for est in estimators:
            row[f"mi_{est}"] = float(estimate_mi(Z.astype(np.float32), Y, estimator=est, max_steps=mi_steps,
                                                 seed=0))
        row.update(h_answer=float(-(p[p > 0] * np.log(p[p > 0])).sum()), n=int(X.shape[0]))
        rows.append(row)
    return pd.DataFrame(rows)


def verdicts(store):
    """Each claim, what the paper reports, what the study measures and the verdict."""
    import pandas as pd

    rows = []
    fs = few_shot(store)
    vs = versus(store)
    abl = ablations(store)

    def combine(part):
        return overall(verdict(r.ci_low, r.ci_high) for r in part.itertuples())

    if len(fs):
        pct = float(fs[fs["method"] == "petal"]["trainable_pct"].iloc[0]) if (fs["method"] == "petal").any() else np.nan
        rows.append({"claim": "PETAL trains about 0.5 % of the parameters", "paper": "0.5 % (BLIP-2 / InstructBLIP)",
                     "workbench": f"{pct:.2f} % of vlt5-tiny's language model (its defaults: R = 64 on a 1.4 M model)",
                     "verdict": "not comparable: the share depends on the backbone's size"})
    for other, claim in (("full", "PETAL beats full fine-tuning"), ("lora", "PETAL beats LoRA at few shots")):
        part = vs[vs["against"] == other] if len(vs) else vs
        text = "; ".join(f"N={r.n_shots}: {r.mean_diff:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]"
                         for r in part.itertuples()) or "no runs yet"
        rows.append({"claim": claim, "paper": "yes", "workbench": text,
                     "verdict": combine(part) if len(part) else "inconclusive"})
    for axis, value, claim in (("mixture", "off", "the instruction mixture (and the bottleneck that reads it) helps"),
                               ("IB weight", 0.0, "the information bottleneck helps")):
        part = abl[(abl["axis"] == axis) & (abl["value"] == value)] if len(abl) else abl
        if part.empty:
            rows.append({"claim": claim, "paper": "yes (ablation)", "workbench": "no runs yet",
                         "verdict": "inconclusive"})
            continue
        r = part.iloc[0]
        # default minus the ablated setting, paired over seeds
        d, lo, hi = -r["diff_vs_default"], -r["diff_ci_high"], -r["diff_ci_low"]
        rows.append({"claim": claim, "paper": "yes (ablation)",
                     "workbench": f"default - ({axis} {value}): {d:+.3f} [{lo:+.3f}, {hi:+.3f}] over {int(r['n'])} seeds",
                     "verdict": verdict(lo, hi)})
    return pd.DataFrame(rows, columns=["claim", "paper", "workbench", "verdict"])


STUDY = register_study(Study(
    NAME,
    "PETAL against LoRA, VL-PET and full fine-tuning (N = 16, 64, 1000 x 5 seeds) and its ablations at "
    "N = 64 (modes, form, threshold, mixture, experts, templates, IB weight, released variant), on shapes-vqa.",
    grids=petal_configs,
    keep_weights=keep_weights,
    keep_predictions=keep_predictions,
    analyses={"few_shot": few_shot, "versus": versus, "ablations": ablations, "mode_gates": mode_gates,
              "mode_usage": mode_usage, "routing": routing, "information": information, "verdicts": verdicts},
))
