"""Parameter counts on full-size shapes (T5-base, BART-base built on the meta device: no weights,
no download), each checked against a count computed by hand from the method's definition.

T5-base: d 768, d_ff 3072, 12 + 12 layers, 12 heads, vocab 32128 (222,903,552 parameters with the
tied LM head). BART-base: d 768, d_ff 3072, 6 + 6 layers, vocab 50265 (139,420,416).
Attention sub-layers: T5-base 12 encoder + 24 decoder (self + cross) = 36, FFNs 24; BART-base 18, 12.
MixPHM's 874,048 is also checked module by module in ``test_mixphm.py``.

``count_parameters`` counts as ``method`` only the tensors under the method's parameter prefixes (the
inserted modules); pre-trained LayerNorms a method unfreezes are LM tensors, counted under
``backbone``. So VL-Adapter's 8,899,200 on T5-base (``houlsby``: 60 adapters x 148,320, d // 8 = 96)
is the adapters alone; its ``--unfreeze_layer_norms`` adds the 62 LayerNorm weights of T5-base
(47,616) to ``backbone`` -- as Compacter's ``unfreeze_layer_norms: true`` does (BART-base: 32
LayerNorms with bias, 49,152).
"""

from __future__ import annotations

import warnings

import pytest

from workbench import methods

D, D_FF = 768, 3072
SHAPES = {
    # layers per stack, total parameters of the LM
    "t5": dict(layers=12, total=222_903_552),
    "bart": dict(layers=6, total=139_420_416),
}


def _adapter(d, m):
    return d * m + m + m * d + d  # Down (weight + bias) + Up (weight + bias)


def _phm_adapter(d, m, n=4, r=1):
    down = n * (d // n) * r + n * r * (m // n) + m  # s_i, t_i, bias
    up = n * (m // n) * r + n * r * (d // n) + d
    return down + up


def expected(name: str, family: str) -> int:
    L = SHAPES[family]["layers"]
    enc_attn, dec_self, dec_cross, ffn = L, L, L, 2 * L
    attn = enc_attn + dec_self + dec_cross
    if name == "mixphm":
        m = D // 12
        down = 4 * (D // 4) * 8 + 4 * 8 * (m // 4) + m
        up = 4 * (m // 4) * 8 + 4 * 8 * (D // 4) + D
        assert (down, up) == (6_720, 7_424)
        return ffn * (down + 4 * up) + 4 ** 3
    if name == "compacter":  # after self-attention and FFN, one shared A
        assert _phm_adapter(D, D // 32) == 2_376
        return (enc_attn + dec_self + ffn) * _phm_adapter(D, D // 32) + 4 ** 3
    if name == "compacter++":
        return ffn * _phm_adapter(D, D // 32) + 4 ** 3
    if name == "houlsby":  # VL-Adapter: every attention (cross too) and FFN, d // 8
        return (attn + ffn) * _adapter(D, D // 8)
    if name in ("pfeiffer", "parallel"):
        return ffn * _adapter(D, D // 12)
    if name == "lora":  # r = 8 on q and v of every attention
        return attn * 2 * 8 * (D + D)
    if name == "ia3":  # k, v of every attention + the FFN input of wo
        return attn * 2 * D + ffn * D_FF
    if name == "vera":  # lambda_d (r = 256) + lambda_b (out) on q and v
        return attn * 2 * (256 + D)
    if name == "dora":
        return attn * 2 * (8 * (D + D) + D)
    raise KeyError(name)


CASES = ["mixphm", "compacter", "compacter++", "houlsby", "pfeiffer", "parallel", "lora", "ia3", "vera", "dora"]

# Pre-trained tensors a method unfreezes (count_parameters' "backbone"): every LayerNorm of the LM for
# VL-Adapter (--unfreeze_layer_norms) and Compacter (compacter.json unfreeze_layer_norms: true).
# T5-base: 12 x 2 + 1 encoder and 12 x 3 + 1 decoder RMS norms (weight only); BART-base: 6 x 2 + 1
# (layernorm_embedding) and 6 x 3 + 1, weight and bias.
LAYER_NORMS = {"t5": (2 * 12 + 1 + 3 * 12 + 1) * D, "bart": (2 * 6 + 1 + 3 * 6 + 1) * 2 * D}
UNFREEZES_LAYER_NORMS = {"houlsby", "compacter", "compacter++"}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_method_parameter_counts(name, family, meta_backbone):
    model = meta_backbone(family)
    methods.apply(model, name)
    counts = methods.count_parameters(model)
    assert counts["method"] == expected(name, family)
    assert counts["backbone"] == (LAYER_NORMS[family] if name in UNFREEZES_LAYER_NORMS else 0)
    assert counts["backbone_total"] == SHAPES[family]["total"]
    assert counts["projector"] == 2048 * D + D + 2 * D  # Linear(2048 -> 768) + LayerNorm
    assert counts["method_pct"] == pytest.approx(100 * counts["method"] / SHAPES[family]["total"])


def test_the_headline_numbers(meta_backbone):
    model = meta_backbone("t5")
    methods.apply(model, "mixphm")
    counts = methods.count_parameters(model)
    assert counts["method"] == 874_048
    assert round(counts["method_pct"], 2) == 0.39  # the 0.39% of the MixPHM paper's T5-base setting
    assert expected("compacter", "t5") == 114_112 and expected("compacter++", "t5") == 57_088


def test_vl_adapter_headline_number(meta_backbone):
    """VL-Adapter (single adapter, reduction factor 8) on T5-base: 60 adapters x 148,320 = 8,899,200
    method parameters; the unfrozen LayerNorms (47,616) are reported separately, as backbone."""
    model = meta_backbone("t5")
    handle = methods.apply(model, "houlsby")
    counts = methods.count_parameters(model)
    assert len(handle.modules) == 60 and _adapter(D, 96) == 148_320
    assert counts["method"] == 8_899_200 == 60 * 148_320
    assert counts["backbone"] == 47_616 == 62 * D
    print(f"houlsby on T5-base: method {counts['method']:,} ({counts['method_pct']:.2f} % of the LM), "
          f"LayerNorms {counts['backbone']:,}, trainable {counts['trainable']:,} ({counts['trainable_pct']:.2f} %)")


@pytest.mark.parametrize("family, trained", [("t5", (2 * 12 + 1 + 3 * 12 + 1) * D), ("bart", None)])
def test_bitfit_counts(family, trained, meta_backbone):
    model = meta_backbone(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        methods.apply(model, "bitfit")
    counts = methods.count_parameters(model)
    if trained is None:  # BART-base: q k v o fc1 fc2 and LayerNorm biases + the embedding LayerNorms
        enc = 4 * D + D_FF + D + 2 * D
        dec = 8 * D + D_FF + D + 3 * D
        trained = 6 * enc + 6 * dec + 2 * D
        assert trained == 125_952
    assert counts["backbone"] == trained and counts["method"] == 0
