"""Prompt tuning (soft prompt after the visual tokens) and prefix tuning (key/value prefixes in every
encoder and decoder attention through transformers' attention interface).

Uses the ``tiny_model`` / ``tiny_batch`` fixtures of ``tests/methods/conftest.py``.
"""

from __future__ import annotations

import pytest
import torch

from workbench import methods
from workbench.methods import _attention
from workbench.methods.prefix import PrefixReparam

torch.set_num_threads(1)


def _enc(model, batch):
    enc, mask = model.encode(batch["visual_feats"], batch["input_ids"], batch["attention_mask"],
                             output_hidden_states=True)
    return enc, mask


def _gen(model, batch, **kw):
    return model.generate(batch["visual_feats"], batch["input_ids"], batch["attention_mask"], max_new_tokens=5, **kw)


# ------------------------------------------------------------------------------ prompt tuning


def test_prompt_is_inserted_after_the_visual_tokens_with_the_mask_extended(tiny_model, tiny_batch, family):
    model = tiny_model(family)
    batch = tiny_batch(model)
    before = model.build_encoder_inputs(batch["visual_feats"], batch["input_ids"], batch["attention_mask"])
    handle = methods.apply(model, "prompt", length=7)
    after = model.build_encoder_inputs(batch["visual_feats"], batch["input_ids"], batch["attention_mask"])
    nv = before.n_visual
    assert after.n_visual == nv and after.embeds.shape[1] == before.embeds.shape[1] + 7
    assert torch.equal(after.embeds[:, :nv], before.embeds[:, :nv])  # visual tokens first
    assert torch.equal(after.embeds[:, nv:nv + 7], handle.prompt.detach().expand(2, -1, -1))  # then the prompt
    assert torch.equal(after.embeds[:, nv + 7:], before.embeds[:, nv:])  # then the text
    assert torch.equal(after.mask[:, nv:nv + 7], torch.ones(2, 7, dtype=after.mask.dtype))
    assert torch.equal(after.mask[:, nv + 7:], before.mask[:, nv:])  # padding of the text kept


def test_prompt_vocab_init_uses_scaled_token_embeddings(tiny_model, family):
    model = tiny_model(family)
    handle = methods.apply(model, "prompt", length=5)
    emb = model.family_spec.text_embedding(model.lm)
    table = model.family_spec.embed_text(model.lm, torch.arange(emb.weight.shape[0]).unsqueeze(0))[0]
    same = (handle.prompt.detach()[:, None, :] == table[None]).all(-1).any(-1)
    assert same.all()  # every prompt vector is a (scaled) vocabulary embedding
    normal = methods.apply(tiny_model(family), "prompt", length=5, init="normal")
    assert not torch.allclose(normal.prompt, handle.prompt)


def test_prompt_trains_only_the_prompt_and_projector_and_generates(tiny_model, tiny_batch, family):
    model = tiny_model(family)
    batch = tiny_batch(model)
    methods.apply(model, "prompt")
    model.train()
    model(**batch).loss.backward()
    graded = {n for n, p in model.named_parameters() if p.grad is not None}
    assert "input_modifiers.0.prompt" in graded
    assert all(n.startswith(("projector.", "input_modifiers.")) for n in graded), graded
    assert methods.count_parameters(model)["method"] == 20 * model.d_model
    model.eval()
    assert torch.equal(_gen(model, batch), _gen(model, batch, use_cache=False))


def test_prompt_bad_config():
    for bad in ({"length": 0}, {"init": "zeros"}):
        with pytest.raises(ValueError):
            methods.get_config("prompt", **bad)


# ------------------------------------------------------------------------------ prefix: the attention function


class _FakeAttn(torch.nn.Module):
    def __init__(self, is_causal):
        super().__init__()
        self.is_causal = is_causal


