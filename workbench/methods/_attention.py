"""Key/value prefixes through transformers' attention interface (used by prefix tuning).

In transformers 5 every ``T5Attention`` / ``BartAttention`` computes q, k, v (k and v after the KV
cache update) and then calls ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation,
eager)(module, q, k, v, mask, scaling=..., dropout=..., [position_bias=... for T5], ...)``. A
forward hook on the k/v projections cannot add rows, so prefixes are added here instead:

- two implementations are registered, ``wb_prefix_sdpa`` and ``wb_prefix_eager``, each wrapping
  the implementation the model used before (the mask functions are registered under the same
  names, so the masks are built exactly as for ``sdpa`` / ``eager``);
- the wrapper finds the prefix of ``module`` through :func:`attach_prefix` (a plain attribute
  holding a reference, so ``copy.deepcopy(model)`` keeps the link), prepends the prefix keys and
  values ``[batch, heads, L, d_head]``, pads the mask on the key axis (``True`` for boolean masks,
  ``0`` for additive float masks), pads T5's ``position_bias`` with zeros (the prefix has no
  relative position), and calls the wrapped implementation;
- when the mask is ``None`` for a causal self-attention (sdpa's ``is_causal`` fast path), an
  explicit causal mask aligned to the *real* keys is built first: sdpa's ``is_causal`` aligns the
  triangle to the top-left, which is wrong once the prefix makes the key axis longer.

The prefix is prepended after the cache update, so the KV cache only ever holds the real keys and
values and ``generate`` with ``use_cache=True`` sees the same prefix at every step.
"""

from __future__ import annotations

import sys

import torch

BASES = ("sdpa", "eager")
PREFIX = "wb_prefix_"


class PrefixRef:
    """A plain (non-module) holder put on an attention module: ``module._wb_prefix.site``."""

    def __init__(self, site):
        self.site = site


def attach_prefix(attn_module, site) -> None:
    """Link ``attn_module`` to ``site`` (an object with ``enabled`` and ``key_values(dtype, device)``)."""
    attn_module.__dict__["_wb_prefix"] = PrefixRef(site)


def detach_prefix(attn_module) -> None:
    attn_module.__dict__.pop("_wb_prefix", None)


def _generic_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_bias=None,
                   **kwargs):
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    w = torch.matmul(query, key.transpose(2, 3)) * scaling
    if position_bias is not None:
        w = w + position_bias
    if attention_mask is not None:
        w = w + attention_mask
    w = torch.nn.functional.softmax(w, dim=-1)
    w = torch.nn.functional.dropout(w, p=dropout, training=module.training)
    return torch.matmul(w, value).transpose(1, 2).contiguous(), w


def _base_function(base: str, module):
    if base == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    # The model's own eager function (T5's adds position_bias); a generic one otherwise.
    mod = sys.modules.get(type(module).__module__)
    return getattr(mod, "eager_attention_forward", _generic_eager)


def causal_mask(q_len: int, k_len: int, device) -> torch.Tensor:
    """Boolean ``[1, 1, q, k]`` causal mask aligned to the bottom-right (query i sees keys <= k - q + i)."""
    q_idx = torch.arange(q_len, device=device).unsqueeze(1)
    k_idx = torch.arange(k_len, device=device).unsqueeze(0)
    return (k_idx <= q_idx + (k_len - q_len)).view(1, 1, q_len, k_len)


