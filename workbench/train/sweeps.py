"""Sweeps: expand a grid of run configs, run them all (resuming from the store), summarise over seeds.

Three steps, each usable alone::

    from workbench.train import RunConfig, grid, sweep, summarize, compare

    configs = grid(RunConfig(epochs=10), method=["full", "lora"], n_shots=[16, 64], seed=[13, 21, 42])
    df = sweep(configs, executor="processes", workers=2)   # one row per config; finished runs are reused
    summarize(df, by=("method", "n_shots"))                # mean, std, n, 95 % t-interval over seeds
    compare(df, "lora", "full", by="n_shots")              # paired over seeds: lora - full

``grid`` checks every axis before anything runs; ``sweep`` records a failing config (``status ==
"failed"`` with its ``error``) and goes on; a second ``sweep`` of the same configs trains nothing.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import pickle
import tempfile
from dataclasses import fields
from pathlib import Path

from .config import RunConfig
from .store import RunStore

EXECUTORS = ("local", "processes", "ray")
STATUSES = ("done", "reused", "failed")
# Dict-valued RunConfig fields whose entries can be grid axes as ``<field>__<key>``.
_DICT_FIELDS = ("method_config", "task_options", "backbone_options")
_SEP = "__"


# ----------------------------------------------------------------------------------------- grid
def _axis_values(name: str, values) -> list:
    """The values of one axis: a list or tuple is expanded, anything else is one value."""
    if isinstance(values, (list, tuple)):
        if len(values) == 0:
            raise ValueError(f"grid axis {name!r} is empty: give at least one value")
        return list(values)
    return [values]


def grid(base: RunConfig, **axes) -> list[RunConfig]:
    """The cartesian product of ``axes`` applied to ``base``, in a deterministic order.

    An axis is a :class:`RunConfig` field (``method``, ``n_shots``, ``seed``, ``lr``, ...) or an
    entry of a dict field spelled ``<field>__<key>``: ``method_config__r=[4, 8]`` sets
    ``method_config["r"]`` (merged into ``base.method_config``); ``task_options__types=[["exist"],
    ["count"]]`` likewise for ``task_options`` (and ``backbone_options``).

    Expansion rule: a **list or tuple** is expanded, one config per element; any other value (a
    number, a string, a dict, None) is a single fixed value. So a value that is itself a list must
    be wrapped: ``method_config__targets=[["q", "v"]]`` is one config,
    ``method_config__targets=[["q", "v"], ["q", "k", "v", "o"]]`` two.

    Order: axes in the order given, the last one varying fastest (``itertools.product``);
    ``base``'s values stand where no axis is given. A whole-field axis (``method_config=[{...}, ...]``)
    replaces the dict; ``method_config__<key>`` entries are then merged into it.

    Checked before anything runs (a ``ValueError`` naming the valid choices): an axis that is
    neither a RunConfig field nor ``<dict field>__<key>``; a ``method_config__<key>`` that is not an
    option of *every* method of the grid (sweep methods with different options in separate grids
    and concatenate the lists); an unknown method; any expanded config that RunConfig or the method's
    config rejects (e.g. ``n_shots=0``, ``method_config__r=[-1]``).

    Example:
        >>> base = RunConfig(epochs=4)
        >>> cfgs = grid(base, method="lora", n_shots=[16, 64], method_config__r=[4, 8])
        >>> [(c.n_shots, c.method_config["r"]) for c in cfgs]
        [(16, 4), (16, 8), (64, 4), (64, 8)]
        >>> grid(base, shots=[16])                                    # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: grid: unknown axis 'shots'; ...
    """
    from ..methods import list_methods, method_spec

    if not isinstance(base, RunConfig):
        raise TypeError(f"grid: base must be a RunConfig, got {type(base).__name__}")
    field_names = [f.name for f in fields(RunConfig)]
    ordered = {}  # axis -> values, in the order given; an entry axis is keyed (field, key)
    for name, values in axes.items():
        if name in field_names:
            ordered[name] = _axis_values(name, values)
            continue
        head, sep, key = name.partition(_SEP)
        if sep and head in _DICT_FIELDS and key:
            ordered[(head, key)] = _axis_values(name, values)
            continue
        raise ValueError(
            f"grid: unknown axis {name!r}; axes are RunConfig fields ({', '.join(field_names)}) or "
            f"entries of a dict field spelled <field>{_SEP}<key> ({', '.join(f + _SEP + '...' for f in _DICT_FIELDS)}, "
            f"e.g. method_config{_SEP}r=[4, 8])"
        )

    # Every method of the grid must exist and know every method_config axis.
    methods = list(dict.fromkeys(ordered.get("method", [base.method])))
    for m in methods:
        if m not in list_methods():
            raise ValueError(f"grid: unknown method {m!r}; registered methods: {', '.join(list_methods())}")
    option_keys = [n[1] for n in ordered if isinstance(n, tuple) and n[0] == "method_config"]
    for m in methods:
        known = [f.name for f in fields(method_spec(m).config_cls)]
        missing = [k for k in option_keys if k not in known]
        if missing:
            raise ValueError(
                f"grid: method_config{_SEP}{missing[0]} is not an option of method {m!r} "
                f"(grid methods: {', '.join(methods)}); {m!r} options: {', '.join(known)}"
            )

    names = list(ordered)
    out = []
    for combo in itertools.product(*ordered.values()):
        changes = {n: v for n, v in zip(names, combo) if isinstance(n, str)}  # whole fields first
        for name, value in zip(names, combo):
            if isinstance(name, tuple):  # then entries, merged into the (possibly replaced) dict
                head, key = name
                changes[head] = {**changes.get(head, getattr(base, head)), key: value}
        try:
            cfg = base.replace(**changes)
            _check_method_config(cfg)
        except (TypeError, ValueError) as e:
            shown = {n if isinstance(n, str) else f"{n[0]}{_SEP}{n[1]}": v for n, v in zip(names, combo)}
            raise ValueError(f"grid: the config {shown} is invalid: {e}") from None
        out.append(cfg)
    return out


def _check_method_config(cfg: RunConfig) -> None:
    from ..methods import get_config

    get_config(cfg.method, **cfg.method_config)


# ---------------------------------------------------------------------------------------- sweep
def _open_store(store) -> RunStore:
    """The store, checked writable (a file is created and removed in its root)."""
    store = store if isinstance(store, RunStore) else RunStore(store)
    if hasattr(store, "check_writable"):  # the store's own check, where it has one
        store.check_writable()
        return store
    try:
        store.root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=store.root)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OSError(f"sweep: the run store {store.root} is not writable ({e}); nothing was run") from e
    return store


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _picklable(e: BaseException):
    """``e`` if it survives a pickle round trip (so it can be re-raised in the driver), else None."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - anything that does not pickle is sent as text
        return None


