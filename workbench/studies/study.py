"""A study: a name, its grids of run configs, and the analyses its notebook shows.

A study is code. It says *what* to train (``grids``: a function returning the study's
:class:`~workbench.train.RunConfig` lists, usually built with :func:`~workbench.train.grid`),
which of its runs keep their method weights in the study's bundle (``keep_weights``; the analyses
that look inside a trained model need them), and the analyses its notebook shows (``analyses``:
functions of a run store)::

    from workbench.studies import Study, register_study
    from workbench.train import RunConfig, grid

    register_study(Study(
        "lora-rank",
        "LoRA's rank at N = 16 and 64 over three seeds",
        grids=lambda: grid(RunConfig(method="lora"), n_shots=[16, 64], method_config__r=[2, 4, 8],
                           seed=[13, 21, 42]),
        keep_weights=lambda cfg: cfg.seed == 13,
    ))

Then ``python -m workbench.studies run lora-rank`` trains it (resuming from the run store),
``export lora-rank`` writes its bundle under ``results/lora-rank/`` and ``load_study("lora-rank")``
reads the bundle as a run store (:mod:`workbench.studies.bundle`).

:func:`run_study` is the Python side of ``run``: it filters the grid, skips what the store or the
study's bundle already holds, sweeps the rest (local, processes or Ray) and records, for each run
it trained, as soon as the run lands, the machine it was trained on and the commit
(``<store>/.provenance/<hash>.json``), which the bundle's
``provenance.json`` carries and :func:`~workbench.studies.verify_study` reads to decide between an
exact and a tolerant comparison.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..registry import Registry
from ..train import RunConfig, RunStore
from ..utils import atomic_write, check_threads

STUDIES: Registry[Study] = Registry("study")
# Subcommands of the CLI and words that would read ambiguously as a study name.
_RESERVED = ("all", "list", "run", "export", "status", "verify")
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
# Where run_study records the machine a run was trained on (a hidden folder of the store: never a run).
PROVENANCE_DIR = ".provenance"


def _never(cfg: RunConfig) -> bool:
    return False


@dataclass
class Study:
    """A named set of grids plus the analyses its notebook shows.

    Args:
        name: the study's name: lower case letters, digits, ``-`` and ``_`` (it names the bundle
            folder ``results/<name>/``).
        description: one or two sentences: what the study trains and what it asks.
        grids: a function returning the study's configs: a list of RunConfigs, or a list of such
            lists (one per :func:`~workbench.train.grid`). Called lazily, so that defining a study
            builds nothing; the same config twice counts once.
        keep_weights: ``cfg -> bool``: whether the bundle keeps that run's method weights
            (``method.safetensors``); default: no run. Keep them only for the runs an analysis
            loads, a bundle is committed.
        keep_predictions: ``cfg -> bool``: whether the bundle keeps that run's test predictions
            (``predictions.json``); default: no run.
        analyses: ``{name: function(store) -> result}``, the analyses the notebook shows, called
            with the study's run store (:func:`~workbench.studies.load_study`), e.g. a summary table.
        tolerance: the absolute tolerance of :func:`~workbench.studies.verify_study` on this
            study's headline metrics when a run is re-trained on another kind of machine (None:
            the default of the task's metric, :data:`workbench.studies.bundle.TOLERANCE`).
    """

    name: str
    description: str
    grids: Callable[[], list] | list
    keep_weights: Callable[[RunConfig], bool] = _never
    keep_predictions: Callable[[RunConfig], bool] = _never
    analyses: dict = field(default_factory=dict)
    tolerance: float | None = None

    def __post_init__(self):
        problems = []
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            problems.append(f"name must be lower case letters, digits, '-' and '_' (it names results/<name>/), "
                            f"got {self.name!r}")
        elif self.name in _RESERVED:
            problems.append(f"name {self.name!r} is reserved (CLI words: {', '.join(_RESERVED)})")
        if not isinstance(self.description, str):
            problems.append(f"description must be a string, got {type(self.description).__name__}")
        if not (callable(self.grids) or isinstance(self.grids, (list, tuple))):
            problems.append(f"grids must be a function returning RunConfigs (or a list of them), got "
                            f"{type(self.grids).__name__}")
        for name in ("keep_weights", "keep_predictions"):
            if not callable(getattr(self, name)):
                problems.append(f"{name} must be a function cfg -> bool, got {type(getattr(self, name)).__name__}")
        if not isinstance(self.analyses, dict) or not all(
                isinstance(k, str) and callable(v) for k, v in self.analyses.items()):
            problems.append("analyses must be a dict {name: function(store)}")
        if self.tolerance is not None and (isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float))
                                           or not 0 <= self.tolerance < 1):
            problems.append(f"tolerance must be None or a number in [0, 1), got {self.tolerance!r}")
        if problems:
            raise ValueError("invalid Study: " + "; ".join(problems))

    def configs(self) -> list[RunConfig]:
        """Every config of the study's grids, in order, each distinct run once."""
        made = self.grids() if callable(self.grids) else self.grids
        out, seen = [], set()

        def add(item):
            if isinstance(item, RunConfig):
                key = json.dumps(item.hash_fields(), sort_keys=True)
                if key not in seen:
                    seen.add(key)
                    out.append(item)
            elif isinstance(item, (list, tuple)):
                for x in item:
                    add(x)
            else:
                raise TypeError(f"study {self.name!r}: grids() must return RunConfigs or lists of them, "
                                f"got {type(item).__name__}")

        add(made)
        if not out:
            raise ValueError(f"study {self.name!r}: grids() returned no config")
        return out

    def hashes(self) -> list[str]:
        """The run hash of every config (:attr:`RunConfig.hash`), in the order of :meth:`configs`."""
        return list(dict.fromkeys(c.hash for c in self.configs()))

    def analyse(self, name: str, store=None):
        """Run the analysis ``name`` on ``store`` (default: the study's bundle, :func:`load_study`)."""
        if name not in self.analyses:
            known = ", ".join(self.analyses) or "none"
            raise ValueError(f"study {self.name!r} has no analysis {name!r}; its analyses: {known}")
        if store is None:
            from .bundle import load_study

            store = load_study(self.name)
        return self.analyses[name](store)


