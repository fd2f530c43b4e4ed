"""LoRA through the peft library (``inject_adapter_in_model``, no wrapper model).

Default (spec/methods.md): r = 8 on the q and v projections of every attention, alpha = r.
Targets are resolved from the backbone's named insertion points, so the same config works for
T5 (``q``, ``v``) and BART (``q_proj``, ``v_proj``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import MethodConfig, MethodHandle, freeze_backbone, register_method


@dataclass
class LoraConfig(MethodConfig):
    r: int = 8
    alpha: float | None = None  # None: alpha = r (scale 1)
    dropout: float = 0.0
    targets: tuple = ("q", "v")  # projection short names at every attention insertion point
    lr: float = 1e-3

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


@register_method("lora", LoraConfig)
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
        if "lora_" in n:
            p.requires_grad_(True)
    return PeftTunerHandle(model, config)
