"""The method protocol: a dataclass config, a registry, and the handle that the trainer uses.

A PEFT method is registered with :func:`register_method` as ``(config class, apply function)``.
``apply_fn(model, config) -> MethodHandle`` freezes what the method does not train, inserts its
modules at named insertion points of the :class:`~workbench.models.VLModel`, and returns a
handle. The trainer only talks to the handle:

* ``trainable_parameters()`` -- what the optimiser updates (the visual projector always trains);
* ``extra_losses()`` -- losses the method adds after each forward (MixPHM, PETAL), as a dict;
* ``state_dict()`` / ``load_state_dict()`` -- the method's own weights (for the run store);
* training vs eval behaviour follows ``model.train()`` / ``model.eval()`` as usual in torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Callable

import torch
from torch import nn

_REGISTRY: dict[str, tuple[type, Callable]] = {}


@dataclass
class MethodConfig:
    """Base of every method config. ``lr`` is the method's default learning rate."""

    lr: float = 1e-3

    @property
    def method_name(self) -> str:
        return getattr(type(self), "_method_name", type(self).__name__)

    def validate(self) -> None:
        """Raise ValueError for impossible settings (called by :func:`apply` before any change)."""
        if not self.lr > 0:
            raise ValueError(f"{self.method_name}: lr must be > 0, got {self.lr}")

    def to_dict(self) -> dict:
        return asdict(self)


def register_method(name: str, config_cls: type):
    """Decorator: register ``apply_fn(model, config) -> MethodHandle`` under ``name``."""

    def deco(fn):
        config_cls._method_name = name
        _REGISTRY[name] = (config_cls, fn)
        return fn

    return deco


def list_methods() -> list[str]:
    """Registered method names."""
    return sorted(_REGISTRY)


def _lookup(name: str):
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(list_methods())}")
    return _REGISTRY[name]


def get_config(name: str, **overrides) -> MethodConfig:
    """The method's config with its official defaults, updated by ``overrides``."""
    cls, _ = _lookup(name)
    known = {f.name for f in fields(cls)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"{name}: unknown options {sorted(unknown)}; known: {sorted(known)}")
    cfg = cls(**overrides)
    cfg.validate()
    return cfg


class MethodHandle:
    """What :func:`apply` returns; the trainer's view of a method."""

    def __init__(self, model: nn.Module, config: MethodConfig, modules: dict[str, nn.Module] | None = None):
        self.model = model
        self.config = config
        self.modules = dict(modules or {})

    @property
    def name(self) -> str:
        return self.config.method_name

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def extra_losses(self) -> dict[str, torch.Tensor]:
        """Losses added to the task loss after a forward pass (none by default)."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable tensors, by their name in the model."""
        return {n: p.detach().clone() for n, p in self.trainable_parameters()}

    def merge(self) -> None:
        """Fold the method into the backbone weights (methods that allow it override this)."""
        raise NotImplementedError(f"method {self.name!r} cannot be merged into the backbone")

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        missing = [n for n in state if n not in params]
        if missing:
            raise ValueError(f"{self.name}: weights for unknown parameters {missing[:5]}")
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t.to(params[n].device, params[n].dtype))


def freeze_backbone(model: nn.Module) -> None:
    """Freeze everything except the visual projector (trainable in every method)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.projector.parameters():
        p.requires_grad_(True)


def check_not_applied(model: nn.Module, name: str) -> None:
    """Refuse a second method on the same model (stacking is not a supported experiment)."""
    current = getattr(model, "_peft_method", None)
    if current is not None:
        raise ValueError(
            f"this model already has the method {current!r} applied; load a fresh backbone to apply {name!r}"
        )


def apply(model: nn.Module, name_or_config, **overrides) -> MethodHandle:
    """Apply a method to a VLModel in place and return its handle.

    ``name_or_config`` is a registered name (with ``overrides`` for its config) or a config.
    """
    if isinstance(name_or_config, MethodConfig):
        if overrides:
            raise ValueError("pass overrides either in the config or as keywords, not both")
        cfg, name = name_or_config, name_or_config.method_name
        cfg.validate()
    else:
        cfg, name = get_config(name_or_config, **overrides), name_or_config
    _, fn = _lookup(name)
    check_not_applied(model, name)
    handle = fn(model, cfg)  # apply functions validate against the model before changing it
    model._peft_method = name
    model._peft_handle = handle  # save_method / load_method / merge find it here
    return handle


def handle_of(model: nn.Module) -> MethodHandle:
    """The handle of the method applied to ``model`` (ValueError if none)."""
    handle = getattr(model, "_peft_handle", None)
    if handle is None:
        raise ValueError("no method has been applied to this model: call workbench.methods.apply first")
    return handle


def save_method(model: nn.Module, path) -> None:
    """Save the applied method's trainable weights and config to ``path`` (safetensors + JSON sidecar)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from ..utils import atomic_path

    handle = handle_of(model)
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in handle.state_dict().items()}
    meta = {"method": handle.name, "config": json.dumps(handle.config.to_dict(), default=str)}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def load_method(model: nn.Module, path) -> MethodHandle:
    """Load weights saved by :func:`save_method`; applies the method first if the model has none."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if "method" not in meta:
        raise ValueError(f"{path} was not written by workbench.methods.save_method (no method metadata)")
    handle = getattr(model, "_peft_handle", None)
    if handle is None:
        cls, _ = _lookup(meta["method"])
        handle = apply(model, cls(**json.loads(meta["config"])))
    elif handle.name != meta["method"]:
        raise ValueError(f"{path} holds {meta['method']!r} weights but the model has {handle.name!r} applied")
    handle.load_state_dict(state)
    return handle


def merge(model: nn.Module) -> nn.Module:
    """Merge the applied method into the backbone for inference, where the method allows it."""
    handle_of(model).merge()
    return model


def count_parameters(model: nn.Module) -> dict:
    """Trainable parameters by group and as % of the backbone (the LM, without the projector).

    Groups: ``method`` (modules a method inserted, under ``peft_mods`` or peft's ``lora_`` etc.),
    ``backbone`` (unfrozen pre-trained LM parameters), ``projector`` (the visual projector).
    """
    groups = {"method": 0, "backbone": 0, "projector": 0}
    backbone_total = 0
    for n, p in model.named_parameters():
        is_method = _is_method_param(n)
        if n.startswith("projector."):
            group = "projector"
        elif is_method:
            group = "method"
        else:
            group = "backbone"
            if n.startswith("lm."):
                backbone_total += p.numel()
        if p.requires_grad:
            groups[group] += p.numel()
    trainable = sum(groups.values())
    return {
        **groups,
        "trainable": trainable,
        "backbone_total": backbone_total,
        "trainable_pct": 100.0 * trainable / max(backbone_total, 1),
        "method_pct": 100.0 * groups["method"] / max(backbone_total, 1),
    }


# Where method parameters live: sub-layer/projection sites (``peft_mods``), shared tensors a method
# attaches to the model (``peft_shared``), input modifiers (prompt tuning), and peft's tuner layers.
_METHOD_MARKERS = (
    "peft_", "lora_", "ia3_", "hada_", "lokr_", "vera_", "hra_", "fourierft_", "oft_", "c3a_", "miss_",
    "waveft_", "shira_", "vblora_", "input_modifiers",
)


def _is_method_param(name: str) -> bool:
    return any(m in name for m in _METHOD_MARKERS)