def with_prefix(query, key, value, attention_mask, prefix_k, prefix_v, module=None, base: str = "sdpa", **kwargs):
    """Prepend ``prefix_k`` / ``prefix_v`` (``[L, heads * d_head]``) and pad the mask / position bias.

    Returns ``(key, value, attention_mask, kwargs)`` ready for the wrapped implementation.
    """
    b, heads, k_len, d_head = key.shape
    q_len = query.shape[2]
    L = prefix_k.shape[0]
    pk = prefix_k.to(key.dtype).view(L, heads, d_head).transpose(0, 1).unsqueeze(0).expand(b, -1, -1, -1)
    pv = prefix_v.to(value.dtype).view(L, heads, d_head).transpose(0, 1).unsqueeze(0).expand(b, -1, -1, -1)
    key = torch.cat([pk, key], dim=2)
    value = torch.cat([pv, value], dim=2)
    if attention_mask is None and q_len > 1 and getattr(module, "is_causal", False):
        attention_mask = causal_mask(q_len, k_len, key.device)
        if base == "eager":
            attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=key.device).masked_fill(
                ~attention_mask, torch.finfo(query.dtype).min
            )
    if attention_mask is not None:
        pad_shape = (*attention_mask.shape[:-1], L)
        if attention_mask.dtype == torch.bool:
            pad = torch.ones(pad_shape, dtype=torch.bool, device=attention_mask.device)
        else:
            pad = torch.zeros(pad_shape, dtype=attention_mask.dtype, device=attention_mask.device)
        attention_mask = torch.cat([pad, attention_mask], dim=-1)
    pb = kwargs.get("position_bias")
    if pb is not None:
        kwargs["position_bias"] = torch.nn.functional.pad(pb, (L, 0))
    return key, value, attention_mask, kwargs


def make_prefix_attention(base: str):
    """The attention function registered as ``wb_prefix_<base>``."""

    def prefix_attention(module, query, key, value, attention_mask, **kwargs):
        fn = _base_function(base, module)
        ref = module.__dict__.get("_wb_prefix")
        site = ref.site if ref is not None else None
        if site is None or not site.enabled:
            return fn(module, query, key, value, attention_mask, **kwargs)
        prefix_k, prefix_v = site.key_values(dtype=key.dtype, device=key.device)
        key, value, attention_mask, kwargs = with_prefix(query, key, value, attention_mask, prefix_k, prefix_v,
                                                         module=module, base=base, **kwargs)
        return fn(module, query, key, value, attention_mask, **kwargs)

    prefix_attention.__name__ = f"{PREFIX}{base}_attention"
    return prefix_attention


_REGISTERED = False


def register_prefix_attention() -> None:
    """Register ``wb_prefix_sdpa`` / ``wb_prefix_eager`` (attention and mask functions); idempotent."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    masks = {"sdpa": sdpa_mask, "eager": eager_mask}
    for base in BASES:
        AttentionInterface.register(PREFIX + base, make_prefix_attention(base))
        AttentionMaskInterface.register(PREFIX + base, masks[base])
    _REGISTERED = True


def current_implementation(lm) -> str:
    """The attention implementation shared by every attention config of ``lm`` (ValueError if mixed)."""
    impls = set()
    for m in lm.modules():
        cfg = getattr(m, "config", None)
        impl = getattr(cfg, "_attn_implementation", None)
        if impl is not None and type(m).__name__.endswith("Attention"):
            impls.add(impl)
    impls.add(lm.config._attn_implementation)
    if len(impls) != 1:
        raise ValueError(f"the LM's attention modules use different implementations {sorted(impls)}")
    return impls.pop()


def switch_to_prefix(lm, attention_modules) -> str:
    """Switch ``lm`` (every sub-model config) to ``wb_prefix_<base>``; return the base it had."""
    register_prefix_attention()
    base = current_implementation(lm)
    if base.startswith(PREFIX):
        raise ValueError(f"the LM already uses the prefix attention {base!r}")
    if base not in BASES:
        raise ValueError(f"prefix tuning needs the 'sdpa' or 'eager' attention implementation, the LM uses {base!r}; "
                         "call lm.set_attn_implementation('sdpa') first")
    target = PREFIX + base
    lm.set_attn_implementation(target)
    # T5's encoder and decoder hold copied configs: check every attention module really switched.
    for m in attention_modules:
        if m.config._attn_implementation != target:
            m.config._attn_implementation_internal = target
        if m.config._attn_implementation != target:
            raise RuntimeError(f"could not switch {type(m).__name__} to {target!r}")
    return base
