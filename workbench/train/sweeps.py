"""Sweeps: expand a grid of run configs, run them all (resuming from the store), summarise over seeds.

Three steps, each usable alone::

    from workbench.train import RunConfig, grid, sweep, summarize, compare

    configs = grid(RunConfig(max_steps=200), method=["full", "lora"], n_shots=[16, 64], seed=[13, 21, 42])
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

from ..utils import check_threads, torch_threads
from .config import RunConfig
from .loop import metric_columns
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
        >>> base = RunConfig(max_steps=100)
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


def _run_remote(cfg_dict: dict, threads: int, hide_gpus: bool = False):
    """One run as a Ray task, in a private temporary store; returns what the driver writes.

    ``("ok", hash, records, safetensors bytes or None)`` where records are the run's JSON files and
    hash the one this worker computed, or ``("failed", error text, failure record or None)``.
    ``hide_gpus``: the task was given no GPU on a cluster that has some, so CUDA is hidden (Ray
    leaves ``CUDA_VISIBLE_DEVICES`` alone for a task with ``num_gpus=0``) and ``device=None`` trains
    on the CPU. Nothing on the worker outlives the task.
    """
    import shutil

    if hide_gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
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
        return ("ok", result.hash, records, weights.read_bytes() if weights.exists() else None)
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
        row.update(test_acc=nan, test_acc_last=nan, dev_best=nan, steps=nan, best_step=nan, trainable=nan,
                   trainable_pct=nan, wall_s=nan)
        return row
    m = result.metrics
    row["test_acc"] = m["test"]["overall"]
    row["test_acc_last"] = m["test_last"]["overall"]
    row["dev_best"] = m["dev_best"]
    row["steps"] = m.get("steps", nan)
    row["best_step"] = m.get("best_step", nan)
    for t, v in m["test"].get("per_type", {}).items():
        row[f"acc/{t}"] = v
    row.update(metric_columns(m["test"]))
    row["trainable"] = result.params["trainable"]
    row["trainable_pct"] = result.params["trainable_pct"]
    row["wall_s"] = result.timings["wall_s"]
    return row


def sweep(configs, executor: str = "local", store: RunStore | str | os.PathLike | None = None,
          workers: int | None = None, progress: bool = True, raise_on_error: bool = False,
          threads: int | None = None, ray_options=None, num_cpus: float | None = None,
          num_gpus: float | None = None, ray_address: str | None = None, on_run=None):
    """Run every config (reusing finished runs) and return one row per config as a DataFrame.

    Args:
        configs: RunConfigs (e.g. from :func:`grid`); the same config twice is trained once.
        executor: ``"local"`` (one after the other in this process), ``"processes"`` (a spawn
            process pool; each worker runs ``run(cfg, store=store)`` with ``threads`` torch
            threads, by default ``cores // workers``) or ``"ray"`` (one Ray task per config to
            train; needs ``pip install ray``). Ray: the Ray this process is already connected to
            (``ray.init(...)`` before ``sweep``), else the cluster at ``ray_address`` or
            ``$RAY_ADDRESS`` (``ray start --head`` prints it), else a local Ray started on this
            machine (it stays up for later sweeps; ``ray.shutdown()`` stops it). A cluster that
            cannot be reached raises ``ConnectionError`` within seconds, before anything runs.
            Each task trains into a private temporary store on its node and sends the run's
            records and method weights back; the driver writes them to ``store``, so the nodes
            need no shared file system, only the workbench installed and the config's backbone
            and data at the same paths. Finished runs are read from ``store`` before any task
            starts and are never sent to the cluster.
        store: a :class:`RunStore` or directory (default ``runs/`` or ``$WORKBENCH_RUNS``). It must
            be writable: an ``OSError`` is raised before the first run otherwise.
        workers: pool size for ``"processes"`` (default: ``min(#configs to train, cores)``).
        progress: a tqdm bar over runs (with done / reused / failed counts).
        raise_on_error: re-raise the first failure instead of recording it and going on.
        threads: torch threads per run: this process's own while the sweep runs (``"local"``,
            restored after; default: unchanged), per worker (``"processes"``; default
            ``cores // workers``) or per Ray task (default: the task's ``num_cpus`` rounded down, at
            least 1). The floats of a CPU run depend on it: a run trained at 1 thread reproduces
            only at 1 thread (docs/reproducibility.md).
        num_cpus: CPUs each Ray task reserves (default 1; a fraction or 0 is allowed).
        num_gpus: GPUs each Ray task reserves (default 0). A fraction shares one device:
            ``num_gpus=0.25`` runs four configs at a time on each GPU (Ray only counts; the runs
            must fit in the GPU's memory together); above 1 it must be whole. A task with a
            GPU trains on it (``RunConfig.device=None``); on a cluster with GPUs a task with
            ``num_gpus=0`` is shown no GPU and trains on its CPUs. A request that no node of the
            cluster can hold raises ``ValueError`` before anything runs.
        ray_address: the Ray cluster to use (``"host:port"`` of its head, ``"ray://host:10001"``
            for Ray Client, ``"auto"``, or ``"local"`` to start a new local Ray); default
            ``$RAY_ADDRESS``. Ignored when this process is already connected to Ray.
        ray_options: more ``.options()`` of each Ray task, a dict or a callable ``cfg -> dict``
            (per-config resources, e.g. ``lambda c: {"num_gpus": 1 if c.method == "full" else 0.25}``,
            ``max_retries``, ``resources``, ...); ``num_cpus`` / ``num_gpus`` given to ``sweep``
            override its entries. ``num_cpus``, ``num_gpus``, ``ray_address`` and ``ray_options``
            are for ``executor="ray"`` only (a ``ValueError`` otherwise).
        on_run: called in this process as ``on_run(config, run_hash, result)`` for each run trained
            now, as soon as it is in the store (not for reused or failed runs), so that what the
            caller records about a run survives a sweep that is interrupted later.

    Returns:
        A pandas DataFrame, one row per config in the order given: every RunConfig field, a
        ``method_config__<key>`` column per method option set in any config (its resolved value),
        ``run`` (the hash), ``status`` (``"done"`` trained now, ``"reused"`` read from the store,
        ``"failed"``), ``error`` (``"Type: message"`` of a failure, else None), ``test_acc``,
        ``test_acc_last``, ``dev_best``, ``steps``, ``best_step``, ``acc/<question type>``, ``trainable``, ``trainable_pct``
        and ``wall_s`` (the run's own wall time, also for reused runs). A failed row has NaN metrics.

    Example:
        >>> df = sweep(grid(RunConfig(max_steps=100), seed=[13, 21]), progress=False)   # doctest: +SKIP
        >>> df[["seed", "status", "test_acc"]]                                        # doctest: +SKIP
        >>> sweep(grid(RunConfig(max_steps=100), seed=[13, 21])).status.tolist()          # doctest: +SKIP
        ['reused', 'reused']
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from .loop import stored_run

    if executor not in EXECUTORS:
        raise ValueError(f"sweep: executor must be one of {list(EXECUTORS)}, got {executor!r}")
    if on_run is not None and not callable(on_run):
        raise TypeError(f"sweep: on_run must be a callable (config, run_hash, result), got {type(on_run).__name__}")
    configs = list(configs)
    bad = [type(c).__name__ for c in configs if not isinstance(c, RunConfig)]
    if bad:
        raise TypeError(f"sweep: configs must be RunConfigs, got {bad[0]}")
    check_threads(threads, "sweep: threads")
    ray = None
    resources = _check_ray_args(executor, num_cpus, num_gpus, ray_address, ray_options)
    if executor == "ray":
        ray = _import_ray()
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
        elif (stored := stored_run(h, store)) is not None:
            finish(i, "reused", stored, None)
        else:
            todo[h] = [i]

    def settle(h: str, status: str, result, error: str | None):
        first, *dups = todo[h]
        finish(first, status, result, error)
        if status == "done" and on_run is not None:
            on_run(configs[first], h, result)
        for j in dups:  # the same config again: the run just made (or the same failure)
            finish(j, "reused" if status != "failed" else "failed", result, error)

    try:
        if executor == "local":
            # Honoured here too (it once was not: a local 1-thread sweep trained at the process's
            # count, other floats than the bundles' 1-thread runs).
            with torch_threads(threads):
                _sweep_local(configs, todo, store, raise_on_error, settle)
        elif executor == "processes" and todo:
            _sweep_processes(configs, todo, store, workers, threads, raise_on_error, settle)
        elif executor == "ray" and todo:
            _sweep_ray(ray, configs, todo, store, threads, ray_options, resources, ray_address,
                       raise_on_error, settle)
    finally:
        bar.close()
    return pd.DataFrame(rows)


def _sweep_local(configs, todo, store, raise_on_error, settle):
    from .loop import run

    for h, idx in todo.items():
        try:
            result = run(configs[idx[0]], store=store)
        except Exception as e:
            if raise_on_error:
                raise
            settle(h, "failed", None, _error_text(e))
        else:
            settle(h, "reused" if result.reused else "done", result, None)


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


# ------------------------------------------------------------------------------------------- Ray
# ray.init can wait minutes on an address where no Ray answers; these bound the checks made first.
_RAY_CONNECT_TIMEOUT_S = 5.0  # a TCP connection to the cluster's address
_RAY_PROBE_TIMEOUT_S = 8.0  # then Ray's own GCS client: does a Ray head answer there?
_RAY_HINT = ("Start a cluster with `ray start --head` on its head node (it prints the address to set as "
             "RAY_ADDRESS or pass as ray_address=); or, to use a local Ray on this machine, unset RAY_ADDRESS "
             "and drop ray_address= (sweep then starts one), or call ray.init(num_cpus=...) before sweep")


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ImportError("sweep(executor='ray') needs Ray: pip install ray "
                          "(or pip install 'workbench[distributed]')") from None
    return ray


def _is_amount(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


def _check_ray_args(executor, num_cpus, num_gpus, ray_address, ray_options) -> dict:
    """The per-task resources given to sweep, checked before anything runs (empty if none)."""
    given = {k: v for k, v in (("num_cpus", num_cpus), ("num_gpus", num_gpus), ("ray_address", ray_address),
                               ("ray_options", ray_options)) if v is not None}
    if given and executor != "ray":
        raise ValueError(f"sweep: {', '.join(given)} {'is' if len(given) == 1 else 'are'} for executor='ray' "
                         f"(executor={executor!r}; the process pool takes workers= and threads=)")
    out = {}
    for name, value in (("num_cpus", num_cpus), ("num_gpus", num_gpus)):
        if value is None:
            continue
        if not _is_amount(value):
            raise ValueError(f"sweep: {name} must be a number >= 0, got {value!r}")
        if name == "num_gpus" and value > 1 and value != int(value):
            raise ValueError(f"sweep: num_gpus={value!r}: GPUs above 1 must be whole (a fraction below 1 shares "
                             f"one device: num_gpus=0.25 is four runs per GPU)")
        out[name] = value
    if ray_address is not None and (not isinstance(ray_address, str) or not ray_address.strip()):
        raise ValueError(f"sweep: ray_address must be a non-empty string such as '10.0.0.1:6379', got {ray_address!r}")
    if ray_options is not None and not (isinstance(ray_options, dict) or callable(ray_options)):
        raise TypeError(f"sweep: ray_options must be a dict or a callable cfg -> dict, got {type(ray_options).__name__}")
    return out


def _split_host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``host:port`` / ``[v6]:port`` / ``scheme://host:port``; None if it has no port."""
    rest = address.split("://", 1)[-1].split("/", 1)[0]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    return host.strip("[]"), int(port)


def _reachable(host: str, port: int, timeout: float) -> str | None:
    """None if a TCP connection to ``host:port`` opens within ``timeout`` seconds, else why not."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except OSError as e:
        return e.strerror or str(e)


def _probe_gcs(address: str, timeout: float) -> str | None:
    """None if a Ray head (its GCS) answers at ``host:port`` within ``timeout`` seconds, else why not.

    Ray's own client, in a daemon thread so that a silent address is given up after ``timeout``
    (the client itself waits about 40 s). None too when the client is not there to ask.
    """
    import threading

    try:
        from ray._raylet import GcsClient
    except Exception:  # noqa: BLE001 - a private class that moved: ray.init will tell
        return None
    box = {}

    def probe():
        try:
            GcsClient(address=address)
            box["ok"] = True
        except Exception as e:  # noqa: BLE001 - reported to the caller
            box["error"] = str(e) or type(e).__name__

    t = threading.Thread(target=probe, name="workbench-ray-probe", daemon=True)
    t.start()
    t.join(timeout)
    if "ok" in box:
        return None
    if "error" in box:
        return f"a connection opens but no Ray head answers: {box['error']}"
    return f"a connection opens but no Ray head answers within {timeout:g} s"


def _is_auth_error(text: str) -> bool:
    t = text.lower()
    return "authtoken" in t or "authenticat" in t


def _connect_ray(ray, address: str | None) -> None:
    """Connect this process to Ray (unless it already is): the cluster at ``address`` /
    ``$RAY_ADDRESS`` (or found by ``"auto"``), checked reachable first because ``ray.init`` can wait
    minutes on an address where nothing answers, else a new local Ray."""
    if ray.is_initialized():
        return
    env = os.environ.get("RAY_ADDRESS") or None
    given = address or env
    source = "ray_address=" if address else ("$RAY_ADDRESS" if env else None)
    target = given
    if given is None or "://" not in given:
        # What ray.init will connect to: None (start a local Ray), or host:port, "auto" and None
        # resolved as Ray does (the cluster of the last `ray start` on this machine, if any).
        try:
            from ray._private.services import canonicalize_bootstrap_address

            target = canonicalize_bootstrap_address(given)
        except ConnectionError as e:  # "auto" and no cluster on this machine
            raise ConnectionError(f"sweep: no Ray cluster found for address {given!r} ({source or 'the default'}): "
                                  f"{e}; nothing was run. {_RAY_HINT}.") from None
        except ValueError as e:
            raise ValueError(f"sweep: the Ray address {given!r} ({source}) is not valid ({e}): "
                             f"give 'host:port', 'ray://host:port', 'auto' or 'local'") from None
        except Exception:  # noqa: BLE001 - a private Ray helper that moved: check the address as given
            target = given if given not in (None, "auto", "local") else None
        if target is not None and source is None:
            source = "the last `ray start` on this machine"
    if target is not None:
        parsed = _split_host_port(target)
        if parsed is None:
            raise ValueError(f"sweep: the Ray address {target!r} ({source}) has no port: give 'host:port' "
                             f"(the head node's GCS port, 6379 by default) or 'ray://host:port'")
        why = _reachable(*parsed, _RAY_CONNECT_TIMEOUT_S)
        if why is None and "://" not in target:  # a GCS address (Ray Client's server is another service)
            why = _probe_gcs(target, _RAY_PROBE_TIMEOUT_S)
            if why is not None and _is_auth_error(why):
                if given in (None, "auto"):
                    why = None  # a head answers; ray.init turns token authentication on for a cluster it finds
                else:
                    import re

                    detail = re.search(r"authentication token[^.;]*", why, re.IGNORECASE)
                    raise ConnectionError(
                        f"sweep: the Ray cluster at {given} ({source}) answers but refuses this process: it uses "
                        f"token authentication ({detail.group(0) if detail else why}); nothing was run. Set "
                        f"RAY_AUTH_MODE=token here and give the cluster's token (RAY_AUTH_TOKEN, or the file "
                        f"~/.ray/auth_token; `ray get-auth-token` on the head prints it)")
        if why is not None:
            shown = given if given and given != "auto" else target
            raise ConnectionError(f"sweep: the Ray cluster at {shown} ({source}) cannot be reached ({why}); "
                                  f"nothing was run. {_RAY_HINT}.")
    try:
        ray.init(address=given, ignore_reinit_error=True, log_to_driver=False)
    except ConnectionError as e:
        raise ConnectionError(f"sweep: could not connect to the Ray cluster at {given} ({source}): {e}; "
                              f"nothing was run. {_RAY_HINT}.") from e


def _task_options(cfg, ray_options, resources) -> dict:
    opts = ray_options(cfg) if callable(ray_options) else dict(ray_options or {})
    if not isinstance(opts, dict):
        raise TypeError(f"sweep: ray_options(cfg) must return a dict, got {type(opts).__name__}")
    opts = {"num_cpus": 1, **opts, **resources}
    for name in ("num_cpus", "num_gpus"):
        if name in opts and opts[name] is not None and not _is_amount(opts[name]):
            raise ValueError(f"sweep: Ray task {name} must be a number >= 0, got {opts[name]!r}")
    return opts


def _check_cluster_fits(ray, options: list[dict]) -> bool:
    """Raise if some task asks for more CPUs / GPUs than any live node has (it would wait forever);
    return whether the cluster has GPUs."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive", True)]
    for key, res in (("num_cpus", "CPU"), ("num_gpus", "GPU")):
        want = max((o.get(key) or 0 for o in options), default=0)
        most = max((n.get(res, 0) for n in nodes), default=0)
        if want > most:
            total = sum(n.get(res, 0) for n in nodes)
            raise ValueError(f"sweep: a Ray task asks for {key}={want:g} but no node of the cluster has that many "
                             f"(largest node: {most:g} {res}, {total:g} in all on {len(nodes)} node(s)); it could "
                             f"never start. Lower {key}, or add a node with more {res}s "
                             f"(ray start --address=<head> --num-{res.lower()}s=...); nothing was run")
    return any(n.get("GPU", 0) > 0 for n in nodes)


def _sweep_ray(ray, configs, todo, store, threads, ray_options, resources, address, raise_on_error, settle):
    from .loop import load_run

    options = {h: _task_options(configs[idx[0]], ray_options, resources) for h, idx in todo.items()}
    _connect_ray(ray, address)
    has_gpus = _check_cluster_fits(ray, list(options.values()))
    remote = ray.remote(_run_remote)
    refs = {}
    for h, idx in todo.items():
        opts = dict(options[h])
        hide_gpus = has_gpus and not opts.get("num_gpus")
        if hide_gpus:  # CUDA hidden in this worker: let it exit after the task, not serve a GPU task later
            opts.setdefault("max_calls", 1)
        n_threads = threads if threads is not None else max(1, int(opts.get("num_cpus") or 1))
        refs[remote.options(**opts).remote({**configs[idx[0]].to_dict(), "quiet": True}, n_threads, hide_gpus)] = h
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
            if out[0] == "ok" and out[1] != h:
                why = (f"RuntimeError: the Ray worker computed hash {out[1]} for run {h}: the backbone "
                       f"or data files differ between this machine and the worker's node")
                out = ("failed", why, None)
            if out[0] == "ok":
                _, _, records, weights = out
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
