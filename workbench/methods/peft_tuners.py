"""The other ``peft`` tuners that work on T5 and BART, applied to ``model.lm`` like ``lora``.

Each tuner is injected with ``peft.inject_adapter_in_model`` into the HF model (no wrapper model);
targets are projection short names (``q k v o wi wo``) resolved through the backbone's insertion
points (:func:`workbench.methods.lora.projection_targets`), so one config serves T5 and BART.
Every registered name has its own config class; defaults are peft's (= the papers'):

========== =========================================== ====================================
name       default                                     step 0
========== =========================================== ====================================
ia3        (IA)^3 on k, v and the FFN input of wo      unchanged (vectors start at 1)
           (``feedforward=("wo",)``), lr 3e-3 (T-Few)
loha       r = 8, alpha = 8 on q, v                    unchanged (one factor starts at 0)
lokr       r = 8, alpha = 8 on q, v                    unchanged
vera       r = 256, d_initial = 0.1 on q, v;           unchanged (lambda_b starts at 0)
           frozen random A/B from ``projection_prng_key``
dora       LoRA r = 8 with weight decomposition, q, v  unchanged (B starts at 0)
randlora   r = 32 on q, v (peft defaults)              unchanged
delora     r = 8, lambda = 15 on q, v                  unchanged
gralora    r = 32, k = 2 on q, v                       unchanged
========== =========================================== ====================================

``options`` passes any further keyword to the peft config class unchanged (e.g.
``apply(model, "loha", options={"rank_dropout": 0.1})``).

VeRA: peft refuses ``inject_adapter_in_model`` for it ("uses shared state stored on the tuner": the
frozen random projections are one BufferDict that every layer references). The workbench builds the
tuner exactly as ``inject_adapter_in_model`` does (``VeraModel(lm, config, "default")``, which
injects in place) and keeps the injected model; the projections stay referenced by the layers, and
since they are regenerated from ``projection_prng_key`` they are not saved with the method
(``handle.state_dict`` holds the trainable lambdas).

Further tuners that pass a forward/backward on tiny T5 and BART (hra, fourierft, boft, oft) are
registered only when :func:`workbench.methods.base.count_parameters` recognises their parameter
prefix as a method parameter (``base._METHOD_MARKERS``); otherwise their parameters would be
reported as unfrozen backbone. Not offered: AdaLoRA (its rank allocator and orthogonality loss live
on the peft wrapper model that ``inject_adapter_in_model`` drops), VB-LoRA (shared state, like VeRA,
with a trainable shared bank), and the prompt-learning tuners (the workbench has its own prompt and
prefix tuning).

``handle.merge()`` merges every injected layer into its base weight and unloads it (peft's
``merge_and_unload`` done on the bare model), leaving a plain backbone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .base import MethodConfig, MethodHandle, _is_method_param, freeze_backbone, register_method
from .lora import PeftTunerHandle, projection_targets

PROJECTIONS = {"q", "k", "v", "o", "wi", "wo", "wi_0", "wi_1"}


def _check_projections(names, what: str) -> tuple:
    if isinstance(names, str):
        names = (names,)
    names = tuple(names)
    bad = set(names) - PROJECTIONS
    if bad or not names:
        raise ValueError(f"{what} must be projection names among {sorted(PROJECTIONS)}, got {names!r}")
    return names


@dataclass
class PeftTunerConfig(MethodConfig):
    """Common fields: ``targets`` (projection short names) and ``options`` (extra peft kwargs)."""

    targets: tuple = ("q", "v")
    options: dict = field(default_factory=dict)
    lr: float = 1e-3

    peft_class: ClassVar[str] = ""
    param_prefix: ClassVar[str] = ""  # the tuner's parameter-name prefix (for count_parameters)
    _own: ClassVar[tuple] = ()  # config fields passed to peft under the same name

    def validate(self):
        super().validate()
        self.targets = _check_projections(self.targets, f"{self.method_name}: targets")
        if not isinstance(self.options, dict):
            raise ValueError(f"{self.method_name}: options must be a dict of peft config arguments")
        for name in self._own:
            v = getattr(self, name)
            if name == "r" and v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{self.method_name}: rank r must be a positive int, got {v!r}")

    def peft_kwargs(self, model) -> dict:
        kw = {name: getattr(self, name) for name in self._own if getattr(self, name) is not None}
        kw["target_modules"] = projection_targets(model, self.targets)
        return {**kw, **self.options}

    def peft_config(self, model):
        import peft

        cls = getattr(peft, self.peft_class, None)
        if cls is None:
            raise ValueError(f"{self.method_name}: peft {peft.__version__} has no {self.peft_class}; "
                             "this tuner needs a newer peft")
        try:
            return cls(**self.peft_kwargs(model))
        except TypeError as e:  # an unknown key in options
            raise ValueError(f"{self.method_name}: invalid peft option ({e})") from e


@dataclass
class IA3Config(PeftTunerConfig):
    targets: tuple = ("k", "v", "wo")
    feedforward: tuple = ("wo",)  # targets whose *input* is scaled (the FFN activations)
    lr: float = 3e-3
    peft_class: ClassVar[str] = "IA3Config"
    param_prefix: ClassVar[str] = "ia3_"

    def validate(self):
        super().validate()
        self.feedforward = _check_projections(self.feedforward, "ia3: feedforward") if self.feedforward else ()
        if not set(self.feedforward) <= set(self.targets):
            raise ValueError(f"ia3: feedforward {self.feedforward} must be among the targets {self.targets}")

    def peft_kwargs(self, model) -> dict:
        kw = super().peft_kwargs(model)
        kw["feedforward_modules"] = projection_targets(model, self.feedforward) if self.feedforward else []
        return {**kw, **self.options}


@dataclass
class LoHaConfig(PeftTunerConfig):
    r: int = 8
    alpha: float = 8
    peft_class: ClassVar[str] = "LoHaConfig"
    param_prefix: ClassVar[str] = "hada_"
    _own: ClassVar[tuple] = ("r", "alpha")


@dataclass
class LoKrConfig(PeftTunerConfig):
    r: int = 8
    alpha: float = 8
    peft_class: ClassVar[str] = "LoKrConfig"
    param_prefix: ClassVar[str] = "lokr_"
    _own: ClassVar[tuple] = ("r", "alpha")


@dataclass
class VeraConfig(PeftTunerConfig):
    r: int = 256
    d_initial: float = 0.1
    projection_prng_key: int = 0
    peft_class: ClassVar[str] = "VeraConfig"
    param_prefix: ClassVar[str] = "vera_"
    _own: ClassVar[tuple] = ("r", "d_initial", "projection_prng_key")


@dataclass
class DoraConfig(PeftTunerConfig):
    r: int = 8
    alpha: float | None = None  # None: alpha = r
    peft_class: ClassVar[str] = "LoraConfig"
    param_prefix: ClassVar[str] = "lora_"
    _own: ClassVar[tuple] = ("r",)

    def peft_kwargs(self, model) -> dict:
        kw = super().peft_kwargs(model)
        kw = {"use_dora": True, "lora_alpha": self.alpha if self.alpha is not None else self.r, **kw}
        return {**kw, **self.options}


@dataclass
class RandLoraConfig(PeftTunerConfig):
    r: int = 32
    projection_prng_key: int = 0
    peft_class: ClassVar[str] = "RandLoraConfig"
    param_prefix: ClassVar[str] = "randlora_"
    _own: ClassVar[tuple] = ("r", "projection_prng_key")


@dataclass
class DeloraConfig(PeftTunerConfig):
    r: int = 8
    delora_lambda: float = 15
    peft_class: ClassVar[str] = "DeloraConfig"
    param_prefix: ClassVar[str] = "delora_"
    _own: ClassVar[tuple] = ("r", "delora_lambda")


@dataclass
class GraloraConfig(PeftTunerConfig):
    r: int = 32
    gralora_k: int = 2
    peft_class: ClassVar[str] = "GraloraConfig"
    param_prefix: ClassVar[str] = "gralora_"
    _own: ClassVar[tuple] = ("r", "gralora_k")


@dataclass
class HRAConfig(PeftTunerConfig):
    r: int = 8
    peft_class: ClassVar[str] = "HRAConfig"
    param_prefix: ClassVar[str] = "hra_"
    _own: ClassVar[tuple] = ("r",)


@dataclass
class FourierFTConfig(PeftTunerConfig):
    n_frequency: int = 1000
    scaling: float = 150.0
    peft_class: ClassVar[str] = "FourierFTConfig"
    param_prefix: ClassVar[str] = "fourierft_"
    _own: ClassVar[tuple] = ("n_frequency", "scaling")


@dataclass
class BOFTConfig(PeftTunerConfig):
    boft_block_size: int = 4
    peft_class: ClassVar[str] = "BOFTConfig"
    param_prefix: ClassVar[str] = "boft_"
    _own: ClassVar[tuple] = ("boft_block_size",)


@dataclass
class OFTConfig(PeftTunerConfig):
    oft_block_size: int = 32
    peft_class: ClassVar[str] = "OFTConfig"
    param_prefix: ClassVar[str] = "oft_"
    _own: ClassVar[tuple] = ("oft_block_size",)

    def peft_kwargs(self, model) -> dict:
        return {"r": 0, **super().peft_kwargs(model)}  # OFT takes either r or the block size


def apply_peft_tuner(model, config: PeftTunerConfig) -> MethodHandle:
    """Freeze the backbone, inject the tuner into ``model.lm``, train its parameters."""
    import peft

    peft_config = config.peft_config(model)  # resolves the targets: raises before any change
    freeze_backbone(model)
    if config.peft_class == "VeraConfig":
        # inject_adapter_in_model refuses VeRA (shared projections); this is what it would run.
        peft.tuners.VeraModel(model.lm, peft_config, "default")
    else:
        peft.inject_adapter_in_model(peft_config, model.lm)
    # peft leaves exactly its adapter parameters trainable (frozen random bases such as VeRA's are
    # buffers); make sure nothing of the backbone slipped through.
    for n, p in model.lm.named_parameters():
        if p.requires_grad and config.param_prefix not in n:
            p.requires_grad_(False)
    return PeftTunerHandle(model, config)


TUNERS = {
    "ia3": IA3Config,
    "loha": LoHaConfig,
    "lokr": LoKrConfig,
    "vera": VeraConfig,
    "dora": DoraConfig,
    "randlora": RandLoraConfig,
    "delora": DeloraConfig,
    "gralora": GraloraConfig,
    # registered once count_parameters knows their prefix (see the module docstring)
    "hra": HRAConfig,
    "fourierft": FourierFTConfig,
    "boft": BOFTConfig,
    "oft": OFTConfig,
}


def _register_all():
    for name, cls in TUNERS.items():
        if not _is_method_param(f"lm.x.{cls.param_prefix}A.default"):
            continue  # its parameters would be counted as backbone: not offered until base knows them

        def apply_fn(model, config, _name=name):
            return apply_peft_tuner(model, config)

        apply_fn.__name__ = f"apply_{name}"
        register_method(name, cls)(apply_fn)


_register_all()
