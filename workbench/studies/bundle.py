"""Study bundles: a study's runs exported under ``results/<name>/``, read back as a run store, re-verified.

A bundle is a compact copy of a study's runs that is committed with the code, so that a notebook
shows full-protocol, many-seed results without training them under ``pytest --nbval``. Layout::

    results/<name>/
        study.json        the study: description, the grid's run hashes (in order), which runs are
                          present, which keep weights; what is missing (so completeness is known)
        provenance.json   where the runs come from: the commit and machine of each run's training
                          (torch version, device, CPU model, torch threads, ATen CPU capability,
                          the pinning variables MKL_CBWR / ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA
                          where set), its wall time, dates
        <hash>/           one run, exactly as in a run store (:mod:`workbench.train.store`):
            config.json identity.json metrics.json history.json params.json timings.json
            method.safetensors   only for the runs the study keeps weights of (``keep_weights``)
            predictions.json     only for the runs the study keeps predictions of (default: none)
            DONE                 the manifest (size and SHA-256 of each file above)

So ``RunStore("results/<name>")`` reads it as it is; :func:`load_study` returns a
:class:`StudyStore`: the bundle's runs are reused by ``run(cfg, store=...)`` and ``sweep``, and
anything the bundle does not hold is trained into (and reused from) a writable run store
(default ``runs/``), never into the committed bundle. A run is only reused when the current code
computes the same hash for its config (the hash covers the backbone checkpoint's content, the
method's resolved config and the protocol's budget), so a bundle never stands in for a run the
code would compute differently.

Bundles may be partial: :func:`export_study` writes whatever of the grid the store holds and says
how many of the grid's runs are present; running the study again later and exporting again
completes it (runs already in the bundle are kept with their provenance).

:func:`verify_study` re-trains a sample of a bundle's runs into a temporary store and compares
their metrics with the bundle's: exactly (``==`` on every metric and the whole training history)
when the run's recorded machine fingerprint -- torch version, ATen CPU capability, torch threads,
device type, the pinning variables (:data:`PINNING_ENV`) -- matches this machine's
and the device is the CPU, and within :data:`TOLERANCE` on the headline metrics otherwise (see
docs/studies.md for why).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import re
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..train import DamagedRunError, DamagedRunWarning, RunConfig, RunStore, load_run
from ..train.loop import config_of
from ..train.store import DONE
from ..train.sweeps import t_quantile
from ..utils import (
    MKL_PATH_KEYS,
    PINNED_CPU_ENV,
    atomic_write,
    cpu_model,
    mkl_code_path,
    pick_device,
    repo_root,
    torch_threads,
)
from .study import PROVENANCE_DIR, Study, get_study

BUNDLE_FORMAT = 1
STUDY_FILE = "study.json"
PROVENANCE_FILE = "provenance.json"
WEIGHTS_FILE = "method.safetensors"
PREDICTIONS = "predictions"
# Environment variables that pin CPU kernels (oneMKL's conditional numerical reproducibility, the
# ATen dispatch level, oneDNN's instruction set): recorded when set; part of the machine fingerprint.
PINNING_ENV = tuple(PINNED_CPU_ENV)
# What must match for a re-trained run to be expected bit-identical.
# The CPU model is part of it: the AVX2 pinning (utils.pin_cpu_numerics) is meant to make x86 CPUs
# agree bit for bit, but until that is checked on each pair of CPU models a re-run on another
# model is held to the tolerance, not to equality (docs/reproducibility.md).
FINGERPRINT = ("torch", "cpu_capability", "threads", "device", "env", "cpu_model")
# Absolute tolerance on the headline metrics (test, test_last, dev_best) when the fingerprint
# differs, per task metric: accuracies in [0, 1]; CIDEr-D on its own scale (docs/studies.md).
TOLERANCE = {"vqa": 0.02, "exact": 0.02, "cider": 0.05}
HEADLINE = ("test", "test_last", "dev_best")
# On another machine, the relative difference the first evaluation's training loss (the mean over
# the first eval_every steps) may show. Measured between an AMD EPYC and an Intel Xeon, both pinned
# to AVX2, over 15 bundle runs of 13 methods: at most 1.2e-5, and 3.0e-3 for FourierFT (its FFT);
# a change to what training computes moves it by far more (docs/studies.md).
EARLY_RTOL = 1e-2


def results_root() -> Path:
    """``$WORKBENCH_RESULTS`` if set, else ``<repo>/results``."""
    return Path(os.environ.get("WORKBENCH_RESULTS", repo_root() / "results"))


def bundle_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    """The bundle folder of study ``name``: ``<root>/<name>`` (root: :func:`results_root`)."""
    return (Path(root) if root is not None else results_root()) / name


def bundles(root: str | os.PathLike | None = None) -> list[str]:
    """Names of the bundles under ``root`` (folders holding ``study.json``), sorted."""
    root = Path(root) if root is not None else results_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / STUDY_FILE).is_file())


# ---------------------------------------------------------------------------------------- provenance
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@functools.lru_cache(maxsize=1)
def git_commit() -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the checkout the workbench runs from; ``(None, None)`` outside git."""
    root = repo_root()
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit or None, bool(status.strip())


def _cpu_capability() -> str | None:
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return None


def _device_name(device: str | None) -> str:
    import torch

    dev = pick_device(device)
    if dev.type == "cuda":
        with contextlib.suppress(Exception):
            return f"cuda ({torch.cuda.get_device_name(dev)})"
    return dev.type


