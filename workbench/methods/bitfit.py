"""BitFit (Ben Zaken et al. 2022): train only the bias terms of the LM (plus the visual projector).

BART has biases in every linear layer and LayerNorm: those are trained. T5 has *no* bias anywhere in
its linear layers (and its RMS LayerNorms have no bias either), so plain BitFit would train nothing in
the LM; the workbench then trains the LayerNorm weights instead (the scale vectors, the closest
per-channel parameters) and says so: ``handle.note`` explains it and a ``UserWarning`` is raised
(``no_bias_fallback="error"`` makes it a ValueError instead).

The trained tensors are backbone parameters, so ``count_parameters`` reports them in the
``backbone`` group; they are part of the backbone already, so :meth:`merge` has nothing to do.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch import nn

from .base import MethodConfig, MethodHandle, freeze_backbone, register_method


@dataclass
class BitFitConfig(MethodConfig):
    no_bias_fallback: str = "layer_norm"  # what to train when the LM has no bias: "layer_norm" or "error"
    lr: float = 3e-2  # tuned on vlt5-tiny (docs/methods.md, "Default learning rates")

    def validate(self):
        super().validate()
        if self.no_bias_fallback not in ("layer_norm", "error"):
            raise ValueError(f"bitfit: no_bias_fallback must be 'layer_norm' or 'error', got {self.no_bias_fallback!r}")


class BitFitHandle(MethodHandle):
    """Handle with a ``note`` saying what was trained (biases, or LayerNorm weights for T5) and
    ``trained``, the names of the trained LM tensors."""

    def __init__(self, model, config, note: str, trained: list[str]):
        super().__init__(model, config)
        self.note, self.trained = note, list(trained)

    def merge(self) -> None:
        """Nothing to do: BitFit trains backbone tensors in place."""


def _layer_norm_weights(lm: nn.Module) -> list[str]:
    names = []
    for mname, module in lm.named_modules():
        if isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("LayerNorm"):
            names += [f"{mname}.{n}" for n, p in module.named_parameters(recurse=False) if n == "weight"]
    return names


@register_method("bitfit", BitFitConfig, family="selective")
def apply_bitfit(model, config: BitFitConfig) -> MethodHandle:
    lm = model.lm
    params = dict(lm.named_parameters())
    biases = [n for n in params if n.endswith("bias")]
    if biases:
        trained = biases
        n_params = sum(params[n].numel() for n in biases)
        note = f"bitfit: training the {len(biases)} bias tensors of the LM ({n_params:,} parameters)"
    else:
        if config.no_bias_fallback == "error":
            raise ValueError(f"bitfit: the {model.family} LM has no bias parameters (T5's linears and RMS "
                             "LayerNorms have none); use no_bias_fallback='layer_norm' to train the LayerNorm weights")
        trained = _layer_norm_weights(lm)
        if not trained:
            raise ValueError("bitfit: the LM has neither bias parameters nor LayerNorm weights to train")
        note = (f"bitfit: the {model.family} LM has no bias parameters (T5 uses none in its linear layers), "
                f"so BitFit trains its {len(trained)} LayerNorm weight vectors instead "
                f"({sum(params[n].numel() for n in trained):,} parameters)")
        warnings.warn(note, UserWarning, stacklevel=3)
    freeze_backbone(model)
    for n in trained:
        params[n].requires_grad_(True)
    return BitFitHandle(model, config, note, [f"lm.{n}" for n in trained])
