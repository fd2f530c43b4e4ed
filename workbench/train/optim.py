"""The one optimiser and schedule of the workbench: AdamW with decay groups, warm-up, then decay.

Fine-tuning (:func:`workbench.train.run`) and pre-training (:mod:`workbench.train.pretrain`) both
build theirs here, with different settings:

- fine-tuning (the MixPHM recipe): eps 1e-6, no weight decay on biases and LayerNorms (by name),
  linear warm-up over 5 % of the steps, then linear decay to 0;
- pre-training vlt5-tiny: eps 1e-8, no weight decay on vectors (biases, norm scales), the CNN at a
  larger learning rate, linear warm-up, then cosine decay to 5 %.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

DECAYS = ("linear", "cosine")


def no_decay_by_name(name: str, param: torch.Tensor) -> bool:
    """Biases and LayerNorms are not decayed (MixPHM / VL-T5 recipe); decided by the parameter's name."""
    n = name.lower()
    return n.endswith("bias") or "layer_norm" in n or "layernorm" in n or ".norm" in n or "projector.1." in n


def no_decay_vectors(name: str, param: torch.Tensor) -> bool:
    """Every parameter with at most one dimension (biases, norm scales) is not decayed."""
    return param.dim() <= 1


def param_groups(named_params: Iterable[tuple[str, torch.Tensor]], lr: float, weight_decay: float,
                 no_decay: Callable = no_decay_by_name, lr_scale: Callable | None = None) -> list[dict]:
    """AdamW parameter groups: one per learning-rate scale (in order of first appearance), each split
    into decayed and non-decayed parameters (empty groups dropped)."""
    by_scale: dict[float, list] = {}
    for name, p in named_params:
        by_scale.setdefault(1.0 if lr_scale is None else float(lr_scale(name)), []).append((name, p))
    groups = []
    for scale, named in by_scale.items():
        for decayed in (True, False):
            params = [p for n, p in named if no_decay(n, p) != decayed]
            if params:
                groups.append({"params": params, "weight_decay": weight_decay if decayed else 0.0, "lr": lr * scale})
    return groups


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay: str = "linear", floor: float = 0.0) -> float:
    """The multiplier of the base learning rate at ``step``: linear warm-up over ``warmup_steps``, then
    ``decay`` ("linear" to ``floor`` at ``total_steps``, or "cosine" to ``floor``)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "linear":
        return max(floor, (total_steps - step) / max(1, total_steps - warmup_steps))
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def build_optimizer(named_params, lr: float, total_steps: int, *, warmup_steps: int, weight_decay: float,
                    eps: float = 1e-8, decay: str = "linear", floor: float = 0.0,
                    no_decay: Callable = no_decay_by_name, lr_scale: Callable | None = None):
    """``(AdamW, LambdaLR)`` over ``named_params`` (``[(name, parameter), ...]``, all trained).

    Raises:
        ValueError: no parameters, or impossible settings.
    """
    named_params = list(named_params)
    if not named_params:
        raise ValueError("build_optimizer: there is no parameter to train")
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
    if not lr > 0 or total_steps < 1 or warmup_steps < 1:
        raise ValueError(f"need lr > 0, total_steps >= 1 and warmup_steps >= 1; got lr={lr}, "
                         f"total_steps={total_steps}, warmup_steps={warmup_steps}")
    groups = param_groups(named_params, lr, weight_decay, no_decay, lr_scale)
    # The multi-tensor AdamW (torch's default on CUDA). On the CPU its foreach ops run tensor by tensor
    # with the kernels of the default single-tensor loop, so the floats are the same
    # (tests/train/test_optim.py; re-trained full, LoRA, MixPHM, PETAL and AdaMix runs matched their
    # stored histories exactly); it saves some Python per step (about 1 % of vlt5-tiny's full step).
    opt = torch.optim.AdamW(groups, lr=lr, eps=eps, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_factor(step, total_steps, warmup_steps, decay, floor))
    return opt, sched