# --------------------------------------------------------------------------------------- registry
def register_study(study: Study) -> Study:
    """Add ``study`` to the registry (a different study under a taken name is refused)."""
    if not isinstance(study, Study):
        raise TypeError(f"register_study takes a Study, got {type(study).__name__}")
    # The grids function is the study's definition: a re-imported study module re-registers.
    source = study.grids if callable(study.grids) else study
    return STUDIES.register(study.name, study, source=source)


def unregister_study(name: str) -> Study:
    """Remove and return a registered study (tests register throw-away studies)."""
    return STUDIES.unregister(name)


def get_study(name: str | Study) -> Study:
    """The registered study ``name``; a module ``workbench/studies/<name>.py`` is imported first.

    An unknown name is a ValueError listing the registered studies (and close matches).
    """
    if isinstance(name, Study):
        return name
    if isinstance(name, str) and name not in STUDIES and _NAME.fullmatch(name):
        module = name.replace("-", "_")
        if (Path(__file__).parent / f"{module}.py").is_file():
            importlib.import_module(f"{__package__}.{module}")
    return STUDIES.get(name)


# Modules of this package that are infrastructure, not studies.
_NOT_STUDIES = {"study", "bundle", "redundancy"}


def discover_studies() -> None:
    """Import every study module of this package (``workbench/studies/<name>.py``), so that the
    registry lists them all; a module imports once."""
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if path.stem.startswith("_") or path.stem in _NOT_STUDIES:
            continue
        importlib.import_module(f"{__package__}.{path.stem}")


def list_studies() -> list[str]:
    """The study names, sorted: every study module of the package and any study registered in code."""
    discover_studies()
    return STUDIES.names()


# ---------------------------------------------------------------------------------------- running
def parse_filters(items) -> dict:
    """``["method=lora,dora", "n_shots=16"]`` -> ``{"method": ["lora", "dora"], "n_shots": [16]}``.

    Values are read as JSON where they parse (numbers, true/false/null), else as strings.
    """
    out: dict = {}
    for item in items or ():
        key, sep, raw = str(item).partition("=")
        key = key.strip()
        if not sep or not key or raw == "":
            raise ValueError(f"a filter is KEY=VALUE[,VALUE...] (e.g. method=lora or n_shots=16,64), got {item!r}")
        out.setdefault(key, []).extend(parse_value(v.strip()) for v in raw.split(","))
    return out


