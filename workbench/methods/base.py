"""The method protocol: a dataclass config, a registry with each method's metadata, and the handle.

A PEFT method is one module that registers itself, like peft's ``register_peft_method``::

    @register_method("houlsby", HoulsbyConfig, family="layer: adapters",
                     main_knob=("reduction_factor", (4, 8, 12, 24, 48)))
    def apply_houlsby(model, config) -> MethodHandle: ...

The registration (a :class:`MethodSpec`) records the config class and apply function, the method's
family (how plots group it), its main knob (what a widget offers), the prefixes of its parameter
names (what :func:`count_parameters` counts as method parameters, matched exactly against the
components of a parameter's name) and, through the config class, its default learning rate.
``apply_fn(model, config) -> MethodHandle`` freezes what the method does not train, inserts its
modules at named insertion points of the :class:`~workbench.models.VLModel`, and returns a
handle. The trainer only talks to the handle:

* ``trainable_parameters()`` -- what the optimiser updates (the projector as the method's ``train_projector`` resolves);
* ``training_losses(out, forward)`` -- losses the method adds to the task loss of a training
  forward, as a dict; by default its ``extra_losses()`` (MixPHM, PETAL); a method that needs a
  second pass over the same batch (AdaMix's consistency) calls ``forward()``;
* ``loss(forward)`` -- the loss one training batch minimises: ``forward()``'s task loss plus
  those losses (what the trainer and the benchmarks call);
* ``state_dict()`` / ``load_state_dict()`` -- the method's own weights (for the run store);
* training vs eval behaviour follows ``model.train()`` / ``model.eval()`` as usual in torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Callable, ClassVar

import torch
from torch import nn

from ..registry import Registry

MODEL_CONTAINERS = ("peft_mods", "peft_shared", "input_modifiers")
"""Where a :class:`~workbench.models.VLModel` keeps method modules: sub-layer / projection sites,
tensors a method shares across sites, input modifiers. The default parameter prefixes of a method."""


@dataclass
class MethodConfig:
    """Base of every method config.

    ``lr`` is the method's default learning rate. ``train_projector`` decides whether the visual
    projector trains: ``None`` follows the method's official code (:attr:`OFFICIAL_TRAIN_PROJECTOR`;
    e.g. MixPHM keeps the pre-trained visual embedding frozen). A freshly initialised projector (an
    HF directory wrapped with a new one) always trains, whatever the setting, and the handle says so.
    """

    OFFICIAL_TRAIN_PROJECTOR: ClassVar[bool] = True
    # Options added after runs were stored, with the values that reproduce the earlier behaviour:
    # ``{option: (neutral values...)}``. The run hash leaves an option out while it holds one of them,
    # so adding an option that changes nothing by default does not rename every stored run of the
    # method (RunConfig.hash_payload). An option that changes a default's behaviour must not be here.
    HASH_NEUTRAL: ClassVar[dict] = {}

    lr: float = 1e-3
    train_projector: bool | None = None

    @property
    def method_name(self) -> str:
        return getattr(type(self), "_method_name", type(self).__name__)

    @property
    def official_train_projector(self) -> bool:
        """Whether the method's official code trains the visual projector (a variant may differ)."""
        return type(self).OFFICIAL_TRAIN_PROJECTOR

    def hashed_dict(self) -> dict:
        """The resolved config as the run hash digests it: :meth:`to_dict` without ``lr`` (the run's
        own resolved ``lr`` entry covers it) and without options at a :attr:`HASH_NEUTRAL` value."""
        neutral = type(self).HASH_NEUTRAL
        return {k: v for k, v in self.to_dict().items()
                if k != "lr" and not (k in neutral and any(v == n and type(v) is type(n) for n in neutral[k]))}

    def validate(self) -> None:
        """Raise ValueError for impossible settings (called by :func:`apply` before any change)."""
        if not self.lr > 0:
            raise ValueError(f"{self.method_name}: lr must be > 0, got {self.lr}")
        if self.train_projector not in (None, True, False):
            raise ValueError(f"{self.method_name}: train_projector must be None (official), True or False, "
                             f"got {self.train_projector!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: what :func:`register_method` records.

    Attributes:
        name: the registered name.
        config_cls: its :class:`MethodConfig` dataclass (official defaults, incl. ``lr``).
        apply_fn: ``apply_fn(model, config) -> MethodHandle``.
        family: the group plots and tables put it in (e.g. ``"layer: adapters"``).
        param_prefixes: a parameter belongs to the method when one component of its dotted name
            starts with one of these (``"lora_"`` matches ``...q.lora_A.default.weight``, not
            ``randlora_A``).
        main_knob: ``(config field, values)`` a widget offers, or ``None``.
    """

    name: str
    config_cls: type
    apply_fn: Callable
    family: str
    param_prefixes: tuple
    main_knob: tuple | None = None

    @property
    def default_lr(self) -> float | None:
        """The method's default learning rate (its config's ``lr`` default; ``None`` where the method
        resolves it per backbone family when applied, as VL-PET does)."""
        return self.config_cls().lr

    def is_method_parameter(self, name: str) -> bool:
        """Whether the parameter called ``name`` (as in ``model.named_parameters()``) is the method's."""
        return _matches(name, self.param_prefixes)