def _threads_per_worker(workers: int, threads: int | None = None) -> int:
    cores = os.cpu_count() or 1
    return max(1, threads if threads is not None else cores // max(1, workers))


def _init_worker(threads: int) -> None:
    """Process-pool initializer: ``threads`` torch threads, so that workers x threads <= cores."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass


def _run_in_worker(cfg_dict: dict, store_root: str):
    """One run in a pool worker: ``("ok", RunResult)`` or ``("failed", error text, exception or None)``."""
    from .loop import run

    try:
        result = run(RunConfig.from_dict(cfg_dict), store=RunStore(store_root))
        return ("ok", result)
    except Exception as e:  # noqa: BLE001 - recorded by the driver; the sweep goes on
        return ("failed", _error_text(e), _picklable(e))


def _run_remote(cfg_dict: dict, threads: int):
    """One run as a Ray task, in a private temporary store; returns what the driver writes.

    ``("ok", records, safetensors bytes or None)`` where records are the run's JSON files, or
    ``("failed", error text, failure record or None)``. Nothing on the worker outlives the task.
    """
    import shutil

    import torch

    from .loop import run

    torch.set_num_threads(max(1, threads))
    root = tempfile.mkdtemp(prefix="workbench-ray-")
    try:
        store = RunStore(root)
        cfg = RunConfig.from_dict(cfg_dict)
        try:
            result = run(cfg, store=store)
        except Exception as e:  # noqa: BLE001 - sent back and recorded by the driver
            failed = Path(root) / f"{cfg.hash}.failed" / "failure.json"
            record = json.loads(failed.read_text()) if failed.exists() else None
            return ("failed", _error_text(e), record)
        records = store.read(result.hash)
        weights = store.path(result.hash) / "method.safetensors"
        return ("ok", records, weights.read_bytes() if weights.exists() else None)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _row(cfg: RunConfig, run_hash, result, status: str, error: str | None, mc_keys: list[str]) -> dict:
    """One DataFrame row: config fields, method-config entries, metrics (NaN where the run failed)."""
    from ..methods import get_config

    nan = float("nan")
    row = {k: v for k, v in cfg.to_dict().items()}
    try:
        resolved = get_config(cfg.method, **cfg.method_config).to_dict()
    except Exception:  # noqa: BLE001 - a failed row of an invalid method config shows what was given
        resolved = dict(cfg.method_config)
    for k in mc_keys:
        row[f"method_config{_SEP}{k}"] = resolved.get(k, nan)
    row.update(run=run_hash, status=status, error=error)
    if result is None:
        row.update(test_acc=nan, test_acc_last=nan, dev_best=nan, trainable=nan, trainable_pct=nan, wall_s=nan)
        return row
    m = result.metrics
    row["test_acc"] = m["test"]["overall"]
    row["test_acc_last"] = m["test_last"]["overall"]
    row["dev_best"] = m["dev_best"]
    for t, v in m["test"].get("per_type", {}).items():
        row[f"acc/{t}"] = v
    row["trainable"] = result.params["trainable"]
    row["trainable_pct"] = result.params["trainable_pct"]
    row["wall_s"] = result.timings["wall_s"]
    return row


def sweep(configs, executor: str = "local", store: RunStore | str | os.PathLike | None = None,
          workers: int | None = None, progress: bool = True, raise_on_error: bool = False,
          threads: int | None = None, ray_options=None):
    """Run every config (reusing finished runs) and return one row per config as a DataFrame.

    Args:
        configs: RunConfigs (e.g. from :func:`grid`); the same config twice is trained once.
        executor: ``"local"`` (one after the other in this process), ``"processes"`` (a spawn
            process pool; each worker runs ``run(cfg, store=store)`` with ``threads`` torch
            threads, by default ``cores // workers``) or ``"ray"`` (one Ray task per config, on the
            cluster at ``$RAY_ADDRESS`` or a local one; each task trains into a private temporary
            store and sends its records and method weights back; the driver writes the store,
            so no shared file system is needed; needs ``pip install ray``).
        store: a :class:`RunStore` or directory (default ``runs/`` or ``$WORKBENCH_RUNS``). It must
            be writable: an ``OSError`` is raised before the first run otherwise.
        workers: pool size for ``"processes"`` (default: ``min(#configs to train, cores)``).
        progress: a tqdm bar over runs (with done / reused / failed counts).
        raise_on_error: re-raise the first failure instead of recording it and going on.
        threads: torch threads per worker (``"processes"``, ``"ray"``).
        ray_options: ``.options()`` of each Ray task, a dict or a callable ``cfg -> dict``, e.g.
            ``{"num_cpus": 2, "num_gpus": 0.25}`` (fractional GPUs share one device); default
            ``{"num_cpus": 1}``.

    Returns:
        A pandas DataFrame, one row per config in the order given: every RunConfig field, a
        ``method_config__<key>`` column per method option set in any config (its resolved value),
        ``run`` (the hash), ``status`` (``"done"`` trained now, ``"reused"`` read from the store,
        ``"failed"``), ``error`` (``"Type: message"`` of a failure, else None), ``test_acc``,
        ``test_acc_last``, ``dev_best``, ``acc/<question type>``, ``trainable``, ``trainable_pct``
        and ``wall_s`` (the run's own wall time, also for reused runs). A failed row has NaN metrics.

    Example:
        >>> df = sweep(grid(RunConfig(epochs=4), seed=[13, 21]), progress=False)   # doctest: +SKIP
        >>> df[["seed", "status", "test_acc"]]                                        # doctest: +SKIP
        >>> sweep(grid(RunConfig(epochs=4), seed=[13, 21])).status.tolist()          # doctest: +SKIP
        ['reused', 'reused']
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from .loop import load_run, run

    if executor not in EXECUTORS:
        raise ValueError(f"sweep: executor must be one of {list(EXECUTORS)}, got {executor!r}")
    configs = list(configs)
    bad = [type(c).__name__ for c in configs if not isinstance(c, RunConfig)]
    if bad:
        raise TypeError(f"sweep: configs must be RunConfigs, got {bad[0]}")
    ray = None
    if executor == "ray":
        try:
            import ray
        except ImportError:
            raise ImportError("sweep(executor='ray') needs Ray: pip install ray "
                              "(or pip install 'workbench[distributed]')") from None
    store = _open_store(store)

    mc_keys = list(dict.fromkeys(k for c in configs for k in c.method_config))
    rows: list[dict | None] = [None] * len(configs)
    hashes: list[str | None] = []
    for i, cfg in enumerate(configs):
        try:
            hashes.append(cfg.hash)
        except Exception as e:  # an unknown method, a bad option, a missing backbone
            if raise_on_error:
                raise
            hashes.append(None)
            rows[i] = _row(cfg, None, None, "failed", _error_text(e), mc_keys)

    bar = tqdm(total=len(configs), disable=not progress, desc=f"sweep ({executor})", unit="run")
    counts = dict.fromkeys(STATUSES, 0)

    def finish(i: int, status: str, result, error: str | None):
        rows[i] = _row(configs[i], hashes[i], result, status, error, mc_keys)
        counts[status] += 1
        bar.set_postfix(counts)
        bar.update(1)

    # Finished runs (and configs that failed to hash) first; each distinct hash is trained once.
    todo: dict[str, list[int]] = {}
    for i, h in enumerate(hashes):
        if h is None:
            counts["failed"] += 1
            bar.update(1)
        elif h in todo:
            todo[h].append(i)
        elif store.is_finished(h):
            finish(i, "reused", load_run(h, store), None)
        else:
            todo[h] = [i]

    def settle(h: str, status: str, result, error: str | None):
        first, *dups = todo[h]
        finish(first, status, result, error)
        for j in dups:  # the same config again: the run just made (or the same failure)
            finish(j, "reused" if status != "failed" else "failed", result, error)

    try:
        if executor == "local":
            for h, idx in todo.items():
                try:
                    result = run(configs[idx[0]], store=store)
                except Exception as e:
                    if raise_on_error:
                        raise
                    settle(h, "failed", None, _error_text(e))
                else:
                    settle(h, "reused" if result.reused else "done", result, None)
        elif executor == "processes" and todo:
            _sweep_processes(configs, todo, store, workers, threads, raise_on_error, settle)
        elif executor == "ray" and todo:
            _sweep_ray(ray, configs, todo, store, threads, ray_options, raise_on_error, settle)
    finally:
        bar.close()
    return pd.DataFrame(rows)


def _sweep_processes(configs, todo, store, workers, threads, raise_on_error, settle):
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    workers = workers or min(len(todo), os.cpu_count() or 1)
    threads = _threads_per_worker(workers, threads)
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                             initializer=_init_worker, initargs=(threads,)) as pool:
        futures = {pool.submit(_run_in_worker, {**configs[idx[0]].to_dict(), "quiet": True}, str(store.root)): h
                   for h, idx in todo.items()}
        try:
            for fut in as_completed(futures):
                h = futures[fut]
                try:
                    out = fut.result()
                except Exception as e:  # noqa: BLE001 - the worker died (e.g. out of memory)
                    out = ("failed", _error_text(e), None)
                if out[0] == "ok":
                    # quiet is not part of the hash: show the caller's own config
                    result = out[1]
                    result.config = configs[todo[h][0]]
                    settle(h, "reused" if result.reused else "done", result, None)
                else:
                    if raise_on_error:
                        raise out[2] if out[2] is not None else RuntimeError(f"run {h} failed: {out[1]}")
                    settle(h, "failed", None, out[1])
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise


def _sweep_ray(ray, configs, todo, store, threads, ray_options, raise_on_error, settle):
    from .loop import load_run

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True, log_to_driver=False)
    remote = ray.remote(_run_remote)
    refs = {}
    for h, idx in todo.items():
        cfg = configs[idx[0]]
        opts = ray_options(cfg) if callable(ray_options) else dict(ray_options or {"num_cpus": 1})
        opts.setdefault("num_cpus", 1)
        n_threads = threads if threads is not None else max(1, int(opts["num_cpus"]))
        refs[remote.options(**opts).remote({**cfg.to_dict(), "quiet": True}, n_threads)] = h
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            ref = ready[0]
            h = refs[ref]
            try:
                out = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - the task or its worker died
                out = ("failed", _error_text(e), None)
            if out[0] == "ok":
                _, records, weights = out
                tensors = None
                if weights is not None:
                    from safetensors.torch import load as load_safetensors

                    tensors = load_safetensors(weights)
                with store.lock(h):  # a local run() of the same config may be publishing it too
                    if not store.is_finished(h):
                        store.write(h, records, tensors=tensors)
                result = load_run(h, store)
                result.reused = False
                result.config = configs[todo[h][0]]
                settle(h, "done", result, None)
            else:
                if out[2] is not None:
                    store.write_failure(h, out[2])
                if raise_on_error:
                    raise RuntimeError(f"run {h} failed: {out[1]}")
                settle(h, "failed", None, out[1])
    except BaseException:
        for ref in pending:
            ray.cancel(ref)
        raise


# ------------------------------------------------------------------------------------ statistics
def _t_sf2(t: float, df: int) -> float:
    """Two-sided p-value P(|T| >= |t|) of Student's t with integer ``df`` (exact closed form)."""
    if math.isnan(t):
        return float("nan")
    if math.isinf(t):
        return 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 1:
        total, term = 0.0, 1.0
        if df > 1:
            term = math.cos(theta)
            total = term
            for k in range(3, df - 1, 2):
                term *= c2 * (k - 1) / k
                total += term
        a = 2 / math.pi * (theta + (s * total if df > 1 else 0.0))
    else:
        total, term = 1.0, 1.0
        for k in range(2, df - 1, 2):
            term *= c2 * (k - 1) / k
            total += term
        a = s * total
    return max(0.0, min(1.0, 1.0 - a))


def _t_ppf_fallback(q: float, df: int) -> float:
    """The ``q`` quantile (q > 0.5) of Student's t by bisection on :func:`_t_sf2`."""
    target = 2 * (1 - q)
    lo, hi = 0.0, 1.0
    while _t_sf2(hi, df) > target:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if _t_sf2(mid, df) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def t_quantile(q: float, df: int) -> float:
    """Student's t quantile (scipy's ``t.ppf`` when scipy is installed, else an exact bisection)."""
    try:
        from scipy.stats import t as student_t
    except ImportError:
        return _t_ppf_fallback(q, int(df))
    return float(student_t.ppf(q, df))


def t_pvalue(t: float, df: int) -> float:
    """Two-sided p-value of a t statistic (scipy when installed, else the exact integer-df form)."""
    try:
        from scipy.stats import t as student_t
    except ImportError:
        return _t_sf2(t, int(df))
    if math.isnan(t):
        return float("nan")
    return float(2 * student_t.sf(abs(t), df))


def _ci(values, level: float = 0.95) -> dict:
    import numpy as np

    x = np.asarray(values, dtype=float)
    n = len(x)
    mean = float(x.mean()) if n else float("nan")
    std = float(x.std(ddof=1)) if n > 1 else float("nan")
    half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "std": std, "n": n, "ci_low": mean - half, "ci_high": mean + half}


def _as_list(by) -> list[str]:
    return [by] if isinstance(by, str) else list(by)


def _scored_rows(df, columns: list, metric: str, caller: str):
    """The rows of ``df`` that have a score: no failed run, no missing ``metric``; every column checked."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{caller}: no column {missing[0]!r}; columns: {', '.join(map(str, df.columns))}")
    if "status" in df.columns:
        df = df[df["status"] != "failed"]
    return df[df[metric].notna()]


def summarize(df, by=("method", "n_shots"), metric: str = "test_acc", level: float = 0.95):
    """Mean, std (ddof=1), n and a 95 % t-interval of ``metric`` per group (over seeds).

    Failed rows (``status == "failed"``) and NaN metrics are left out; ``n`` counts what is left.
    The interval is ``mean +- t_{0.975, n-1} * std / sqrt(n)`` (NaN for n = 1).

    Example:
        >>> import pandas as pd
        >>> df = pd.DataFrame({"method": ["lora"] * 3, "n_shots": [16] * 3, "test_acc": [0.5, 0.6, 0.7]})
        >>> s = summarize(df)
        >>> s[["method", "n_shots", "n"]].values.tolist(), round(float(s["mean"][0]), 3), round(float(s["std"][0]), 3)
        ([['lora', 16, 3]], 0.6, 0.1)
        >>> round(float(s["ci_low"][0]), 4), round(float(s["ci_high"][0]), 4)   # 0.6 -+ 4.3027 * 0.1 / sqrt(3)
        (0.3516, 0.8484)
    """
    import pandas as pd

    by = _as_list(by)
    d = _scored_rows(df, by + [metric], metric, "summarize")
    rows = []
    for key, g in d.groupby(by, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(by, key)), **_ci(g[metric].to_numpy(), level)})
    return pd.DataFrame(rows, columns=by + ["mean", "std", "n", "ci_low", "ci_high"])


def _select(df, sel, name: str):
    if isinstance(sel, str):
        if "method" not in df.columns:
            raise ValueError(f"compare: {name}={sel!r} selects by method, but the frame has no 'method' column")
        mask = df["method"] == sel
    elif isinstance(sel, dict):
        mask = None
        for k, v in sel.items():
            if k not in df.columns:
                raise ValueError(f"compare: {name} selects on {k!r}, not a column; columns: {', '.join(map(str, df.columns))}")
            m = df[k].apply(lambda x, v=v: x == v).astype(bool)
            mask = m if mask is None else mask & m
        if mask is None:
            raise ValueError(f"compare: {name} is an empty selection")
    else:
        raise TypeError(f"compare: {name} must be a method name or a dict of column values, got {type(sel).__name__}")
    return df[mask]


def compare(df, a, b, by="n_shots", metric: str = "test_acc", pair_on="seed", level: float = 0.95):
    """Paired comparison ``a - b`` over seeds, per group of ``by``.

    ``a`` and ``b`` select rows by method name (``"lora"``) or by a dict of column values
    (``{"method": "lora", "method_config__r": 4}``). Rows are paired on ``pair_on`` (and ``by``);
    a pair missing on one side is left out; two rows of one side with the same key raise (the
    selection is ambiguous: add the distinguishing column to ``a`` / ``b``). Failed rows are left out.

    Returns a DataFrame per group: ``n`` pairs, ``mean_diff``, ``std_diff`` (ddof=1), ``ci_low`` /
    ``ci_high`` (95 % t-interval of the mean difference), ``t`` and ``p`` (paired two-sided t-test,
    as ``scipy.stats.ttest_rel``; NaN for fewer than two pairs or a zero-variance difference of 0).

    Example:
        >>> import pandas as pd
        >>> df = pd.DataFrame({"method": ["a"] * 3 + ["b"] * 3, "n_shots": 16, "seed": [1, 2, 3] * 2,
        ...                    "test_acc": [0.6, 0.7, 0.9, 0.5, 0.6, 0.7]})
        >>> c = compare(df, "a", "b")
        >>> int(c["n"][0]), round(float(c["mean_diff"][0]), 3), round(float(c["p"][0]), 3)   # t = 4 on 2 df
        (3, 0.133, 0.057)
    """
    import pandas as pd

    by = _as_list(by) if by is not None else []
    pair_on = _as_list(pair_on)
    keys = by + pair_on
    d = _scored_rows(df, keys + [metric], metric, "compare")
    sides = []
    for sel, name in ((a, "a"), (b, "b")):
        s = _select(d, sel, name)[keys + [metric]]
        dup = s.duplicated(keys)
        if dup.any():
            k = s[dup][keys].iloc[0].to_dict()
            raise ValueError(f"compare: {name}={sel!r} has several rows for {k}; narrow it with a dict of field values")
        sides.append(s.rename(columns={metric: name}))
    pairs = sides[0].merge(sides[1], on=keys, how="inner")
    rows = []
    groups = pairs.groupby(by, sort=True) if by else [((), pairs)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        diff = (g["a"] - g["b"]).to_numpy(dtype=float)
        stats = _ci(diff, level)
        n = stats["n"]
        if n > 1 and stats["std"] > 0:
            t = stats["mean"] / (stats["std"] / math.sqrt(n))
            p = t_pvalue(t, n - 1)
        elif n > 1 and stats["mean"] != 0:
            t, p = math.copysign(math.inf, stats["mean"]), 0.0
        else:
            t, p = float("nan"), float("nan")
        rows.append({**dict(zip(by, key)), "n": n, "mean_diff": stats["mean"], "std_diff": stats["std"],
                     "ci_low": stats["ci_low"], "ci_high": stats["ci_high"], "t": t, "p": p})
    return pd.DataFrame(rows, columns=by + ["n", "mean_diff", "std_diff", "ci_low", "ci_high", "t", "p"])