def parse_value(raw: str):
    """A command-line value: JSON where it parses (numbers, true/false/null), else the string."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _config_value(cfg: RunConfig, key: str):
    names = [f.name for f in fields(RunConfig)]
    if key in names:
        return getattr(cfg, key)
    head, sep, sub = key.partition("__")
    if sep and head in ("method_config", "task_options", "backbone_options") and sub:
        if head == "method_config":
            from ..methods import get_config

            return get_config(cfg.method, **cfg.method_config).to_dict().get(sub)
        return getattr(cfg, head).get(sub)
    raise ValueError(f"unknown filter key {key!r}; keys are RunConfig fields ({', '.join(names)}) or "
                     "method_config__<option> (and task_options__<key>, backbone_options__<key>)")


def select(configs, filters: dict | None = None) -> list[RunConfig]:
    """The configs whose fields match ``filters`` (``{key: value or [values]}``, as :func:`parse_filters`)."""
    filters = filters or {}
    out = []
    for cfg in configs:
        ok = True
        for key, wanted in filters.items():
            wanted = wanted if isinstance(wanted, (list, tuple)) else [wanted]
            actual = _config_value(cfg, key)
            if not any(actual == w or str(actual) == str(w) for w in wanted):
                ok = False
                break
        if ok:
            out.append(cfg)
    return out


def retarget(configs, backbone: str | os.PathLike | None = None, backbone_options: dict | None = None,
             tasks=None, task_options: dict | None = None, changes: dict | None = None) -> list[RunConfig]:
    """The same configs on another backbone and task: how a study runs on real data, unchanged.

    Args:
        configs: the study's configs (usually already filtered).
        backbone / backbone_options: replace every config's backbone and its options (e.g. a t5-base
            directory with ``{"feat_dim": 2048}``).
        tasks: task names (or one name). Each replaces the configs' tasks *of the same kind* (a VQA
            task replaces ``shapes-vqa``, a caption task ``shapes-caption``); the replaced configs get
            ``task_options`` instead of their own (the ShapesWorld options mean nothing to another task).
        changes: any other RunConfig fields, set on every config after the rest (e.g. ``{"n_shots": 2,
            "max_steps": 4}`` for a smoke test on small fixture files).

    Raises:
        ValueError: an unknown task, two tasks of one kind, a config whose task kind no given task
            replaces, or an unknown field in ``changes``, before anything is trained.
    """
    from ..data import get_task_spec, list_tasks

    configs = list(configs)
    by_kind: dict[str, str] = {}
    for t in [tasks] if isinstance(tasks, str) else list(tasks or ()):
        if t not in list_tasks():
            raise ValueError(f"unknown task {t!r}; registered tasks: {', '.join(list_tasks())}")
        kind = get_task_spec(t).kind
        if kind in by_kind:
            raise ValueError(f"two {kind} tasks given ({by_kind[kind]!r} and {t!r}); give one task per kind")
        by_kind[kind] = t
    if by_kind:
        missing = sorted({get_task_spec(c.task).kind for c in configs} - set(by_kind))
        if missing:
            have = sorted({c.task for c in configs if get_task_spec(c.task).kind in missing})
            raise ValueError(f"the selected configs also have {'/'.join(missing)} tasks ({', '.join(have)}) and no "
                             f"{'/'.join(missing)} task was given to replace them; give one (e.g. --task "
                             f"{'coco-caption' if 'caption' in missing else 'vqa-v2'}) or filter them out "
                             f"(--filter task=...)")
    elif task_options is not None:
        raise ValueError("task_options are given for the replacing task: give the task too (--task NAME)")
    names = {f.name for f in fields(RunConfig)}
    unknown = sorted(set(changes or {}) - names)
    if unknown:
        raise ValueError(f"unknown RunConfig field(s) {unknown}; fields: {', '.join(sorted(names))}")
    out = []
    for cfg in configs:
        update = {}
        if backbone is not None:
            update["backbone"] = os.fspath(backbone)
            update["backbone_options"] = dict(backbone_options or {})
        elif backbone_options is not None:
            update["backbone_options"] = dict(backbone_options)
        if by_kind:
            update["task"] = by_kind[get_task_spec(cfg.task).kind]
            update["task_options"] = dict(task_options or {})
        update.update(changes or {})
        out.append(cfg.replace(**update) if update else cfg)
    return out


def run_study(name: str | Study, executor: str = "local", store: RunStore | str | os.PathLike | None = None,
              results: str | os.PathLike | None = None, filters: dict | None = None, limit: int | None = None,
              workers: int | None = None, threads: int | None = None, progress: bool = True,
              ray_options=None, num_cpus: float | None = None, num_gpus: float | None = None,
              ray_address: str | None = None, backbone: str | os.PathLike | None = None,
              backbone_options: dict | None = None, tasks=None, task_options: dict | None = None,
              changes: dict | None = None):
    """Train the study's runs that neither ``store`` nor the study's bundle holds yet; return the sweep's frame.

    Args:
        name: a registered study (or a :class:`Study`).
        executor: ``"local"``, ``"processes"`` or ``"ray"`` (:func:`~workbench.train.sweep`).
        store: the run store new runs are written to (default ``runs/`` or ``$WORKBENCH_RUNS``).
        results: the folder of bundles (default ``results/`` or ``$WORKBENCH_RESULTS``); runs that
            the study's bundle already holds are reused, not trained again.
        filters: ``{field: value or [values]}``: only the matching configs (e.g. ``{"method": "lora"}``).
        limit: train at most this many of the configs still to do (in grid order), so that a long
            study can be spread over sessions: each call resumes where the store stands.
        workers / threads: the process pool's size and torch threads per worker (``"processes"``;
            ``threads`` also sets each Ray task's threads, and the local executor's for the sweep).
        progress: the sweep's progress bar.
        ray_options / num_cpus / num_gpus / ray_address: for ``executor="ray"``, as
            :func:`~workbench.train.sweep` takes them.
        backbone / backbone_options / tasks / task_options / changes: run the (filtered) grid on
            another backbone and on real tasks (:func:`retarget`); the "grid" of ``attrs`` is then
            the retargeted selection.

    Returns:
        The :func:`~workbench.train.sweep` DataFrame of the configs run now (``status`` done /
        reused / failed); its ``attrs["grid"]`` is the grid's size, ``attrs["finished"]`` how many
        of the grid's runs the store, the bundle and other studies' bundles hold after the sweep, and
        ``attrs["elsewhere"]`` how many of those only other studies' bundles hold (the grid runs
        studies share by hash: not trained again, :func:`export_study` takes them from there).
    """
    import torch

    from ..train import sweep
    from .bundle import (
        StudyStore,
        bundle_dir,
        current_machine,
        held_elsewhere,
        git_commit,
        training_record,
    )

    study = get_study(name)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    check_threads(threads)
    overlay = store if isinstance(store, RunStore) and not isinstance(store, StudyStore) else \
        (store.overlay if isinstance(store, StudyStore) else RunStore(store))
    layered = StudyStore(bundle_dir(study.name, results), overlay, name=study.name, strict=False)
    every = study.configs()
    hash_of = {id(c): c.hash for c in every}  # hashing reads fingerprints: once per config
    grid_hashes = set(hash_of.values())
    configs = select(every, filters)
    if any(v is not None for v in (backbone, backbone_options, tasks, task_options, changes)):
        configs = retarget(configs, backbone=backbone, backbone_options=backbone_options, tasks=tasks,
                           task_options=task_options, changes=changes)
        hash_of = {id(c): c.hash for c in configs}
        grid_hashes = set(hash_of.values())
    todo = [c for c in configs if not layered.is_finished(hash_of[id(c)])]
    # A run another study's bundle holds is exported from there (studies share runs by hash): not trained.
    elsewhere = held_elsewhere(study.name, [hash_of[id(c)] for c in todo], results)
    if elsewhere:
        configs = [c for c in configs if hash_of[id(c)] not in elsewhere]
        todo = [c for c in todo if hash_of[id(c)] not in elsewhere]
    chosen = todo[:limit] if limit is not None else configs
    ray_args = {k: v for k, v in (("ray_options", ray_options), ("num_cpus", num_cpus), ("num_gpus", num_gpus),
                                  ("ray_address", ray_address)) if v is not None}
    if executor == "processes":
        n = len([c for c in chosen if not layered.is_finished(hash_of[id(c)])])
        workers = workers or max(1, min(n, os.cpu_count() or 1))
        threads = threads or max(1, (os.cpu_count() or 1) // workers)
    if executor == "local":
        used_threads = threads or torch.get_num_threads()
    elif executor == "processes":
        used_threads = threads
    else:  # a local Ray: the task's threads are its num_cpus (rounded down) unless threads is given
        cpus = num_cpus if num_cpus is not None else (ray_options or {}).get("num_cpus", 1) \
            if isinstance(ray_options, dict) else 1
        used_threads = threads or max(1, int(cpus))

    code = git_commit()  # the code the sweep's workers import now

    def record(cfg, h, _result):
        # The machine, commit and time of each run trained now (the bundle's provenance and
        # verify_study read it), written as the run lands so that a sweep stopped later (a session
        # that ends, a kill) keeps it. A Ray task on another node ran on a machine this process
        # does not know: its machine is not recorded. Ray is connected only once the sweep runs.
        remote = executor == "ray" and not _ray_is_this_machine()
        device = cfg.device if executor != "ray" or num_gpus else "cpu"
        rec = training_record(None if remote else current_machine(used_threads, device), executor, code)
        atomic_write(overlay.root / PROVENANCE_DIR / f"{h}.json", json.dumps(rec, indent=2, sort_keys=True))

    df = sweep(chosen, executor=executor, store=layered, workers=workers, progress=progress, threads=threads,
               on_run=record, **ray_args)
    df.attrs["grid"] = len(grid_hashes)
    df.attrs["finished"] = sum(layered.is_finished(h) or h in elsewhere for h in grid_hashes)
    df.attrs["elsewhere"] = len(elsewhere)
    return df


def _ray_is_this_machine() -> bool:
    """Whether the Ray this process used is a single node on this machine (so its tasks ran here)."""
    try:
        import ray

        if not ray.is_initialized():
            return False
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        return len(nodes) == 1 and nodes[0].get("NodeManagerAddress") == ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - unknown: the runs' machine is left unrecorded
        return False
