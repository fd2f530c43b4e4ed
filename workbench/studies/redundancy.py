"""Redundancy and task correlation of method modules (MixPHM's analysis, for every sub-layer method).

For each method module registered at a sub-layer insertion point (adapters, MixPHM, VL-PET, ...;
``model.modifications()``; ``kinds=("projection",)`` takes the projection modules instead, e.g.
PETAL's modes), over the same samples:

- the module's output u, mean-pooled over the valid tokens. By default (``output="delta"``) u is
  the module's *contribution* Delta = h' - h (MixPHM's u = Delta(f), its output before the skip);
  ``output="output"`` takes the whole returned h' instead;
- target ``"pretrained"``: the frozen sub-layer output H at that point (MixPHM's f, the pretrained
  representation; for a projection module the projection's own output), mean-pooled: high
  similarity = the module is *redundant* with it;
- target ``"task"``: the final representation of the module's stack (the last hidden state of the
  encoder or decoder, mean-pooled): high similarity = *task-relevant* correlation.

Measures (``docs/probes.md#redundancy-and-task-correlation``):

- ``"rsa"``: cosine-similarity RDMs over samples (:func:`~workbench.probes.rdm` with
  ``"cosine"``) compared by the Pearson correlation of their upper triangles
  (:func:`~workbench.probes.compare_rdms` ``"pearson"``), as MixPHM's section 3.1; in [-1, 1].
- ``"cka"``: linear CKA (:func:`~workbench.probes.cka`; ``debiased=True`` for the debiased
  form); in [0, 1] (debiased: about [-1, 1]).
- ``"mi"`` (``mi=True`` or an estimator name): mutual information in nats. ``"ksg"`` (default):
  both representations are projected on their first ``mi_dim`` principal components (centred,
  SVD over the samples) and :func:`~workbench.probes.mi_ksg` (k = ``mi_k``, standardised
  columns) is applied to the projections -- KSG is unreliable in high dimension, so this is the MI
  of the leading components, a lower bound on the MI of the full representations. A neural
  estimator name (``"infonce"``, ``"js"``, ``"nwj"``, ``"smile"``, ...) runs
  :func:`~workbench.probes.estimate_mi` on the full pooled vectors (``mi_kwargs`` go to it).

A representation that is constant over the samples (e.g. a zero-initialised adapter before any
training: Delta = 0) cannot be measured: its values are NaN, with a
:class:`~workbench.probes.DegenerateInputWarning`.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..methods import applied_method
from ..models import capture
from ..probes import (
    ESTIMATORS,
    DegenerateInputWarning,
    cka,
    compare_rdms,
    estimate_mi,
    mi_ksg,
    permutation_test,
    rdm,
    similarity_test,
)

MEASURES = ("rsa", "cka")
TARGETS = ("pretrained", "task")
COLUMNS = ["method", "layer", "stack", "measure", "target", "value", "point", "sublayer", "module", "n_samples"]
# With n_perm / n_boot: the permutation null band, one-sided p-value and bootstrap interval of each value.
BAND_COLUMNS = ["null_lo", "null_hi", "p_value", "ci_lo", "ci_hi"]


def _rsa(u: torch.Tensor, t: torch.Tensor) -> float:
    ru, rt = rdm(u, "cosine"), rdm(t, "cosine")
    if not (bool(torch.isfinite(ru).all()) and bool(torch.isfinite(rt).all())):
        return float("nan")  # rdm already warned (a zero pattern)
    return float(compare_rdms(ru, rt, "pearson"))


def _pca(X: torch.Tensor, k: int) -> torch.Tensor:
    Xc = X - X.mean(0, keepdim=True)
    _, _, Vh = torch.linalg.svd(Xc, full_matrices=False)
    return Xc @ Vh[: min(k, Vh.shape[0])].T


def _mi(u: torch.Tensor, t: torch.Tensor, estimator: str, mi_dim: int, mi_k: int, seed: int, mi_kwargs: dict) -> float:
    if bool((u == u[:1]).all()) or bool((t == t[:1]).all()):
        warnings.warn("redundancy_analysis: a representation is constant over the samples; MI is NaN",
                      DegenerateInputWarning, stacklevel=3)
        return float("nan")
    if estimator == "ksg":
        return float(mi_ksg(_pca(u, mi_dim), _pca(t, mi_dim), k=mi_k, seed=seed))
    return float(estimate_mi(u, t, estimator=estimator, seed=seed, **mi_kwargs))


def _int_at_least(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _method_name(model, module) -> str:
    name = applied_method(model)
    return name if name is not None else type(module).__name__


def redundancy_analysis(
    model,
    data,
    measures=MEASURES,
    mi=False,
    max_samples: int = 256,
    output: str = "delta",
    targets=TARGETS,
    stacks=("encoder", "decoder"),
    kinds=("sublayer",),
    debiased: bool = False,
    mi_dim: int = 4,
    mi_k: int = 3,
    mi_kwargs: dict | None = None,
    seed: int = 0,
    n_perm: int = 0,
    n_boot: int = 0,
    level: float = 0.95,
):
    """Per layer and method module: RSA / CKA (/ MI) against the pretrained and the task representation.

    Args:
        model: a :class:`~workbench.models.VLModel` with a sub-layer method applied.
        data: batches for :func:`~workbench.models.capture` (dicts of model kwargs; with
            ``labels`` when decoder modules are analysed). The model runs in eval mode, no grad.
        measures: any of ``"rsa"``, ``"cka"``.
        mi: ``False``; ``True`` / ``"ksg"`` (KSG on ``mi_dim`` principal components, ``mi_k``
            neighbours); or a neural estimator name for ``estimate_mi`` (with ``mi_kwargs``).
        max_samples: examples used (at least 4).
        output: ``"delta"`` (u = h' - h, the module's contribution; default) or ``"output"`` (h').
        targets: any of ``"pretrained"`` (the frozen sub-layer output H) and ``"task"`` (the
            mean-pooled last hidden state of the module's stack).
        stacks: which stacks' modules to analyse.
        kinds: which modules: ``"sublayer"`` (adapter-family modules, the default) and/or
            ``"projection"`` (modules on q k v o / wi wo: PETAL's modes, VL-PET's decoder value
            adapter); for a projection module "pretrained" is the projection's own output y.
        debiased: debiased linear CKA.
        seed: for the MI estimators and the resampling.
        n_perm: permutations of the samples of one side for the null band (0: none). RSA's is the
            Mantel test; CKA's permutes the Gram matrix; MI's re-estimates on shuffled pairs (KSG
            only: a neural estimator would retrain per permutation, so it raises).
        n_boot: bootstrap resamples of the samples for the interval (0: none; RSA and CKA only: KSG
            assumes distinct points, so MI's interval stays NaN).
        level: the coverage of the null band and the interval (0.95).

    Returns:
        a pandas DataFrame with columns ``method, layer, stack, measure, target, value`` (tidy:
        one row per module x measure x target), plus ``point`` (the insertion point), ``sublayer``,
        ``module`` (the module's name at the point) and ``n_samples``, and when resampling is asked
        ``null_lo, null_hi, p_value, ci_lo, ci_hi`` (:data:`BAND_COLUMNS`; see
        :func:`~workbench.probes.similarity_test`). Rows follow forward order.
    """
    import pandas as pd

    measures = (measures,) if isinstance(measures, str) else tuple(measures)
    for m in measures:
        if m not in MEASURES:
            raise ValueError(f"measures must be among {MEASURES}, got {m!r} (MI is asked with mi=...)")
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    for t in targets:
        if t not in TARGETS:
            raise ValueError(f"targets must be among {TARGETS}, got {t!r}")
    stacks = (stacks,) if isinstance(stacks, str) else tuple(stacks)
    for s in stacks:
        if s not in ("encoder", "decoder"):
            raise ValueError(f"stacks must be among ('encoder', 'decoder'), got {s!r}")
    if not measures and not mi:
        raise ValueError("nothing to measure: give measures and/or mi")
    if not targets:
        raise ValueError("targets must name at least one of ('pretrained', 'task')")
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if not kinds or any(k not in ("sublayer", "projection") for k in kinds):
        raise ValueError(f"kinds must be among ('sublayer', 'projection'), got {kinds!r}")
    if output not in ("delta", "output"):
        raise ValueError(f"output must be 'delta' (h' - h) or 'output' (h'), got {output!r}")
    max_samples = _int_at_least(max_samples, "max_samples", 4)
    mi_dim = _int_at_least(mi_dim, "mi_dim", 1)
    mi_k = _int_at_least(mi_k, "mi_k", 1)
    if mi is True:
        mi = "ksg"
    if mi and mi not in ESTIMATORS:
        raise ValueError(f"mi must be False, True or an estimator among {ESTIMATORS}, got {mi!r}")
    if mi == "binned":
        raise ValueError("mi='binned' is for discrete data; use 'ksg' or a neural estimator")
    n_perm = _int_at_least(n_perm, "n_perm", 0)
    n_boot = _int_at_least(n_boot, "n_boot", 0)
    if n_perm and mi and mi != "ksg":
        raise ValueError(f"n_perm with mi={mi!r} would train a critic per permutation; use mi='ksg' for null bands")
    resample = bool(n_perm or n_boot)
    if not hasattr(model, "modifications") or not hasattr(model, "insertion_points"):
        raise TypeError(f"redundancy_analysis needs a workbench VLModel, got {type(model).__name__}")

    points = model.insertion_points()
    modules = [
        (points[p], name, mod)
        for p, mods in model.modifications().items()
        if p in points and points[p].stack in stacks and points[p].kind in kinds
        for name, mod in mods
    ]
    if not modules:
        what = " or ".join({"sublayer": "sub-layer", "projection": "projection"}[k] for k in kinds)
        how = ("add_sublayer_modification (adapters, MixPHM, VL-PET, ...)" if kinds == ("sublayer",) else
               "add_sublayer_modification / add_projection_modification")
        raise ValueError(
            f"the model has no {what} method modules"
            + (f" in {list(stacks)}" if len(stacks) < 2 else "")
            + f": redundancy_analysis needs a method that registers modules with {how}"
            + ("; pass kinds=('projection',) for projection methods such as PETAL" if "projection" not in kinds
               else "")
        )
    suffix = ":delta" if output == "delta" else ""
    names = []
    for point, name, _ in modules:
        names.append(f"{point.name}@{name}{suffix}")
        if "pretrained" in targets:
            names.append(point.name)
        if "task" in targets:
            names.append(f"{point.stack}.final")
    names = list(dict.fromkeys(names))
    acts = capture(model, names, data=data, max_samples=max_samples, pool="mean", dtype=torch.float64)

    rows = []
    mi_kwargs = dict(mi_kwargs or {})
    for point, name, module in modules:
        u = acts[f"{point.name}@{name}{suffix}"]
        n = u.shape[0]
        if n < 4:
            raise ValueError(f"only {n} samples reached {point.name!r}; redundancy_analysis needs at least 4")
        reps = {}
        if "pretrained" in targets:
            reps["pretrained"] = acts[point.name]
        if "task" in targets:
            reps["task"] = acts[f"{point.stack}.final"]
        base = dict(method=_method_name(model, module), layer=point.layer, stack=point.stack,
                    point=point.name, sublayer=point.sublayer, module=name, n_samples=n)
        for target, rep in reps.items():
            for measure in measures:
                if resample:
                    r = similarity_test(u, rep, measure, n_perm=n_perm, n_boot=n_boot, seed=seed, level=level,
                                        debiased=debiased)
                    rows.append({**base, "measure": measure, "target": target, **r.as_dict()})
                    continue
                if measure == "rsa":
                    value = _rsa(u, rep)
                else:
                    value = float(cka(u, rep, kernel="linear", debiased=debiased))
                rows.append({**base, "measure": measure, "target": target, "value": value})
            if mi:
                value = _mi(u, rep, mi, mi_dim, mi_k, seed, mi_kwargs)
                row = {**base, "measure": "mi", "target": target, "value": value}
                if n_perm and np.isfinite(value):
                    pu, pt = _pca(u, mi_dim), _pca(rep, mi_dim)
                    r = permutation_test(lambda a, b: mi_ksg(a, b, k=mi_k, seed=seed), pu, pt, n_perm=n_perm,
                                         seed=seed, level=level)
                    row.update({k: v for k, v in r.as_dict().items() if k != "value"})
                rows.append(row)
    df = pd.DataFrame(rows, columns=COLUMNS + (BAND_COLUMNS if resample else []))
    for col in ["value"] + (BAND_COLUMNS if resample else []):
        df[col] = df[col].astype(np.float64)
    return df
