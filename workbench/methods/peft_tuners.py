"""LoRA and the other ``peft`` tuners that work on T5 and BART, applied to ``model.lm``.

Each tuner is injected with ``peft.inject_adapter_in_model`` into the HF model (no wrapper model);
targets are projection short names (``q k v o wi wo``) resolved through the backbone's insertion
points (:func:`projection_targets`), so one config serves T5 and BART (``q`` / ``q_proj``).
Every registered name has its own config class; defaults are peft's (= the papers'):

========== =========================================== ====================================
name       default                                     step 0
========== =========================================== ====================================
lora       r = 8, alpha = r on q, v, lr 1e-3           unchanged (B starts at 0)
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

Further tuners that pass a forward/backward on tiny T5 and BART are registered too (hra, fourierft,
boft, oft). Each registration records the tuner's parameter prefix (``lora_``, ``boft_``, ...), which
:func:`workbench.methods.count_parameters` matches exactly. Not offered: AdaLoRA (its rank allocator and orthogonality loss live
on the peft wrapper model that ``inject_adapter_in_model`` drops), VB-LoRA (shared state, like VeRA,
with a trainable shared bank), and the prompt-learning tuners (the workbench has its own prompt and
prefix tuning).

``handle.merge()`` merges every injected layer into its base weight and unloads it (peft's
``merge_and_unload`` done on the bare model), leaving a plain backbone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .base import MethodConfig, MethodHandle, freeze_backbone, register_method

PROJECTIONS = {"q", "k", "v", "o", "wi", "wo", "wi_0", "wi_1"}
LOW_RANK = "layer: low-rank / reparam."


def _is_tuner_parameter(name: str, prefix: str) -> bool:
    # exact on name components: "oft_" must not claim boft's "boft_R"
    return any(part.startswith(prefix) for part in name.split("."))


@dataclass
class LoraConfig(MethodConfig):
    r: int = 8
    alpha: float | None = None  # None: alpha = r (scale 1)
    dropout: float = 0.0
    targets: tuple = ("q", "v")  # projection short names at every attention insertion point
    # tuned on vlt5-tiny, then halved: 3e-3 left N = 16 budget-limited (docs/methods.md, "Default learning rates")
    lr: float = 1.5e-3

    def validate(self):
        super().validate()
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"lora: rank r must be a positive int, got {self.r!r}")
        bad = set(self.targets) - {"q", "k", "v", "o", "wi", "wo", "wi_0", "wi_1"}
        if bad or not self.targets:
            raise ValueError(f"lora: targets must be projection names among q k v o wi wo, got {self.targets}")


def projection_targets(model, names) -> list[str]:
    """Paths (relative to ``model.lm``) of the projections called ``names`` in every layer."""
    points = [p for p in model.insertion_points(kind="projection").values() if p.projection in names]
    if not points:
        raise ValueError(f"the backbone has no projection insertion points named {sorted(names)}")
    return [p.lm_path for p in points]


class PeftTunerHandle(MethodHandle):
    """Handle of a peft tuner; :meth:`merge` folds the tuner into the base weights and unloads it."""

    def merge(self) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        lm = self.model.lm
        for name, module in list(lm.named_modules()):
            if not isinstance(module, BaseTunerLayer):
                continue
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = lm.get_submodule(parent_name) if parent_name else lm
            setattr(parent, child, module.get_base_layer())


@register_method("lora", LoraConfig, family=LOW_RANK, param_prefixes=("lora_",), main_knob=("r", (2, 4, 8, 16, 32)))
def apply_lora(model, config: LoraConfig) -> MethodHandle:
    import peft

    freeze_backbone(model)
    peft_config = peft.LoraConfig(
        r=config.r,
        lora_alpha=config.alpha if config.alpha is not None else config.r,
        lora_dropout=config.dropout,
        target_modules=projection_targets(model, config.targets),
        bias="none",
    )
    peft.inject_adapter_in_model(peft_config, model.lm)
    for n, p in model.lm.named_parameters():
        if _is_tuner_parameter(n, "lora_"):
            p.requires_grad_(True)
    return PeftTunerHandle(model, config)




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
    lr: float = 3e-2  # tuned on vlt5-tiny (docs/methods.md, "Default learning rates")
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
    lr: float = 3e-2  # tuned on vlt5-tiny (docs/methods.md, "Default learning rates")
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
    lr: float = 3e-2  # tuned on vlt5-tiny (docs/methods.md, "Default learning rates")
    peft_class: ClassVar[str] = "FourierFTConfig"
    param_prefix: ClassVar[str] = "fourierft_"
    _own: ClassVar[tuple] = ("n_frequency", "scaling")


@dataclass
class BOFTConfig(PeftTunerConfig):
    boft_block_size: int = 4
    lr: float = 3e-2  # tuned on vlt5-tiny (docs/methods.md, "Default learning rates")
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
        if p.requires_grad and not _is_tuner_parameter(n, config.param_prefix):
            p.requires_grad_(False)
    return PeftTunerHandle(model, config)


# name -> (config class, family, main knob)
TUNERS = {
    "ia3": (IA3Config, "layer: rescaling", None),
    "loha": (LoHaConfig, LOW_RANK, ("r", (2, 4, 8, 16))),
    "lokr": (LoKrConfig, LOW_RANK, ("r", (2, 4, 8, 16))),
    "vera": (VeraConfig, LOW_RANK, ("r", (64, 128, 256))),
    "dora": (DoraConfig, LOW_RANK, ("r", (2, 4, 8, 16, 32))),
    "randlora": (RandLoraConfig, LOW_RANK, None),
    "delora": (DeloraConfig, LOW_RANK, None),
    "gralora": (GraloraConfig, LOW_RANK, None),
    "hra": (HRAConfig, "layer: orthogonal", None),
    "fourierft": (FourierFTConfig, LOW_RANK, None),
    "boft": (BOFTConfig, "layer: orthogonal", None),
    "oft": (OFTConfig, "layer: orthogonal", None),
}


def _register_all():
    for name, (cls, family, knob) in TUNERS.items():

        def apply_fn(model, config, _name=name):
            return apply_peft_tuner(model, config)

        apply_fn.__name__ = f"apply_{name}"
        register_method(name, cls, family=family, param_prefixes=(cls.param_prefix,), main_knob=knob)(apply_fn)


_register_all()
