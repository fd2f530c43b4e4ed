"""RunConfig: everything that determines a run; its hash names the run directory."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from ..data import SEEDS, list_tasks

# Fields that change how a run is shown, not what it computes: left out of the hash.
_NOT_HASHED = ("quiet",)
# Fields added after runs were stored: left out of the hash while empty, so that every config
# written before they existed keeps its hash (and its run directory).
_HASHED_WHEN_SET = ("backbone_options",)


@dataclass
class RunConfig:
    """A low-resource run: backbone x task x N x seed x method, plus the optimiser settings.

    Defaults follow the MixPHM recipe (AdamW eps 1e-6, weight decay 0.01 except biases and
    LayerNorms, linear warm-up 5 %, gradient clipping 5, batch 16) with its early-stopping protocol
    scaled to the embedded world and counted in optimiser steps (:func:`protocol_budget`): at most
    ``max_steps`` steps, the dev score every ``eval_every`` steps, stop after ``patience``
    evaluations without improvement. ``max_steps=None`` / ``eval_every=None`` take the protocol's
    values for ``n_shots`` (:meth:`budget` resolves them; the hash covers the resolved values).
    ``lr=None`` takes the method's default learning rate (tuned on the embedded world and recorded
    in the method's registration).

    ``backbone_options`` go to ``load_backbone(backbone, **backbone_options)`` (e.g.
    ``{"feat_dim": 2048}`` for a T5/BART directory, ``{"layout": "text_first"}``).
    ``task_options`` go to the task's loader (e.g. ``{"root": ..., "limit": ...}``), except two
    that the trainer reads: ``"features"`` (a feature store path, required by real datasets) and
    ``"target"`` (VQA training target: ``"sample"``, the default, draws an answer in proportion to
    its soft score each time an example is used; ``"most_frequent"`` always trains on the first
    answer). ``pool_size`` sets the pool's size for tasks whose spec has a pool-size option
    (ShapesWorld's ``n_scenes``). Decoding uses ``max(max_new_tokens, the task's
    max_answer_length)`` new tokens.
    """

    backbone: str = "vlt5-tiny"
    backbone_options: dict = field(default_factory=dict)
    task: str = "shapes-vqa"
    n_shots: int = 64
    seed: int = 13
    method: str = "lora"
    method_config: dict = field(default_factory=dict)
    # optimisation
    lr: float | None = None
    batch_size: int = 16
    max_steps: int | None = None
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    adam_eps: float = 1e-6
    grad_clip: float = 5.0
    grad_accum: int = 1
    # model selection: dev score every `eval_every` optimiser steps, stop after `patience` evaluations
    # without improvement (None: the protocol's value for n_shots, see protocol_budget)
    eval_every: int | None = None
    patience: int = 10
    # data sizes (the pool the split is drawn from, and how many test examples to score)
    pool_size: int | None = None
    test_size: int | None = None
    task_options: dict = field(default_factory=dict)
    # decoding
    num_beams: int = 1
    max_new_tokens: int = 8
    # hardware
    device: str | None = None
    bf16: bool = True
    quiet: bool = False

    def __post_init__(self):
        """Check every field's type and range; one ValueError lists every problem.

        NumPy scalars are turned into Python numbers and path objects into strings (what the
        config would hash and store as anyway); nothing else is converted.
        """
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.generic):
                setattr(self, f.name, value.item())
        if isinstance(self.backbone, os.PathLike):
            self.backbone = os.fspath(self.backbone)
        problems = []

        def bad(name, what):
            problems.append(f"{name} must be {what}, got {getattr(self, name)!r}")

        for name in ("backbone", "method"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                bad(name, "a non-empty string")
        if not isinstance(self.task, str):
            bad("task", "a registered task name")
        elif self.task not in list_tasks():
            problems.append(f"unknown task {self.task!r}; registered tasks: {', '.join(list_tasks())}")
        for name in ("backbone_options", "task_options", "method_config"):
            value = getattr(self, name)
            if not isinstance(value, dict):
                problems.append(f"{name} must be a dict, got {type(value).__name__}")
            elif not all(isinstance(k, str) for k in value):
                problems.append(f"{name} keys must be strings, got {value!r}")
        if isinstance(self.backbone_options, dict) and "device" in self.backbone_options:
            problems.append("backbone_options cannot set 'device'; use RunConfig.device")
        if isinstance(self.task_options, dict):
            for key in ("features", "root"):
                value = self.task_options.get(key)
                if value is not None and not (isinstance(value, str) and value) \
                        and not isinstance(value, os.PathLike):
                    problems.append(f"task_options[{key!r}] must be a path (a non-empty string), got {value!r}")
        for name in ("n_shots", "batch_size", "grad_accum", "patience", "num_beams", "max_new_tokens"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                bad(name, "a positive int")
        for name in ("pool_size", "test_size", "max_steps", "eval_every"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                bad(name, "a positive int or None")
        if not _is_int(self.seed) or self.seed < 0:
            bad("seed", f"a non-negative int (the protocol uses {SEEDS})")
        if self.lr is not None and (not _is_real(self.lr) or not self.lr > 0):
            bad("lr", "a finite number > 0 or None (the method's default)")
        if not _is_real(self.warmup_ratio) or not 0 <= self.warmup_ratio < 1:
            bad("warmup_ratio", "a number in [0, 1)")
        if not _is_real(self.weight_decay) or self.weight_decay < 0:
            bad("weight_decay", "a finite number >= 0")
        if not _is_real(self.adam_eps) or not self.adam_eps > 0:
            bad("adam_eps", "a finite number > 0")
        if self.grad_clip is not None and (not _is_real(self.grad_clip) or not self.grad_clip > 0):
            bad("grad_clip", "a finite number > 0 or None (no clipping)")
        for name in ("bf16", "quiet"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "True or False")
        if self.device is not None and (not isinstance(self.device, str) or not _is_device(self.device)):
            bad("device", "None (CUDA if available, else CPU) or a torch device string such as 'cpu', 'cuda' or "
                          "'cuda:1'")
        if problems:
            raise ValueError("invalid RunConfig: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            legacy = " (`epochs` is gone: budgets are counted in steps, see max_steps and eval_every; " \
                     "a run stored before that change must be trained again)" if "epochs" in unknown else ""
            raise ValueError(f"unknown RunConfig fields {sorted(unknown)}; known: {sorted(known)}{legacy}")
        return cls(**d)

    def default_lr(self) -> float | None:
        """The learning rate a run with ``lr=None`` uses: the method's default (its registration's
        tuned value; ``None`` for a method whose default depends on the backbone's family, e.g.
        VL-PET, resolved when the method is applied)."""
        from ..methods import get_config

        return get_config(self.method, **self.method_config).lr

    def budget(self) -> tuple[int, int]:
        """``(max_steps, eval_every)`` with the protocol's values filled in (:func:`protocol_budget`)."""
        max_steps, eval_every = protocol_budget(self.n_shots, self.batch_size * self.grad_accum)
        return (self.max_steps or max_steps, self.eval_every or eval_every)

    @property
    def hash(self) -> str:
        """A stable 12-hex-digit id of everything that determines the results.

        It covers the config fields, the method's resolved config (its defaults included), the
        backbone checkpoint's contents and, for a config with ``task_options["features"]``, the
        feature store's contents and the task's data files (the ``*.json`` files in
        ``task_options["root"]``, or in the task's default folder), so re-building a checkpoint,
        re-extracting features, replacing an annotation file or changing a method's default never
        lets old runs be reused as if they belonged to the new one. Configs without a features
        option hash exactly as before these files were covered. An unknown method or an invalid
        method option raises here, before anything is trained.
        """
        return hash_of(self.hash_payload())

    def hash_payload(self) -> dict:
        """What :attr:`hash` digests: the hashed fields, the resolved method config, the fingerprints.

        The run store keeps it beside each run (``identity.json``), so that a stored config can be
        checked against its run's hash later without the files it was fingerprinted from.
        """
        from ..methods import get_config
        from ..models.factory import backbone_fingerprint

        d = self.hash_fields()
        # The method's whole resolved config, defaults included: a default that changes in the code
        # names a new run (never a stale one from the store), and spelling a default out changes nothing.
        # (its lr aside: the resolved learning rate is the run's own ``lr`` entry, see hash_fields; and
        # options added later at their neutral value aside: MethodConfig.HASH_NEUTRAL)
        d["method_config"] = get_config(self.method, **self.method_config).hashed_dict()
        d["backbone_fingerprint"] = backbone_fingerprint(self.backbone)
        d.update(self.data_fingerprints())
        return json.loads(json.dumps(d, sort_keys=True, default=str))

    def hash_fields(self) -> dict:
        """The config fields the hash covers, as JSON would store them (no fingerprints, no method defaults).

        The budget and the learning rate enter resolved (:meth:`budget`, :meth:`default_lr`):
        spelling out the protocol's ``max_steps`` or the method's default lr names the same run, and
        a change of the protocol or of a default names new runs instead of reusing old ones.
        """
        d = {k: v for k, v in self.to_dict().items()
             if k not in _NOT_HASHED and not (k in _HASHED_WHEN_SET and not v)}
        d["max_steps"], d["eval_every"] = self.budget()
        if d.get("lr") is None:  # the method's default, likewise (None where it depends on the backbone)
            d["lr"] = self.default_lr()
        return json.loads(json.dumps(d, sort_keys=True, default=str))

    def data_fingerprints(self) -> dict:
        """Digests of the data files a run with a feature store reads ({} without one).

        ``features_fingerprint``: the feature store file's content; ``data_fingerprint``: the
        ``*.json`` files of the task's data folder (``task_options["root"]``, else the folder a
        real dataset is read from by default), when there is one. Cached per (path, size, mtime),
        in memory and on disk (:func:`workbench.utils.file_digest`).
        """
        from ..utils import file_fingerprint

        features = self.task_options.get("features")
        if features is None:
            return {}
        out = {"features_fingerprint": file_fingerprint(features)}
        folder = self.task_options.get("root")
        if folder is None:
            from ..data.tasks import REAL_DATA_FOLDERS
            from ..utils import repo_root

            if self.task in REAL_DATA_FOLDERS:
                folder = repo_root() / REAL_DATA_FOLDERS[self.task]
        if folder is not None:
            out["data_fingerprint"] = file_fingerprint(folder, "*.json")
        return out

    def replace(self, **changes) -> "RunConfig":
        return RunConfig.from_dict({**self.to_dict(), **changes})