METHODS: Registry[MethodSpec] = Registry("method")


def _matches(name: str, prefixes) -> bool:
    return any(part.startswith(p) for part in name.split(".") for p in prefixes)


def register_method(name: str, config_cls: type, *, family: str, param_prefixes=MODEL_CONTAINERS,
                    main_knob: tuple | None = None):
    """Decorator: register ``apply_fn(model, config) -> MethodHandle`` under ``name`` with its metadata.

    See :class:`MethodSpec` for the fields. A second registration of a taken name is refused.
    """
    if not (isinstance(config_cls, type) and issubclass(config_cls, MethodConfig)):
        raise TypeError(f"{name}: config_cls must be a MethodConfig dataclass, got {config_cls!r}")
    if not isinstance(family, str) or not family:
        raise ValueError(f"{name}: family must be a non-empty string, got {family!r}")
    param_prefixes = (param_prefixes,) if isinstance(param_prefixes, str) else tuple(param_prefixes)
    if not all(isinstance(p, str) and p for p in param_prefixes):
        raise ValueError(f"{name}: param_prefixes must be non-empty strings, got {param_prefixes!r}")
    if main_knob is not None:
        knob, values = main_knob
        if knob not in {f.name for f in fields(config_cls)} or not tuple(values):
            raise ValueError(f"{name}: main_knob must be (a field of {config_cls.__name__}, values), got {main_knob!r}")
        main_knob = (knob, tuple(values))

    def deco(fn):
        METHODS.register(name, MethodSpec(name, config_cls, fn, family, param_prefixes, main_knob), source=fn)
        config_cls._method_name = name
        return fn

    return deco


def list_methods() -> list[str]:
    """Registered method names."""
    return METHODS.names()


def method_spec(name: str) -> MethodSpec:
    """The registration of ``name`` (a ValueError lists the registered methods)."""
    return METHODS.get(name)


