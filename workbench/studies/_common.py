"""Helpers the studies share: opening a store, a paired t-interval, and the verdict rule."""

from __future__ import annotations

import numpy as np

VERDICTS = ("reproduced", "not reproduced", "inconclusive")


def as_store(store):
    """A RunStore (a path or None is opened as one; a study's bundle already is one)."""
    from ..train import RunStore

    return store if isinstance(store, RunStore) else RunStore(store)


def has_weights(store, run_hash: str) -> bool:
    """Whether ``store`` holds the method weights of run ``run_hash`` (what a restored run needs)."""
    from .bundle import WEIGHTS_FILE

    path = store.locate(run_hash)
    return path is not None and (path / WEIGHTS_FILE).is_file()


def t_interval(x) -> tuple[float, float, float, int]:
    """(mean, low, high, n): the mean of the finite values of ``x`` and its 95 % t-interval
    (NaN bounds with fewer than two values)."""
    from scipy import stats

    x = np.asarray([v for v in x if np.isfinite(v)], dtype=float)
    if len(x) < 2:
        return (float(x.mean()) if len(x) else np.nan), np.nan, np.nan, len(x)
    m, se = x.mean(), x.std(ddof=1) / np.sqrt(len(x))
    h = stats.t.ppf(0.975, len(x) - 1) * se
    return float(m), float(m - h), float(m + h), len(x)


def verdict(lo: float, hi: float, positive: bool = True) -> str:
    """The verdict of a claim from the 95 % interval of its effect: ``reproduced`` when the interval
    excludes 0 in the claimed direction (``positive``: the effect is > 0), ``not reproduced`` when it
    excludes 0 in the other, ``inconclusive`` otherwise (or without an interval)."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "inconclusive"
    if (lo > 0) if positive else (hi < 0):
        return "reproduced"
    if (hi < 0) if positive else (lo > 0):
        return "not reproduced"
    return "inconclusive"


def overall(verdicts) -> str:
    """One verdict for a claim tested in several places (e.g. at every N): reproduced only where
    every test reproduces it, not reproduced as soon as one contradicts it, inconclusive otherwise."""
    verdicts = list(verdicts)
    if verdicts and all(v == "reproduced" for v in verdicts):
        return "reproduced"
    if any(v == "not reproduced" for v in verdicts):
        return "not reproduced"
    return "inconclusive"