# The protocol (MixPHM's, scaled to the embedded world; docs/data.md, "Budget"). MixPHM trains VL-T5 up
# to 1,000 epochs, validating every 10 epochs with a patience of 20 validations. On vlt5-tiny the
# same shape in steps: validate every EVAL_EVERY steps (or every 2 epochs when an epoch is longer),
# stop after `patience` validations without improvement, never beyond MIN_STEPS steps or
# EPOCHS_CAP epochs, whichever is more.
MIN_STEPS = 1000
EPOCHS_CAP = 30
EVAL_EVERY = 25


def protocol_budget(n_shots: int, batch_size: int = 16) -> tuple[int, int]:
    """The protocol's ``(max_steps, eval_every)`` for ``n_shots`` training examples.

    ``max_steps = max(1000, 30 epochs)`` and ``eval_every = max(25, 2 epochs)`` (an epoch is
    ``ceil(n_shots / batch_size)`` steps): N = 16 and N = 64 get 1,000 steps validated every 25
    (N = 64: every 6 epochs), N = 1000 gets 1,890 steps validated every 126. With the default
    patience of 10 validations, a run stops 250 steps after its best dev score at small N.
    """
    epoch = math.ceil(n_shots / batch_size)
    return max(MIN_STEPS, EPOCHS_CAP * epoch), max(EVAL_EVERY, 2 * epoch)


def hash_of(payload: dict) -> str:
    """The 12-hex-digit run hash of a :meth:`RunConfig.hash_payload`."""
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_device(name: str) -> bool:
    try:
        import torch

        torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        return False
    return True