def _manual(q, k, v, pk, pv, allowed, bias=None):
    """softmax(q [Pk; k]^T * d^-1/2 + bias) [Pv; v] with the prefix always visible."""
    b, h, _, dh = k.shape
    L = pk.shape[0]
    pk = pk.view(L, h, dh).transpose(0, 1).expand(b, -1, -1, -1)
    pv = pv.view(L, h, dh).transpose(0, 1).expand(b, -1, -1, -1)
    kk, vv = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    s = q @ kk.transpose(2, 3) * dh ** -0.5
    if bias is not None:
        s = s + torch.nn.functional.pad(bias, (L, 0))
    allowed = torch.cat([torch.ones(*allowed.shape[:-1], L, dtype=torch.bool), allowed], -1)
    s = s.masked_fill(~allowed, float("-inf"))
    return (s.softmax(-1) @ vv).transpose(1, 2)


class _Site:
    enabled = True

    def __init__(self, k, v):
        self.k, self.v = k, v

    def key_values(self, dtype=None, device=None):
        return self.k, self.v


@pytest.mark.parametrize("base", ["sdpa", "eager"])
@pytest.mark.parametrize("case", ["padding", "causal_none", "t5_bias"])
def test_prefix_attention_function_matches_a_direct_computation(base, case):
    torch.manual_seed(0)
    b, h, q_len, k_len, dh, L = 2, 2, 4, 4, 3, 3
    q, k, v = (torch.randn(b, h, n, dh) for n in (q_len, k_len, k_len))
    pk, pv = torch.randn(L, h * dh), torch.randn(L, h * dh)
    module = _FakeAttn(is_causal=(case == "causal_none"))
    allowed = torch.ones(b, 1, q_len, k_len, dtype=torch.bool)
    kwargs, bias = {}, None
    if case == "padding":
        allowed[1, :, :, 3:] = False
        mask = allowed
    elif case == "causal_none":
        allowed = torch.tril(torch.ones(q_len, k_len, dtype=torch.bool)).view(1, 1, q_len, k_len).expand(b, -1, -1, -1)
        mask = None
    else:
        allowed[0, :, :, 2:] = False
        mask = allowed
        bias = torch.randn(1, h, q_len, k_len)
        kwargs["position_bias"] = bias
    if base == "eager" and mask is not None:
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    _attention.attach_prefix(module, _Site(pk, pv))
    out, _ = _attention.make_prefix_attention(base)(module, q, k, v, mask, scaling=dh ** -0.5, dropout=0.0,
                                                    **kwargs)
    assert torch.allclose(out, _manual(q, k, v, pk, pv, allowed, bias), atol=1e-5)


# ------------------------------------------------------------------------------ prefix: in the model


def test_prefix_switches_every_attention_config(tiny_model):
    model = tiny_model("t5")  # T5's encoder and decoder stacks hold copied configs
    handle = methods.apply(model, "prefix")
    assert handle.base_attention == "sdpa"
    attn = [m for m in model.lm.modules() if type(m).__name__ == "T5Attention"]
    assert attn and all(m.config._attn_implementation == "wb_prefix_sdpa" for m in attn)
    assert len(handle.sites()) == 3 * 2  # encoder self + decoder self + decoder cross, 2 layers each


def test_prefix_changes_encoder_and_decoder_and_disabled_is_the_identity(tiny_model, tiny_batch, family):
    model = tiny_model(family)
    batch = tiny_batch(model)
    with torch.no_grad():
        enc0, _ = _enc(model, batch)
        logits0 = model(**batch).logits
    handle = methods.apply(model, "prefix")
    with torch.no_grad():
        enc1, _ = _enc(model, batch)
        logits1 = model(**batch).logits
        # The spec's test: the encoder's hidden states change (peft's seq2seq prefix would not do this).
        for layer in range(1, len(enc0.hidden_states)):
            assert not torch.allclose(enc0.hidden_states[layer], enc1.hidden_states[layer], atol=1e-4), layer
        assert not torch.allclose(logits0, logits1, atol=1e-4)
        # The identity case: with the prefix disabled the backbone computes exactly what it did before.
        with handle.disabled():
            enc2, _ = _enc(model, batch)
            logits2 = model(**batch).logits
        assert torch.allclose(enc0.last_hidden_state, enc2.last_hidden_state, atol=1e-6)
        assert torch.allclose(logits0, logits2, atol=1e-6)