def current_machine(threads: int | None = None, device: str | None = None) -> dict:
    """This machine as the bundle records it: the fingerprint (:data:`FINGERPRINT`) and details.

    ``threads``: the torch threads a run uses (default: this process's); ``device``: a run's
    ``RunConfig.device`` (None: CUDA if available, else CPU).
    """
    import platform

    import torch

    return {
        "torch": torch.__version__,
        "cpu_capability": _cpu_capability(),
        "threads": int(threads) if threads else torch.get_num_threads(),
        "device": _device_name(device),
        "env": {k: os.environ[k] for k in PINNING_ENV if k in os.environ},
        "cpu_model": cpu_model(),
        **mkl_code_path(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def fingerprint(machine: dict | None) -> dict | None:
    """The part of a machine record that decides whether a re-trained run must be identical
    (the device by its type: ``cpu`` / ``cuda``)."""
    if not machine:
        return None
    out = {k: machine.get(k, {} if k == "env" else None) for k in FINGERPRINT}
    out["device"] = _device_type(out["device"])
    return out


def _device_type(device) -> str | None:
    return None if device is None else str(device).split(" ")[0].split(":")[0]


def run_machine(timings: dict, record: dict | None = None) -> dict | None:
    """The machine a run was trained on: what the trainer recorded in ``timings["numerics"]``
    (torch, CPU capability, threads, pinning variables, CPU model; with ``timings["device"]``),
    completed by :func:`~workbench.studies.run_study`'s record (``record["machine"]``); None when
    neither says."""
    from_record = dict((record or {}).get("machine") or {})
    numerics = timings.get("numerics") if isinstance(timings, dict) else None
    if not isinstance(numerics, dict):
        return from_record or None
    machine = {**from_record,
               "torch": numerics.get("torch"), "cpu_capability": numerics.get("cpu_capability"),
               "threads": numerics.get("threads"),
               "env": {k: numerics[k] for k in PINNING_ENV if numerics.get(k) is not None},
               "cpu_model": numerics.get("cpu_model") or from_record.get("cpu_model"),
               # the MKL code path read from MKL (utils.mkl_code_path; diagnosis only: the CPU model
               # already tells machines apart), where the trainer recorded it
               **{k: numerics[k] for k in MKL_PATH_KEYS if k in numerics}}
    device = timings.get("device")
    if _device_type(from_record.get("device")) != _device_type(device) or device is None:
        machine["device"] = device
    return machine


def machine_differences(recorded: dict | None, here: dict) -> list[str]:
    """What differs between a run's recorded machine and ``here`` (``["unrecorded"]`` without a record)."""
    if not recorded:
        return ["the machine that trained the run is not recorded"]
    a, b = fingerprint(recorded), fingerprint(here)
    return [f"{k}: {a[k]!r} (bundle) vs {b[k]!r} (here)" for k in FINGERPRINT if a[k] != b[k]]


def training_record(machine: dict | None, executor: str, code: tuple) -> dict:
    """What :func:`~workbench.studies.run_study` records beside a run it trained.

    ``code``: ``(commit, dirty)`` (:func:`git_commit`) of the code that trained it, taken when the
    sweep started (the workers import it then; a later commit does not change what they run).
    """
    commit, dirty = code
    return {"machine": machine, "executor": executor, "trained": _now(), "commit": commit, "dirty": dirty}


# ------------------------------------------------------------------------------------------ errors
class DamagedBundleError(ValueError):
    """A bundle that cannot be read whole; ``problems`` lists ``{"run", "file", "reason"}`` (run None
    for the bundle's own files), and the message names every run and file."""

    def __init__(self, path, problems: list[dict]):
        self.path, self.problems = Path(path), problems
        shown = [(f"run {p['run']}: " if p.get("run") else "") + f"{p['file']}: {p['reason']}" for p in problems[:5]]
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        super().__init__(f"damaged study bundle {self.path}: " + "; ".join(shown) + more +
                         f". Restore it from git (git checkout -- {self.path}), or run and export the study again")

    @property
    def runs(self) -> list[str]:
        return [p["run"] for p in self.problems if p.get("run")]


def _run_problem(e: DamagedRunError) -> dict:
    run = e.path.name
    if run.startswith("."):  # an aside copy: .<hash>.old-xxxx
        run = run[1:].split(".", 1)[0]
    return {"run": run, "file": str(e.path / e.file) if e.file else str(e.path), "reason": e.reason}


def _read_json(path: Path, bundle: Path) -> dict | None:
    """A bundle-level JSON file (None when absent); DamagedBundleError naming it when unreadable."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise DamagedBundleError(bundle, [{"run": None, "file": str(path), "reason": f"not valid JSON ({e})"}]) from None
    if not isinstance(data, dict):
        raise DamagedBundleError(bundle, [{"run": None, "file": str(path), "reason": "not a JSON object"}])
    return data


# -------------------------------------------------------------------------------------- the store
class StudyStore(RunStore):
    """A study's bundle read as a run store, over a writable store for everything else.

    Reads (``is_finished``, ``read``, ``locate``, ``load_run``, ``load_results``) serve the bundle's
    runs first; a run the bundle does not hold (or holds damaged, when not strict) comes from the
    writable ``overlay`` store, where ``run`` and ``sweep`` write (``root`` is the overlay's root).
    ``scan`` / ``finished`` / :func:`~workbench.train.load_results` list the bundle's runs.

    Attributes: ``bundle`` (the bundle as a plain :class:`RunStore`), ``overlay``, ``name``,
    ``info`` (``study.json``), ``provenance`` (``provenance.json``), ``damaged`` (``{hash:
    DamagedRunError}``), and the completeness: ``grid``, ``runs``, ``missing``, ``complete``,
    ``completeness``.
    """

    def __init__(self, bundle: str | os.PathLike, overlay: RunStore | str | os.PathLike | None = None, *,
                 name: str | None = None, strict: bool = True):
        overlay = overlay if isinstance(overlay, RunStore) else RunStore(overlay)
        super().__init__(overlay.root)
        self.overlay = overlay
        self.bundle = RunStore(bundle)
        self.name = name or self.bundle.root.name
        self.damaged: dict[str, DamagedRunError] = {}
        problems = []
        self.info = self.provenance = None
        for attr, fname in (("info", STUDY_FILE), ("provenance", PROVENANCE_FILE)):
            try:
                setattr(self, attr, _read_json(self.bundle.root / fname, self.bundle.root))
            except DamagedBundleError as e:
                problems += e.problems
        runs, stray = self.bundle.scan()
        self._bundle_runs = set(runs)
        for h in runs:
            try:
                load_run(h, self.bundle)
            except DamagedRunError as e:
                self.damaged[h] = e
                problems.append(_run_problem(e))
            except FileNotFoundError:
                self._bundle_runs.discard(h)
        for p in stray:
            problems.append({"run": None, "file": str(p), "reason": f"a folder holding {DONE} that is not a run"})
        if problems:
            if strict:
                raise DamagedBundleError(self.bundle.root, problems)
            for p in problems:
                where = (f"run {p['run']}: " if p.get("run") else "") + p["file"]
                warnings.warn(f"damaged study bundle {self.bundle.root}: {where}: {p['reason']}; "
                              "such a run is trained again when needed (into the writable store)",
                              DamagedRunWarning, stacklevel=3)

    # ------------------------------------------------------------------ the RunStore interface
    def _from_bundle(self, run_hash: str) -> bool:
        return run_hash in self._bundle_runs and run_hash not in self.damaged

    def locate(self, run_hash: str):
        return self.bundle.locate(run_hash) if self._from_bundle(run_hash) else super().locate(run_hash)

    def is_finished(self, run_hash: str) -> bool:
        return self._from_bundle(run_hash) or super().is_finished(run_hash)

    def read(self, run_hash: str) -> dict:
        if self._from_bundle(run_hash):
            return self.bundle.read(run_hash)
        if run_hash in self.damaged and not super().is_finished(run_hash):
            raise self.damaged[run_hash]
        return super().read(run_hash)

    def scan(self):
        return sorted(self._bundle_runs), []

    # ------------------------------------------------------------------------- completeness
    @property
    def grid(self) -> list[str]:
        """The study's run hashes when it was exported (``study.json``)."""
        return list((self.info or {}).get("grid", []))

    @property
    def runs(self) -> list[str]:
        """The grid's runs the bundle holds whole, in grid order."""
        return [h for h in self.grid if self._from_bundle(h)]

    @property
    def missing(self) -> list[str]:
        """The grid's runs the bundle does not hold (or holds damaged)."""
        return [h for h in self.grid if not self._from_bundle(h)]

    @property
    def complete(self) -> bool:
        return bool(self.grid) and not self.missing

    @property
    def completeness(self) -> str:
        """``"12 of 252 runs (partial)"`` / ``"252 of 252 runs (complete)"``."""
        n, total = len(self.runs), len(self.grid)
        return f"{n} of {total} runs ({'complete' if self.complete else 'partial'})"

    def machine_of(self, run_hash: str) -> dict | None:
        """The recorded machine that trained ``run_hash`` (None when not recorded)."""
        prov = self.provenance or {}
        entry = prov.get("runs", {}).get(run_hash) or {}
        idx = entry.get("machine")
        machines = prov.get("machines", [])
        return machines[idx] if isinstance(idx, int) and 0 <= idx < len(machines) else None

    def stale(self) -> dict:
        """How the bundle compares with the study's current code (the study must be registered):
        ``{"outdated": bundle runs no longer in the grid, "new": grid runs the export did not know}``."""
        current = set(get_study(self.name).hashes())
        return {"outdated": sorted(self._bundle_runs - current), "new": sorted(current - set(self.grid))}

    def __repr__(self) -> str:
        return f"StudyStore({self.name!r}: {self.completeness}, bundle {self.bundle.root}, overlay {self.root})"


def load_study(name: str | Study, root: str | os.PathLike | None = None,
               store: RunStore | str | os.PathLike | None = None, strict: bool = True) -> StudyStore:
    """The bundle of study ``name`` read as a run store (:class:`StudyStore`).

    ``run(cfg, store=load_study(name))`` and ``sweep(..., store=...)`` reuse the bundle's runs and
    train anything else into ``store`` (default ``runs/`` or ``$WORKBENCH_RUNS``);
    ``load_results(load_study(name))`` is the bundle's table. ``.completeness`` says how many of the
    grid's runs the bundle holds.

    Args:
        name: the study (its bundle is ``<root>/<name>``; the study need not be registered).
        root: the folder of bundles (default ``results/`` or ``$WORKBENCH_RESULTS``).
        store: the writable run store for runs the bundle does not hold.
        strict: a damaged bundle (a run's file truncated, edited, missing or not valid JSON; an
            unreadable ``study.json``) raises :class:`DamagedBundleError` naming every run and file;
            with ``strict=False`` it warns (:class:`~workbench.train.DamagedRunWarning`) and such
            runs are trained again when needed.

    Raises:
        FileNotFoundError: there is no bundle for ``name``.
    """
    name = name.name if isinstance(name, Study) else name
    path = bundle_dir(name, root)
    if not path.is_dir():
        hint = f"python -m workbench.studies run {name} && python -m workbench.studies export {name}"
        raise FileNotFoundError(f"no bundle for study {name!r} at {path}; make one with `{hint}`")
    if not (path / STUDY_FILE).is_file():
        problem = {"run": None, "file": str(path / STUDY_FILE), "reason": "missing (the export did not finish)"}
        if strict:
            raise DamagedBundleError(path, [problem])
        warnings.warn(f"damaged study bundle {path}: {problem['file']}: {problem['reason']}", DamagedRunWarning,
                      stacklevel=2)
    return StudyStore(path, store, name=name, strict=strict)


# ------------------------------------------------------------------------------------------ export
@dataclass
class ExportReport:
    """What :func:`export_study` did; ``str()`` is the CLI's summary."""

    name: str
    path: Path
    grid: int
    runs: int
    added: list = field(default_factory=list)
    updated: list = field(default_factory=list)
    kept: list = field(default_factory=list)
    removed: list = field(default_factory=list)
    dropped: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    shared: list = field(default_factory=list)  # taken from another study's bundle
    weights: int = 0
    size_bytes: int = 0

    @property
    def complete(self) -> bool:
        return self.runs == self.grid

    def __str__(self) -> str:
        head = f"study {self.name}: exported {self.runs} of {self.grid} runs to {self.path} " + (
            "(complete)" if self.complete else
            f"(partial: {len(self.missing)} missing; complete it with `python -m workbench.studies run {self.name}` "
            "and export again)")
        parts = [f"{len(self.added)} added", f"{len(self.updated)} updated", f"{len(self.kept)} kept"]
        if self.shared:
            parts.append(f"{len(self.shared)} from other studies' bundles")
        if self.removed:
            parts.append(f"{len(self.removed)} removed (no longer in the study's grid)")
        if self.dropped:
            parts.append(f"{len(self.dropped)} damaged dropped ({', '.join(self.dropped)})")
        return head + "\n  " + ", ".join(parts) + f"; {self.weights} with weights; {_size(self.size_bytes)}"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _whole(store: RunStore, run_hash: str):
    """``(True, None)`` if the store holds the run whole, ``(False, error or None)`` otherwise."""
    if not store.is_finished(run_hash):
        return False, None
    try:
        load_run(run_hash, store)
    except DamagedRunError as e:
        return False, e
    except FileNotFoundError:
        return False, None
    return True, None


def held_elsewhere(name: str, hashes, root: str | os.PathLike | None = None) -> dict[str, RunStore]:
    """Which of ``hashes`` another study's committed bundle under ``root`` holds whole (studies share
    runs by hash): ``{hash: that bundle}``. :func:`export_study` takes such a run from there, so
    :func:`~workbench.studies.run_study` does not train it and :func:`study_status` does not count
    it as to do."""
    hashes = list(dict.fromkeys(hashes))
    if not hashes:
        return {}
    others = [RunStore(bundle_dir(n, root)) for n in bundles(root) if n != name]
    out = {}
    for h in hashes:
        where = next((o for o in others if _whole(o, h)[0]), None)
        if where is not None:
            out[h] = where
    return out


def _files(store: RunStore, run_hash: str) -> set[str]:
    path = store.locate(run_hash)
    return {p.name for p in path.iterdir()} if path is not None else set()


def _publish(bundle: RunStore, source: RunStore, run_hash: str, weights: bool, predictions: bool) -> None:
    """Copy a run from ``source`` into the bundle: its JSON records (predictions only if asked) and,
    if asked and present, its method weights; published atomically with a fresh manifest."""
    records = source.read(run_hash)
    if not predictions:
        records.pop(PREDICTIONS, None)
    tensors = None
    if weights:
        f = source.locate(run_hash) / WEIGHTS_FILE
        if f.is_file():
            from safetensors.torch import load as load_safetensors

            tensors = load_safetensors(f.read_bytes())
    bundle.write(run_hash, records, tensors=tensors)


def _read_record(store: RunStore, run_hash: str) -> dict | None:
    """The training record run_study left beside a run (None when there is none or it is unreadable)."""
    f = store.root / PROVENANCE_DIR / f"{run_hash}.json"
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@contextlib.contextmanager
def _export_lock(store: RunStore, name: str):
    """One export of a study at a time (the lock lives in the source store's ``.locks``)."""
    try:
        cm = store.lock(f"study-{name}")
        cm.__enter__()
    except OSError:  # a read-only store: go on without the lock
        yield
        return
    try:
        yield
    finally:
        cm.__exit__(None, None, None)


def export_study(name: str | Study, store: RunStore | str | os.PathLike | None = None,
                 root: str | os.PathLike | None = None) -> ExportReport:
    """Write (or update) the bundle of study ``name`` under ``<root>/<name>`` from the run store.

    Every run of the study's grid that ``store`` or the existing bundle holds whole is in the
    bundle afterwards: config, identity, metrics, history, params, timings; method weights for the
    runs ``study.keep_weights(cfg)`` selects, predictions for ``study.keep_predictions(cfg)``.
    A grid run that neither holds but another study's bundle under ``root`` does (studies share
    runs by hash) is taken from there, with its provenance (``report.shared``), not trained again.
    Runs already in the bundle are kept as they are (with their provenance); runs of an older grid
    are removed; a damaged bundle run is replaced from the store, or dropped (and reported) when the
    store does not hold it. A partial export is fine: ``study.json`` records the whole grid, the
    report says how many of its runs are present. Each run is published atomically, then
    ``study.json`` and ``provenance.json``.

    Args:
        name: a registered study.
        store: the run store the study was run into (default ``runs/`` or ``$WORKBENCH_RUNS``).
        root: the folder of bundles (default ``results/`` or ``$WORKBENCH_RESULTS``).

    Raises:
        ValueError: neither the store nor the bundle holds any run of the study's grid.
        DamagedBundleError: the existing bundle's ``study.json`` / ``provenance.json`` cannot be read.
    """
    study = get_study(name)
    src = store.overlay if isinstance(store, StudyStore) else (store if isinstance(store, RunStore) else RunStore(store))
    target = bundle_dir(study.name, root)
    by_hash: dict[str, RunConfig] = {}
    for cfg in study.configs():
        by_hash.setdefault(cfg.hash, cfg)
    with _export_lock(src, study.name):
        old_prov = _read_json(target / PROVENANCE_FILE, target) or {}
        bundle = RunStore(target)
        _tidy(bundle)

        # Decide first, so that nothing is written when there is nothing to export.
        plan = {}
        for h in by_hash:
            in_b, b_err = _whole(bundle, h)
            in_s, _ = _whole(src, h)
            plan[h] = (in_b, b_err, in_s)
        held = held_elsewhere(study.name, [h for h, (in_b, _, in_s) in plan.items() if not (in_b or in_s)], root)
        plan = {h: (*v, held.get(h)) for h, v in plan.items()}
        if not any(in_b or in_s or other for in_b, _, in_s, other in plan.values()):
            raise ValueError(f"study {study.name!r}: no run of its grid ({len(by_hash)} runs) is in the store "
                             f"{src.root} or in the bundle {target}; run `python -m workbench.studies run "
                             f"{study.name}` first (or pass the store it was run into)")

        machines: list[dict] = []
        runs_prov: dict[str, dict] = {}

        def machine_index(machine):
            if not machine:
                return None
            if machine not in machines:
                machines.append(machine)
            return machines.index(machine)

        def entry_in(prov: dict, h):
            """Run ``h``'s entry in a bundle's provenance (``provenance.json``) and its machine."""
            runs = prov.get("runs") if isinstance(prov.get("runs"), dict) else {}
            known = prov.get("machines") if isinstance(prov.get("machines"), list) else []
            entry = dict(runs.get(h) or {})
            idx = entry.get("machine")
            return entry, known[idx] if isinstance(idx, int) and 0 <= idx < len(known) else None

        report = ExportReport(study.name, target, len(by_hash), 0)
        other_prov: dict = {}  # another bundle's provenance.json, read once
        for h, cfg in by_hash.items():
            in_b, b_err, in_s, other = plan[h]
            want_w, want_p = bool(study.keep_weights(cfg)), bool(study.keep_predictions(cfg))
            source = None
            if in_b:
                have = _files(bundle, h)
                s_have = _files(src, h) if in_s else set()
                needs_src = ((want_w and WEIGHTS_FILE not in have and WEIGHTS_FILE in s_have)
                             or (want_p and f"{PREDICTIONS}.json" not in have and f"{PREDICTIONS}.json" in s_have))
                surplus = ((WEIGHTS_FILE in have and not want_w) or (f"{PREDICTIONS}.json" in have and not want_p))
                if needs_src:
                    source = src
                elif surplus:
                    source = bundle
                (report.updated if source is not None else report.kept).append(h)
            elif in_s:
                source = src
                (report.updated if b_err is not None else report.added).append(h)
            elif other is not None:
                source = other
                report.shared.append(h)
            else:
                if b_err is not None:
                    RunStore._discard(bundle.path(h))
                    report.dropped.append(h)
                report.missing.append(h)
                continue
            if source is not None:
                _publish(bundle, source, h, want_w, want_p)
            # provenance: carried over unless the run now comes from the store
            if source is src:
                record = _read_record(src, h) or {}
                machine = run_machine(src.read(h)["timings"], record)
                entry = {"trained": record.get("trained"), "commit": record.get("commit"),
                         "dirty": record.get("dirty"), "executor": record.get("executor")}
            else:  # carried over: this bundle's entry, or the other bundle's it came from
                prov = old_prov
                if source is not None and source is not bundle:
                    if source.root not in other_prov:
                        other_prov[source.root] = _read_json(source.root / PROVENANCE_FILE, source.root) or {}
                    prov = other_prov[source.root]
                entry, machine = entry_in(prov, h)
                entry.pop("machine", None)
            timings = bundle.read(h)["timings"]
            entry.update(machine=machine_index(machine), wall_s=timings.get("wall_s"), device=timings.get("device"))
            runs_prov[h] = entry
            report.runs += 1
            if (bundle.locate(h) / WEIGHTS_FILE).is_file():
                report.weights += 1

        for h in bundle.finished():  # runs of an older grid
            if h not in by_hash:
                RunStore._discard(bundle.path(h))
                report.removed.append(h)

        present = [h for h in by_hash if h in runs_prov]
        commit, dirty = git_commit()
        info = {
            "format": BUNDLE_FORMAT,
            "name": study.name,
            "description": study.description,
            "grid": list(by_hash),
            "runs": present,
            "n_grid": len(by_hash),
            "n_runs": len(present),
            "complete": len(present) == len(by_hash),
            "keep_weights": [h for h, c in by_hash.items() if study.keep_weights(c)],
            "keep_predictions": [h for h, c in by_hash.items() if study.keep_predictions(c)],
            "missing": {h: _label(by_hash[h]) for h in report.missing},
        }
        provenance = {
            "format": BUNDLE_FORMAT,
            "study": study.name,
            "date": _now(),
            "commit": commit,
            "dirty": dirty,
            "exported_by": current_machine(),
            "wall_s": sum(float(e.get("wall_s") or 0.0) for e in runs_prov.values()),
            "n_runs": len(present),
            "machines": machines,
            "runs": runs_prov,
        }
        atomic_write(target / STUDY_FILE, json.dumps(info, indent=2, sort_keys=True) + "\n")
        atomic_write(target / PROVENANCE_FILE, json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    report.size_bytes = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    return report


def _tidy(bundle: RunStore) -> None:
    """Finish or undo what a killed export left in the bundle (temporaries, asides, runs without DONE)."""
    if not bundle.root.is_dir():
        return
    for p in list(bundle.root.iterdir()):
        m = re.fullmatch(r"\.(?P<hash>[^.]+)\.(tmp|old)-.+", p.name)
        if m:
            bundle.recover(m["hash"])
        elif p.is_dir() and "." not in p.name and not (p / DONE).is_file():
            bundle.recover(p.name)


def _label(cfg: RunConfig) -> dict:
    return {"method": cfg.method, "task": cfg.task, "n_shots": cfg.n_shots, "seed": cfg.seed}


# ------------------------------------------------------------------------------------------ status
@dataclass
class StudyStatus:
    """How much of a study's grid the run store and the bundle hold (``str()`` is the CLI's text)."""

    name: str
    description: str
    grid: int
    store: Path
    in_store: int
    bundle: Path
    bundle_exists: bool
    in_bundle: int
    in_either: int
    outdated: int = 0
    damaged: int = 0
    bundle_wall_s: float | None = None  # the bundle's runs' summed wall time (provenance.json)
    left_s: float | None = None  # estimated run time of the runs still to do (estimate_left)
    elsewhere: int = 0  # grid runs neither holds that other studies' bundles do (exported from there)

    def __str__(self) -> str:
        lines = [f"study {self.name}: {self.description}", f"  grid:   {self.grid} runs",
                 f"  store:  {self.in_store} of {self.grid} finished in {self.store}"]
        if self.bundle_exists:
            extra = []
            if self.outdated:
                extra.append(f"{self.outdated} outdated (from an older grid; export again to drop them)")
            if self.damaged:
                extra.append(f"{self.damaged} damaged")
            lines.append(f"  bundle: {self.in_bundle} of {self.grid} in {self.bundle}"
                         + (f" ({'; '.join(extra)})" if extra else ""))
            if self.bundle_wall_s:
                lines.append(f"  compute: {self.bundle_wall_s / 3600:.1f} hours of run time in the bundle "
                             "(the sum of its runs' wall times; divide by the workers that ran them)")
        else:
            lines.append(f"  bundle: none at {self.bundle}")
        if self.elsewhere:
            lines.append(f"  shared: {self.elsewhere} more in other studies' bundles (export takes them from there)")
        todo = self.grid - self.in_either
        lines.append(f"  to do:  {todo} runs" + (f" (python -m workbench.studies run {self.name})" if todo else
                                                   "" if self.in_bundle == self.grid else
                                                   f" (export: python -m workbench.studies export {self.name})"))
        if todo and self.left_s:
            left = f"{self.left_s / 3600:.1f} hours" if self.left_s >= 3600 else f"{self.left_s / 60:.0f} min"
            lines.append(f"  left:   about {left} of run time (estimated from the finished runs' wall times, "
                         "this CPU's where it ran any; divide by the workers)")
        return "\n".join(lines)


def estimate_left(todo, finished, cpu: str | None = None) -> float | None:
    """Estimated summed wall time (s) of the RunConfigs ``todo``, from finished runs' ``timings.json``.

    ``finished`` holds ``(RunConfig, timings)`` pairs of finished runs (``timings``: the run's
    ``timings.json``, its ``wall_s`` and ``numerics.cpu_model``). Each run to do is estimated from
    the finished runs of its cell (the same config but the seed): their mean wall time; failing
    that, the mean wall time per step of its cell at other N (same config but seed and N) times its
    step budget; failing that, the mean per step over all finished runs. Where runs on ``cpu``
    (default: this machine's) exist at a level, only they count, since another CPU (or another
    thread count) runs at another speed.
    None when no finished run has a wall time.
    """
    cpu = cpu_model() if cpu is None else cpu

    def keys(cfg):
        d = {k: v for k, v in cfg.hash_fields().items() if k not in ("seed", "max_steps", "eval_every")}
        cell = json.dumps(d, sort_keys=True, default=str)
        d.pop("n_shots", None)
        return cell, json.dumps(d, sort_keys=True, default=str)

    by_cell, by_size, every = {}, {}, []
    for cfg, timing in finished:
        wall = timing.get("wall_s") if isinstance(timing, dict) else None
        if not isinstance(wall, (int, float)) or wall <= 0:
            continue
        here = (timing.get("numerics") or {}).get("cpu_model") == cpu
        cell, size = keys(cfg)
        per_step = wall / cfg.budget()[0]
        by_cell.setdefault(cell, []).append((here, wall))
        by_size.setdefault(size, []).append((here, per_step))
        every.append((here, per_step))

    def mean(pairs):
        mine = [v for here, v in pairs if here]
        use = mine or [v for _, v in pairs]
        return sum(use) / len(use)

    if not every:
        return None
    total = 0.0
    for cfg in todo:
        cell, size = keys(cfg)
        if cell in by_cell:
            total += mean(by_cell[cell])
        else:
            total += mean(by_size.get(size) or every) * cfg.budget()[0]
    return total


def study_status(name: str | Study, store: RunStore | str | os.PathLike | None = None,
                 root: str | os.PathLike | None = None) -> StudyStatus:
    """How many of the study's grid runs are finished in ``store`` and present in its bundle."""
    study = get_study(name)
    src = store.overlay if isinstance(store, StudyStore) else (store if isinstance(store, RunStore) else RunStore(store))
    configs = {}  # hash -> config, in grid order, each run once (as Study.hashes), each hashed once
    for cfg in study.configs():
        configs.setdefault(cfg.hash, cfg)
    hashes = list(configs)
    path = bundle_dir(study.name, root)
    in_bundle = outdated = damaged = 0
    layered = None
    if path.is_dir():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DamagedRunWarning)
            layered = StudyStore(path, src, name=study.name, strict=False)
        current = set(hashes)
        in_bundle = sum(layered._from_bundle(h) for h in hashes)
        outdated = len([h for h in layered._bundle_runs if h not in current])
        damaged = len(layered.damaged)
    in_store = sum(src.is_finished(h) for h in hashes)
    wall = None
    try:
        wall = float(json.loads((path / "provenance.json").read_text())["wall_s"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no or an older provenance: the line is left out
    unheld = [h for h in hashes if not (layered is not None and layered._from_bundle(h)) and src.locate(h) is None]
    held = held_elsewhere(study.name, unheld, root)
    todo, finished = [], []
    for h, cfg in configs.items():
        where = (layered.bundle.locate(h) if layered is not None and layered._from_bundle(h)
                 else held[h].locate(h) if h in held else src.locate(h))
        if where is None:
            todo.append(cfg)
            continue
        with contextlib.suppress(OSError, ValueError):  # a run without timings only leaves the estimate
            finished.append((cfg, json.loads((where / "timings.json").read_text())))
    left = estimate_left(todo, finished) if todo else None
    return StudyStatus(study.name, study.description, len(hashes), src.root, in_store, path, path.is_dir(),
                       in_bundle, len(hashes) - len(todo), outdated, damaged, wall, left, len(held))


# ------------------------------------------------------------------------------------------ verify
class VerificationError(AssertionError):
    """Re-trained runs did not reproduce the bundle (raised by :meth:`VerifyReport.raise_if_failed`)."""


@dataclass
class RunCheck:
    """One re-trained run of :func:`verify_study`.

    ``mode``: ``"exact"`` (the recorded machine fingerprint matches: every metric and the whole
    history must be equal) or ``"tolerance"`` (another machine); ``status``: ``"match"``,
    ``"mismatch"``, ``"diverged"`` (another machine only: the run agrees with the bundle at its
    first evaluation, and a headline metric outside the tolerance lies within the 95 % prediction
    interval of another seed of its cell, widened by the tolerance: training amplified the
    machines' last-bit differences into another trajectory, as it can; counted as reproduced),
    ``"stale"`` (the current code computes another hash for the run's config: the bundle is out of
    date) or ``"error"`` (re-training raised).
    """

    run: str
    label: str
    mode: str
    status: str
    tolerance: float | None = None
    differences: list = field(default_factory=list)
    machine_differences: list = field(default_factory=list)
    bundle: dict = field(default_factory=dict)
    retrained: dict = field(default_factory=dict)
    wall_s: float = 0.0
    first_loss_rel: float | None = None  # another machine: how far the first evaluation's losses are apart
    unrecorded: list = field(default_factory=list)  # metrics the trainer records now, absent from the bundle's run

    @property
    def ok(self) -> bool:
        return self.status in ("match", "diverged")

    def __str__(self) -> str:
        mode = "exact" if self.mode == "exact" else f"within {self.tolerance:g}" if self.tolerance is not None else self.mode
        line = f"{self.run} {self.label}: {self.status.upper()} ({mode}; {self.wall_s:.1f} s)"
        if self.mode != "exact" and self.machine_differences:
            line += "\n      machine: " + "; ".join(self.machine_differences)
        if self.first_loss_rel is not None:
            line += f"\n      first evaluation's training loss: {self.first_loss_rel:.1e} apart (relative; bound {EARLY_RTOL:g})"
        if self.unrecorded:
            line += (f"\n      not compared: {', '.join(self.unrecorded)} (the bundle's run was written before the "
                     "trainer recorded it)")
        for d in self.differences[:8]:
            line += f"\n      {d}"
        if len(self.differences) > 8:
            line += f"\n      ... {len(self.differences) - 8} more"
        return line


@dataclass
class VerifyReport:
    """What :func:`verify_study` found: one :class:`RunCheck` per re-trained run."""

    name: str
    bundle: Path
    checks: list
    machine: dict

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def summary(self) -> str:
        n_ok = sum(c.ok for c in self.checks)
        head = f"study {self.name} ({self.bundle}): {n_ok} of {len(self.checks)} re-trained runs reproduce the bundle"
        n_div = sum(c.status == "diverged" for c in self.checks)
        if n_div:
            head += (f" ({n_div} diverged: the same at the first evaluation, then outside the tolerance but "
                     "where another seed of the cell would lie; docs/studies.md)")
        return "\n".join([head] + ["  " + str(c) for c in self.checks])

    __str__ = summary

    def frame(self):
        """One row per check (pandas DataFrame)."""
        import pandas as pd

        return pd.DataFrame([{"run": c.run, "label": c.label, "mode": c.mode, "status": c.status, "ok": c.ok,
                              "tolerance": c.tolerance, "first_loss_rel": c.first_loss_rel,
                              **{f"bundle/{k}": v for k, v in c.bundle.items()},
                              **{f"retrained/{k}": v for k, v in c.retrained.items()}, "wall_s": c.wall_s}
                             for c in self.checks])

    def raise_if_failed(self) -> None:
        if not self.ok:
            raise VerificationError(self.summary() if self.checks else f"study {self.name}: no run was verified")


def _headline(metrics: dict) -> dict:
    out = {}
    for k in HEADLINE:
        v = metrics.get(k)
        out[k] = float(v["overall"]) if isinstance(v, dict) else (float(v) if v is not None else None)
    return out


def _early_differences(bundle: list, new: list) -> tuple[list[str], float | None]:
    """``(why the first evaluations of two histories are not the same computation on two machines,
    their losses' relative difference)``: the list is empty when they are the same, and a reason
    is another step or training losses more than :data:`EARLY_RTOL` apart."""
    if not bundle or not new:
        return [f"history: {len(bundle)} evaluations (bundle) vs {len(new)} (re-trained)"], None
    a, b = bundle[0], new[0]
    if a.get("step") != b.get("step"):
        return [f"history[0].step: {a.get('step')!r} (bundle) vs {b.get('step')!r} (re-trained)"], None
    la, lb = a.get("loss"), b.get("loss")
    if not (isinstance(la, (int, float)) and isinstance(lb, (int, float))):
        return [f"history[0].loss: {la!r} (bundle) vs {lb!r} (re-trained)"], None
    rel = abs(la - lb) / max(abs(la), 1e-12)
    if not rel <= EARLY_RTOL:
        return [f"history[0].loss (step {a['step']}): {la!r} (bundle) vs {lb!r} (re-trained): relative "
                f"difference {rel:.1e} > {EARLY_RTOL:g}, more than another CPU's float noise grows to: "
                "training computes something else"], rel
    return [], rel


def _seed_interval(store: StudyStore, cfg: RunConfig) -> dict:
    """``{metric: (low, high, n)}``: the 95 % prediction interval of one more seed of the run's cell
    (the bundle's runs of the same config but for the seed, the run itself included): mean +-
    t(0.975, n - 1) * std * sqrt(1 + 1 / n) over their headline metrics. Empty below 3 seeds."""
    key = {**cfg.to_dict(), "seed": None, "quiet": None}
    values: dict[str, list] = {k: [] for k in HEADLINE}
    for h in sorted(store._bundle_runs):
        try:
            records = store.bundle.read(h)
        except Exception:  # noqa: BLE001 - a run that cannot be read is not a peer
            continue
        try:
            peer = config_of(records).to_dict()
        except (TypeError, ValueError):
            continue
        if {**peer, "seed": None, "quiet": None} != key:
            continue
        for k, v in _headline(records["metrics"]).items():
            if v is not None:
                values[k].append(v)
    out = {}
    for k, v in values.items():
        n = len(v)
        if n >= 3:
            mean = sum(v) / n
            sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
            half = t_quantile(0.975, n - 1) * sd * math.sqrt(1 + 1 / n)
            out[k] = (mean - half, mean + half, n)
    return out


def _diff(a, b, path: str, out: list, limit: int = 50) -> None:
    """Append ``path: a vs b`` for every leaf where ``a`` and ``b`` differ (at most ``limit``)."""
    if len(out) >= limit:
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                out.append(f"{path}.{k}: {'absent' if k not in a else repr(a[k])} (bundle) vs "
                           f"{'absent' if k not in b else repr(b[k])} (re-trained)")
            else:
                _diff(a[k], b[k], f"{path}.{k}", out, limit)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{path}: {len(a)} entries (bundle) vs {len(b)} (re-trained)")
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{path}[{i}]", out, limit)
    elif a != b and not (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
        out.append(f"{path}: {a!r} (bundle) vs {b!r} (re-trained)")


def _tolerance_for(cfg: RunConfig, study: Study | None, tolerance: float | None) -> float:
    if tolerance is not None:
        return float(tolerance)
    if study is not None and study.tolerance is not None:
        return float(study.tolerance)
    from ..data import get_task_spec

    return TOLERANCE.get(get_task_spec(cfg.task).metric, 0.02)


def verify_study(name: str | Study, sample: int | None = 2, seed: int = 0, root: str | os.PathLike | None = None,
                 runs=None, max_wall_s: float | None = None, tolerance: float | None = None,
                 match_threads: bool = True) -> VerifyReport:
    """Re-train a sample of the bundle's runs into a temporary store and compare their metrics.

    For each sampled run: its config is read from the bundle and hashed with the current code (a
    different hash is ``"stale"``: the bundle no longer describes what the code computes); it is
    trained from scratch into a temporary store, with the torch thread count the bundle records for
    it (``match_threads``); then, when the run's recorded machine fingerprint (torch version, ATen
    CPU capability, threads, device type, the pinning variables :data:`PINNING_ENV`) equals this machine's and
    the device is the CPU, every metric and the whole training history must be *equal*. Otherwise
    (another machine, a run without a machine record, a GPU) the first evaluation's training loss
    must agree within :data:`EARLY_RTOL` (relative), and the headline metrics (test, test_last,
    dev_best) within ``tolerance`` (default: the study's, else :data:`TOLERANCE` for the task's
    metric: 0.02 absolute on accuracies) or, failing that, lie within the 95 % prediction interval
    of another seed of the run's cell (status ``"diverged"``, counted as reproduced: on another CPU
    a run's trajectory can part from the bundle's after its first evaluations). docs/studies.md
    says why.

    Args:
        name: the study (its bundle must exist; the study need not be registered).
        sample: how many runs to re-train (None: every run), drawn with ``random.Random(seed)``
            from the bundle's runs sorted by hash.
        seed: the sampling seed.
        root: the folder of bundles (default ``results/`` or ``$WORKBENCH_RESULTS``).
        runs: explicit run hashes to verify instead of a sample.
        max_wall_s: sample only runs whose recorded wall time is at most this (the cheapest run when
            none is), so that CI can re-verify full-protocol bundles within its budget.
        tolerance: overrides the tolerance.
        match_threads: train with the thread count the bundle records for the run.

    Raises:
        FileNotFoundError: no bundle; DamagedBundleError: the bundle is damaged (every damaged run
        and file is named).
    """
    from ..train import run

    if sample is not None and (isinstance(sample, bool) or not isinstance(sample, int) or sample < 1):
        raise ValueError(f"sample must be a positive int or None (every run), got {sample!r}")
    store = load_study(name, root=root, strict=True)
    study = None
    with contextlib.suppress(ValueError):
        study = get_study(store.name)
    available = sorted(store._bundle_runs)
    if runs is not None:
        runs = [runs] if isinstance(runs, str) else list(runs)
        unknown = [h for h in runs if h not in store._bundle_runs]
        if unknown:
            raise ValueError(f"runs {unknown} are not in the bundle {store.bundle.root}; it holds {len(available)} runs")
        chosen = runs
    else:
        pool = available
        if max_wall_s is not None:
            walls = {h: float(store.bundle.read(h)["timings"].get("wall_s") or 0.0) for h in available}
            pool = [h for h in available if walls[h] <= max_wall_s] or sorted(available, key=walls.get)[:1]
        chosen = pool if sample is None or sample >= len(pool) else sorted(random.Random(seed).sample(pool, sample))
    checks = []
    for h in chosen:
        records = store.bundle.read(h)
        cfg = config_of(records)
        label = f"{cfg.method} N={cfg.n_shots} seed={cfg.seed}"
        recorded = store.machine_of(h)
        tol = _tolerance_for(cfg, study, tolerance)
        t0 = time.perf_counter()
        try:
            current_hash = cfg.hash
        except Exception as e:  # noqa: BLE001 - e.g. a method that no longer exists
            checks.append(RunCheck(h, label, "exact", "stale", differences=[f"its hash cannot be computed: {e}"]))
            continue
        if current_hash != h:
            why = (f"the current code hashes this config to {current_hash}, not {h} (the checkpoint, a method "
                   "default or the protocol changed): run the study again and export it")
            checks.append(RunCheck(h, label, "exact", "stale", differences=[why]))
            continue
        threads = recorded.get("threads") if (recorded and match_threads) else None
        with torch_threads(threads) as used, tempfile.TemporaryDirectory(prefix="workbench-verify-") as tmp:
            here = current_machine(used, cfg.device)
            machine_diff = machine_differences(recorded, here)
            if not machine_diff and not here["device"].startswith("cpu"):
                # GPU kernels are not all deterministic (atomics in backward passes, cuBLAS workspaces):
                # the same GPU is compared within the tolerance too.
                machine_diff = [f"device: {here['device']} (GPU runs are not bit-reproducible)"]
            mode = "tolerance" if machine_diff else "exact"
            try:
                result = run(cfg.replace(quiet=True), store=RunStore(tmp))
                new = RunStore(tmp).read(result.hash)
            except Exception as e:  # noqa: BLE001 - reported as this run's failure
                checks.append(RunCheck(h, label, mode, "error", tol if mode == "tolerance" else None,
                                       [f"re-training raised {type(e).__name__}: {e}"], machine_diff,
                                       _headline(records["metrics"]), {}, time.perf_counter() - t0))
                continue
        diffs: list[str] = []
        first_rel = None
        a, b = _headline(records["metrics"]), _headline(new["metrics"])
        unrecorded = []
        if mode == "exact":
            # A metric the trainer began to record after the run was written (e.g. method_stats) is not
            # a difference of the computation: everything both records hold is compared.
            unrecorded = sorted(k for k in new["metrics"] if k not in records["metrics"])
            _diff(records["metrics"], {k: v for k, v in new["metrics"].items() if k not in unrecorded}, "metrics",
                  diffs)
            _diff(records["history"], new["history"], "history", diffs)
            status = "mismatch" if diffs else "match"
        else:
            # Another machine: the same computation shows in the first evaluation; after it, training can
            # amplify last-bit differences into another trajectory (docs/studies.md), so a headline metric
            # outside the tolerance still reproduces the bundle when it lies where the cell's seeds lie.
            diffs, first_rel = _early_differences(records["history"], new["history"])
            status = "mismatch" if diffs else "match"
            far = [] if diffs else [k for k in HEADLINE
                                    if a[k] is None or b[k] is None or not abs(a[k] - b[k]) <= tol + 1e-12]
            seeds = _seed_interval(store, cfg) if far else {}
            for k in far:
                line = f"metrics.{k}: {a[k]!r} (bundle) vs {b[k]!r} (re-trained), tolerance {tol:g}"
                lo, hi, n = seeds.get(k, (None, None, 0))
                if b[k] is not None and lo is not None and lo - tol - 1e-12 <= b[k] <= hi + tol + 1e-12:
                    line += f"; within the 95 % interval of another seed of the cell [{lo:.4g}, {hi:.4g}] (n={n})"
                    status = "diverged" if status == "match" else status
                else:
                    line += (f"; outside the 95 % interval of another seed of the cell [{lo:.4g}, {hi:.4g}] (n={n})"
                             if lo is not None else "; the bundle holds fewer than 3 seeds of this cell to compare with")
                    status = "mismatch"
                diffs.append(line)
        checks.append(RunCheck(h, label, mode, status, tol if mode == "tolerance" else None,
                               diffs, machine_diff, a, b, time.perf_counter() - t0,
                               first_rel, unrecorded))
    return VerifyReport(store.name, store.bundle.root, checks, current_machine())


verify = verify_study
