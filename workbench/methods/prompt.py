"""Prompt tuning (Lester et al., 2021): L trainable vectors in the encoder input.

The soft prompt is inserted by an input modifier (``model.add_input_modifier``) *just before the
text*: ``[v_1 .. v_n] ++ [p_1 .. p_L] ++ embed(prompt)`` in the ``visual_first`` layout,
``[p_1 .. p_L] ++ embed(prompt) ++ [v_1 .. v_n]`` in ``text_first``, with the attention mask extended
by L ones. ``VLModel.build_encoder_inputs`` runs the modifiers in ``forward``,
``encode`` and ``generate`` alike, so decoding sees the same prompt as training.

Defaults: L = 20 (Lester et al. report that 20 tokens already recover most of the gain of 100;
the empirical study sweeps L). Initialisation ``init="vocab"`` (the default, Lester et al.'s
"sampled vocabulary" init and common practice): L token ids drawn uniformly from the non-special
vocabulary, embedded exactly as the encoder embeds text (BART's ``embed_scale`` included), so the
prompt starts on the scale of real tokens. ``init="normal"``: N(0, sigma^2) with sigma the standard
deviation of the embedding matrix (times BART's ``embed_scale``). lr = 1e-2: soft prompts need a
larger step than adapters (Lester et al. used 0.3 with Adafactor); the projector trains with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import MethodConfig, MethodHandle, freeze_backbone, register_method

INITS = ("vocab", "normal")


@dataclass
class PromptConfig(MethodConfig):
    """Prompt tuning options: ``length`` L, ``init`` (``vocab`` | ``normal``), ``lr``."""

    length: int = 20
    init: str = "vocab"
    lr: float = 3e-2  # tuned on vlt5-tiny (docs/methods.md)

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.length, int) or isinstance(self.length, bool) or self.length <= 0:
            raise ValueError(f"{self.method_name}: prompt length must be a positive int, got {self.length!r}")
        if self.init not in INITS:
            raise ValueError(f"{self.method_name}: init must be one of {list(INITS)}, got {self.init!r}")


class SoftPrompt(nn.Module):
    """Input modifier: insert the trainable ``prompt`` ``[L, d]`` after the visual tokens."""

    def __init__(self, prompt: torch.Tensor):
        super().__init__()
        self.prompt = nn.Parameter(prompt)

    @property
    def length(self) -> int:
        return self.prompt.shape[0]

    def forward(self, inputs):
        return inputs.insert(inputs.text_start, self.prompt)


def _special_ids(tokenizer) -> set:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    return {i for i in ids if i is not None}


@torch.no_grad()
def init_prompt(model, length: int, init: str) -> torch.Tensor:
    """The initial prompt ``[length, d_model]`` (see the module docstring)."""
    emb = model.family_spec.text_embedding(model.lm)
    vocab = emb.weight.shape[0]
    if init == "vocab":
        special = _special_ids(model.tokenizer)
        candidates = torch.tensor([i for i in range(vocab) if i not in special], dtype=torch.long)
        if candidates.numel() == 0:
            raise ValueError("prompt: the vocabulary has no non-special token to initialise from")
        ids = candidates[torch.randint(len(candidates), (length,))]
        return model.family_spec.embed_text(model.lm, ids.to(emb.weight.device).unsqueeze(0))[0].detach().clone()
    scale = float(getattr(emb, "embed_scale", 1.0) or 1.0)
    std = float(emb.weight.float().std()) if emb.weight.device.type != "meta" else 1.0
    return torch.randn(length, emb.weight.shape[1], device=emb.weight.device, dtype=emb.weight.dtype) * std * scale


class PromptHandle(MethodHandle):
    """Prompt tuning handle; ``prompt`` is the trainable ``[L, d]`` parameter."""

    @property
    def prompt(self) -> nn.Parameter:
        return self.modules["prompt"].prompt


@register_method("prompt", PromptConfig, family="embedding composition", main_knob=("length", (5, 10, 20, 40)))
def apply_prompt(model, config: PromptConfig) -> PromptHandle:
    if len(model.input_modifiers) or model.modifications():
        raise ValueError("prompt: the model already carries modifications; load a fresh backbone")
    if model.family == "bart":
        max_pos = getattr(model.lm.config, "max_position_embeddings", None)
        if max_pos is not None and config.length >= max_pos:
            raise ValueError(f"prompt: length {config.length} must be < max_position_embeddings ({max_pos})")
    prompt = init_prompt(model, config.length, config.init)
    freeze_backbone(model)
    modifier = SoftPrompt(prompt)
    model.add_input_modifier(modifier)
    modifier.requires_grad_(True)
    return PromptHandle(model, config, modules={"prompt": modifier})
