"""Helpers the studies share: opening a store, a paired t-interval, the verdict rule, and how many
seeds an inconclusive comparison would need."""

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


def seeds_to_settle(mean: float, lo: float, hi: float, n: int, power: float = 0.8,
                    max_n: int = 10_000) -> int | None:
    """How many seeds a paired comparison needs before its 95 % interval excludes 0 with probability
    ``power``, if the effect and its spread over seeds are what ``(mean, lo, hi)`` over ``n`` seeds
    (a :func:`t_interval`) shows.

    The spread is recovered from the interval (s = half-width x sqrt(n) / t_{0.975, n-1}); the count is
    the smallest m >= 2 with (t_{0.975, m-1} + t_{power, m-1}) s / sqrt(m) <= |mean|, the usual
    approximation of a paired t-test's power (``power=0.5``: the seeds at which the interval would
    just exclude 0 if the mean held). A planning figure from a few seeds, not a promise: the mean and
    spread it assumes are themselves uncertain. None where the mean is 0, the interval is missing,
    or more than ``max_n`` seeds would be needed.
    """
    from scipy import stats

    if not (n >= 2 and np.isfinite(lo) and np.isfinite(hi) and np.isfinite(mean)) or mean == 0:
        return None
    if not 0.5 <= power < 1:
        raise ValueError(f"power must be in [0.5, 1), got {power!r}")
    s = (hi - lo) / 2 * np.sqrt(n) / stats.t.ppf(0.975, n - 1)
    if s == 0:
        return 2
    for m in range(2, max_n + 1):
        if (stats.t.ppf(0.975, m - 1) + stats.t.ppf(power, m - 1)) * s / np.sqrt(m) <= abs(mean):
            return m
    return None


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