@pytest.mark.parametrize("group", ["decoder_self", "decoder_cross"])
def test_decoder_prefixes_alone_change_the_decoder_only(tiny_model, tiny_batch, group):
    model = tiny_model("bart")
    batch = tiny_batch(model)
    with torch.no_grad():
        enc0, _ = _enc(model, batch)
        logits0 = model(**batch).logits
    methods.apply(model, "prefix", groups=(group,))
    with torch.no_grad():
        enc1, _ = _enc(model, batch)
        logits1 = model(**batch).logits
    assert torch.allclose(enc0.last_hidden_state, enc1.last_hidden_state, atol=1e-6)
    assert not torch.allclose(logits0, logits1, atol=1e-4)


@pytest.mark.parametrize("reparam", [True, False])
def test_prefix_gradients_reach_every_group_only(tiny_model, tiny_batch, family, reparam):
    model = tiny_model(family)
    batch = tiny_batch(model)
    handle = methods.apply(model, "prefix", reparam=reparam)
    model.train()
    model(**batch).loss.backward()
    graded = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert all(n.startswith("projector.") or ".peft_mods." in n for n in graded), graded
    for name, site in handle.sites().items():
        params = list(site.parameters())
        if params:  # owner sites (reparam) or every site (direct)
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params), name
    n_method = methods.count_parameters(model)["method"]
    if not reparam:
        assert n_method == 6 * 2 * 10 * model.d_model  # 6 attentions x (K, V) x L x inner
    else:
        assert n_method == sum(p.numel() for s in handle.sites().values() for p in s.parameters())


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_prefix_generate_with_kv_cache(tiny_model, tiny_batch, family, attn_impl):
    model = tiny_model(family)
    model.lm.set_attn_implementation(attn_impl)
    batch = tiny_batch(model)
    handle = methods.apply(model, "prefix", length=4)
    assert handle.base_attention == attn_impl
    model.eval()
    cached = _gen(model, batch)
    assert torch.equal(cached, _gen(model, batch, use_cache=False))  # the cache never holds the prefix
    assert torch.equal(_gen(model, batch, num_beams=2), _gen(model, batch, num_beams=2, use_cache=False))


def test_prefix_eager_and_sdpa_agree(tiny_model, tiny_batch, family):
    outs = []
    for impl in ("sdpa", "eager"):
        model = tiny_model(family)
        model.lm.set_attn_implementation(impl)
        torch.manual_seed(0)
        methods.apply(model, "prefix", length=3)
        with torch.no_grad():
            outs.append(model(**tiny_batch(model)).logits)
    assert torch.allclose(outs[0], outs[1], atol=1e-4)


def test_reparam_eval_cache():
    torch.manual_seed(0)
    rep = PrefixReparam(length=3, d_model=8, mid_dim=5, n_layers=2, inner_dim=6)
    k_train, v_train = rep.layer(1)
    rep.eval()
    with torch.no_grad():
        k1, v1 = rep.layer(1)
        assert rep._cache is not None
        assert torch.allclose(k1, k_train) and torch.allclose(v1, v_train)
        rep.mlp[2].bias.add_(1.0)  # a parameter change invalidates the cache
        k2, _ = rep.layer(1)
    assert torch.allclose(k2, k1 + 1.0, atol=1e-6)


def test_prefix_save_load_round_trip(tiny_model, tiny_batch, tmp_path):
    model = tiny_model("t5")
    batch = tiny_batch(model)
    methods.apply(model, "prefix")
    with torch.no_grad():
        ref = model(**batch).logits
    methods.save_method(model, tmp_path / "prefix.safetensors")
    fresh = tiny_model("t5")
    methods.load_method(fresh, tmp_path / "prefix.safetensors")
    with torch.no_grad():
        assert torch.allclose(fresh(**batch).logits, ref, atol=1e-6)


def test_prefix_bad_config_and_unsupported_attention(tiny_model):
    for bad in ({"length": 0}, {"mid_dim": -1}, {"groups": ("encoder", "nope")}, {"groups": ()}):
        with pytest.raises(ValueError):
            methods.get_config("prefix", **bad)
    model = tiny_model("bart")
    model.lm.config._attn_implementation_internal = "flex_attention"
    with pytest.raises(ValueError, match="sdpa"):
        methods.apply(model, "prefix")
    assert not model.modifications()