def get_config(name: str, **overrides) -> MethodConfig:
    """The method's config with its official defaults, updated by ``overrides``."""
    cls = method_spec(name).config_cls
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
        self.projector_note = ""  # why the projector trains or not (set by apply)

    @property
    def name(self) -> str:
        return self.config.method_name

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def training_losses(self, out, forward: Callable) -> dict[str, torch.Tensor]:
        """The losses added to ``out.loss`` for one training batch.

        ``out`` is the model's output for the batch and ``forward()`` runs the same batch through the
        model again (a fresh draw of anything stochastic). The default is :meth:`extra_losses`.
        """
        return self.extra_losses()

    def loss(self, forward: Callable) -> torch.Tensor:
        """The loss one training batch minimises: ``forward()``'s task loss plus :meth:`training_losses`.

        ``forward()`` runs the batch through the model (it may be called again, e.g. by AdaMix).
        """
        out = forward()
        extra = self.training_losses(out, forward)
        return out.loss + sum(extra.values(), torch.zeros((), device=out.loss.device))

    def extra_losses(self) -> dict[str, torch.Tensor]:
        """Losses added to the task loss after a forward pass (none by default)."""
        return {}

    def training_statistics(self) -> dict:
        """JSON-ready statistics of the training so far that the weights do not hold (e.g. how often
        each expert was drawn); the trainer stores them as ``metrics["method_stats"]``. None by
        default; a handle with ``draw_counts()`` (MixPHM, AdaMix) reports them."""
        counts = getattr(self, "draw_counts", None)
        if not callable(counts):
            return {}
        return {"draw_counts": {k: [int(x) for x in v.tolist()] for k, v in counts().items()}}

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
    """Freeze everything except the visual projector (:func:`apply` then sets the projector as the
    method's ``train_projector`` resolves)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.projector.parameters():
        p.requires_grad_(True)


def projector_decision(model: nn.Module, config: MethodConfig) -> tuple[bool, str]:
    """``(trains, why)`` for the visual projector under ``config`` on ``model``."""
    official = config.official_train_projector
    wanted = official if config.train_projector is None else config.train_projector
    source = "the official setting" if config.train_projector is None else "train_projector"
    if getattr(model, "projector_fresh", False):
        if not wanted:
            return True, (f"trained: the projector is freshly initialised (a new one around this backbone), so it "
                          f"trains although {source} of {config.method_name} keeps it frozen")
        return True, "trained: freshly initialised projector"
    return wanted, f"{'trained' if wanted else 'frozen'} ({source} of {config.method_name})"


def applied_method(model: nn.Module) -> str | None:
    """The name of the method applied to ``model`` (``None`` if none)."""
    handle = getattr(model, "_peft_handle", None)
    return None if handle is None else handle.name


def check_not_applied(model: nn.Module, name: str) -> None:
    """Refuse a second method on the same model (stacking is not a supported experiment)."""
    current = applied_method(model)
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
    spec = method_spec(name)
    check_not_applied(model, name)
    handle = spec.apply_fn(model, cfg)  # apply functions validate against the model before changing it
    trains, handle.projector_note = projector_decision(model, cfg)
    if not trains:
        model.projector.requires_grad_(False)
    model._peft_handle = handle  # applied_method / handle_of / save_method / merge find it here
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
        cls = method_spec(meta["method"]).config_cls
        handle = apply(model, cls(**json.loads(meta["config"])))
    elif handle.name != meta["method"]:
        raise ValueError(f"{path} holds {meta['method']!r} weights but the model has {handle.name!r} applied")
    handle.load_state_dict(state)
    return handle


def merge(model: nn.Module) -> nn.Module:
    """Merge the applied method into the backbone for inference, where the method allows it."""
    handle_of(model).merge()
    return model


def is_method_parameter(model: nn.Module, name: str) -> bool:
    """Whether ``model``'s parameter ``name`` belongs to a method: to the applied method's parameter
    prefixes, or, with no method applied, to the model's method containers (:data:`MODEL_CONTAINERS`)."""
    method = applied_method(model)
    prefixes = method_spec(method).param_prefixes if method is not None else MODEL_CONTAINERS
    return _matches(name, prefixes)


def count_parameters(model: nn.Module) -> dict:
    """Trainable parameters by group and as % of the backbone (the LM, without the projector).

    Groups: ``method`` (what the applied method inserted: its parameter prefixes, see
    :class:`MethodSpec`), ``backbone`` (unfrozen pre-trained LM parameters), ``projector`` (the
    visual projector).
    """
    method = applied_method(model)
    prefixes = method_spec(method).param_prefixes if method is not None else MODEL_CONTAINERS
    groups = {"method": 0, "backbone": 0, "projector": 0}
    backbone_total = 0
    for n, p in model.named_parameters():
        if n.startswith("projector."):
            group = "projector"
        elif _matches(n, prefixes):
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
