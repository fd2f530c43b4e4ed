"""RunConfig: everything that determines a run; its hash names the run directory."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields

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
    LayerNorms, linear warm-up 5 %, gradient clipping 5, batch 16) with epoch budgets that fit a
    2-core CPU. ``lr=None`` takes the method's default learning rate.

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
    epochs: int = 40
    max_steps: int | None = None
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    adam_eps: float = 1e-6
    grad_clip: float = 5.0
    grad_accum: int = 1
    # model selection: evaluate on dev every `eval_every` epochs, stop after `patience` evals
    eval_every: int = 2
    patience: int = 5
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
        problems = []
        if self.task not in list_tasks():
            problems.append(f"unknown task {self.task!r}; registered tasks: {', '.join(list_tasks())}")
        for name in ("backbone_options", "task_options", "method_config"):
            if not isinstance(getattr(self, name), dict):
                problems.append(f"{name} must be a dict, got {type(getattr(self, name)).__name__}")
        if isinstance(self.backbone_options, dict) and "device" in self.backbone_options:
            problems.append("backbone_options cannot set 'device'; use RunConfig.device")
        if self.pool_size is not None and (isinstance(self.pool_size, bool) or not isinstance(self.pool_size, int)
                                           or self.pool_size < 1):
            problems.append(f"pool_size must be a positive int or None, got {self.pool_size!r}")
        if self.test_size is not None and (isinstance(self.test_size, bool) or not isinstance(self.test_size, int)
                                           or self.test_size < 1):
            problems.append(f"test_size must be a positive int or None, got {self.test_size!r}")
        for name in ("n_shots", "batch_size", "epochs", "grad_accum", "eval_every", "patience", "num_beams", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            problems.append(f"seed must be a non-negative int (the protocol uses {SEEDS}), got {self.seed!r}")
        if self.lr is not None and not self.lr > 0:
            problems.append(f"lr must be > 0 or None (method default), got {self.lr!r}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            problems.append(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if problems:
            raise ValueError("invalid RunConfig: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown RunConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    @property
    def hash(self) -> str:
        """A stable 12-hex-digit id of everything that determines the results.

        It covers the config fields, the method's resolved config (its defaults included) and the
        backbone checkpoint's contents, so re-building a checkpoint or changing a method's default
        never lets old runs be reused as if they belonged to the new one. An unknown method or an
        invalid method option raises here, before anything is trained.
        """
        from ..methods import get_config
        from ..models.factory import backbone_fingerprint

        d = {k: v for k, v in self.to_dict().items()
             if k not in _NOT_HASHED and not (k in _HASHED_WHEN_SET and not v)}
        # The method's whole resolved config, defaults included: a default that changes in the code
        # names a new run (never a stale one from the store), and spelling a default out changes nothing.
        d["method_config"] = get_config(self.method, **self.method_config).to_dict()
        d["backbone_fingerprint"] = backbone_fingerprint(self.backbone)
        blob = json.dumps(d, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def replace(self, **changes) -> "RunConfig":
        return RunConfig.from_dict({**self.to_dict(), **changes})
