"""Full fine-tuning: every parameter trains (the reference every PEFT method is compared to)."""

from dataclasses import dataclass

from .base import MethodConfig, MethodHandle, register_method


@dataclass
class FullConfig(MethodConfig):
    lr: float = 3e-4


@register_method("full", FullConfig, family="full fine-tuning")
def apply_full(model, config: FullConfig) -> MethodHandle:
    for p in model.parameters():
        p.requires_grad_(True)
    # The visual encoder produced the cached features: it is not part of the trained model.
    if getattr(model, "visual_encoder", None) is not None:
        for p in model.visual_encoder.parameters():
            p.requires_grad_(False)
    return MethodHandle(model, config)
