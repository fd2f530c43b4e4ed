"""Bottleneck adapters (houlsby, pfeiffer, parallel), PHM layers, Compacter / Compacter++, BitFit."""

from __future__ import annotations

import copy
import math
import warnings
from functools import partial

import pytest
import torch

from workbench import methods
from workbench.methods._phm import PHMLinear, kron_sum
from workbench.methods.adapters import Adapter

from .conftest import perturb_trainable

ENC = ("encoder.0", "encoder.1")
DEC = ("decoder.0", "decoder.1")


_perturb = partial(perturb_trainable, scale=0.1, relative=False)


# ------------------------------------------------------------------------------------ placement
@pytest.mark.parametrize("name, expected", [
    ("houlsby", [f"{l}.{s}" for l in ENC for s in ("attn", "ffn")]
     + [f"{l}.{s}" for l in DEC for s in ("self_attn", "cross_attn", "ffn")]),
    ("pfeiffer", [f"{l}.ffn" for l in ENC + DEC]),
    ("parallel", [f"{l}.ffn" for l in ENC + DEC]),
    ("compacter", [f"{l}.{s}" for l in ENC for s in ("attn", "ffn")]
     + [f"{l}.{s}" for l in DEC for s in ("self_attn", "ffn")]),
    ("compacter++", [f"{l}.ffn" for l in ENC + DEC]),
])
def test_placement(name, expected, family, tiny_model, method_config):
    model = tiny_model(family)
    handle = methods.apply(model, method_config(name))
    assert list(handle.modules) == expected
    assert list(model.modifications()) == expected


def test_parallel_attention_option(tiny_model):
    handle = methods.apply(tiny_model("t5"), "parallel", sublayers=("ffn", "attn", "self_attn"))
    assert set(handle.modules) == {f"{l}.{s}" for l in ENC for s in ("attn", "ffn")} | {
        f"{l}.{s}" for l in DEC for s in ("self_attn", "ffn")}


# ------------------------------------------------------------------------------------ formulas
def test_serial_and_parallel_formulas():
    torch.manual_seed(0)
    x, h = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    serial = Adapter(16, 4, "gelu", reads="h")
    parallel = Adapter(16, 4, "gelu", reads="x", scale=4.0)
    assert torch.equal(serial(x, h), h) and torch.equal(parallel(x, h), h)  # zero-init Up
    for mod in (serial, parallel):
        torch.nn.init.normal_(mod.up.weight)
        torch.nn.init.normal_(mod.up.bias)
    gelu = torch.nn.functional.gelu
    torch.testing.assert_close(serial(x, h), h + serial.up(gelu(serial.down(h))))
    torch.testing.assert_close(parallel(x, h), h + 4.0 * parallel.up(gelu(parallel.down(x))))


def test_parallel_reads_the_sublayer_input(tiny_model, tiny_batch):
    """The parallel adapter's input is X (the residual stream entering the FFN), not H."""
    model = tiny_model("bart")
    handle = methods.apply(model, "parallel")
    mod = handle.modules["encoder.1.ffn"]
    seen = {}
    orig = mod.delta
    mod.delta = lambda src: seen.setdefault("src", src) is not None and orig(src)  # noqa: E731
    point = model.get_point("encoder.1.ffn")
    xs = []
    hook = model.get_submodule(point.x_path).register_forward_pre_hook(lambda m, a: xs.append(a[0]))
    with torch.no_grad():
        model(**tiny_batch(model))
    hook.remove()
    torch.testing.assert_close(seen["src"], xs[0])


# Bottlenecks on the tiny d = 96: houlsby d // 8 (VL-Adapter's --reduction_factor 8; it was d // 12 before
# houlsby followed VL-Adapter), pfeiffer and parallel d // 12.
@pytest.mark.parametrize("name, per_adapter_sites, m", [("houlsby", 10, 12), ("pfeiffer", 4, 8), ("parallel", 4, 8)])
def test_adapter_counts_by_hand(name, per_adapter_sites, m, tiny_model):
    model = tiny_model("t5")
    methods.apply(model, name)
    d = 96
    per_adapter = d * m + m + m * d + d
    assert methods.count_parameters(model)["method"] == per_adapter_sites * per_adapter
    model = tiny_model("t5")
    methods.apply(model, name, bottleneck=5)
    assert methods.count_parameters(model)["method"] == per_adapter_sites * (d * 5 + 5 + 5 * d + d)


def test_houlsby_defaults_are_vl_adapter():
    """VL_adapter: single_adapter.sh (--reduction_factor 8 --unfreeze_layer_norms, lr 1e-3),
    adapters/config.py (gelu_new), param.py (--add_adapter_cross_attn True)."""
    cfg = methods.get_config("houlsby")
    assert (cfg.reduction_factor, cfg.activation, cfg.init, cfg.train_layer_norms) == (8, "gelu_new", "official", True)
    assert cfg.lr == 1e-2  # tuned on vlt5-tiny (single_adapter.sh: 1e-3 on T5-base)
    assert set(cfg.sublayers) == {"attn", "self_attn", "cross_attn", "ffn"}
    assert cfg.resolved_init("t5") == "torch" and cfg.resolved_init("bart") == "normal"
    assert type(cfg).OFFICIAL_TRAIN_PROJECTOR  # VL-Adapter always trains its visual_embedding


def test_pfeiffer_defaults_are_mixphm_baseline():
    """MixPHM: FFN only, ReLU, adapter_size 64 = 768 // 12, default nn.Linear, only '*adapter*' trains."""
    cfg = methods.get_config("pfeiffer")
    assert (cfg.sublayers, cfg.activation, cfg.reduction_factor, cfg.train_layer_norms) == (("ffn",), "relu", 12, False)
    assert cfg.resolved_init("t5") == cfg.resolved_init("bart") == "torch"
    assert not type(cfg).OFFICIAL_TRAIN_PROJECTOR


def test_adapter_init_options():
    torch.manual_seed(0)
    zero = Adapter(16, 4, "gelu_new", init="zero_up")
    assert torch.all(zero.up.weight == 0) and torch.all(zero.up.bias == 0) and zero.down.weight.abs().sum() > 0
    normal = Adapter(256, 64, "gelu_new", init="normal", init_std=0.02)
    for lin in (normal.down, normal.up):
        assert torch.all(lin.bias == 0) and 0.018 < float(lin.weight.detach().std()) < 0.022
    default = Adapter(256, 64, "gelu_new", init="torch")
    bound = 1 / math.sqrt(64)
    assert 0.9 * bound < float(default.up.weight.detach().abs().max()) <= bound and default.up.bias.abs().sum() > 0
    with pytest.raises(ValueError, match="init"):
        Adapter(16, 4, init="official")  # resolved by the method config, not by the module
    with pytest.raises(ValueError, match="init"):
        methods.get_config("houlsby", init="xavier")


def test_former_houlsby_behaviour_is_an_option(tiny_model, tiny_batch):
    """The workbench's former houlsby (d // 12, exact GELU, zero-initialised Up, LayerNorms frozen)
    is still available through options, and leaves the model unchanged at step 0."""
    model = tiny_model("bart")
    batch = tiny_batch(model)
    with torch.no_grad():
        before = model(**batch).logits
    methods.apply(model, "houlsby", reduction_factor=12, activation="gelu", init="zero_up", train_layer_norms=False)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)
    assert methods.count_parameters(model)["backbone"] == 0


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_houlsby_unfreezes_every_layer_norm_of_the_lm(family, tiny_model):
    model = tiny_model(family)
    methods.apply(model, "houlsby")
    lm_trainable = {n for n, p in model.lm.named_parameters() if p.requires_grad and ".peft_mods." not in n}
    norms = {n for n, _ in model.lm.named_parameters() if "layer_norm" in n or "layernorm" in n}
    assert lm_trainable == norms and norms
    counts = methods.count_parameters(model)
    assert counts["backbone"] == sum(p.numel() for n, p in model.lm.named_parameters() if n in norms)


@pytest.mark.parametrize("overrides", [{"reduction_factor": 500}, {"sublayers": ("mlp",)}, {"activation": "nope"},
                                       {"bottleneck": 0}, {"reduction_factor": 0}, {"init": "nope"},
                                       {"train_layer_norms": "yes"}])
def test_adapter_bad_config(overrides, tiny_model):
    model = tiny_model("t5")
    with pytest.raises(ValueError):
        methods.apply(model, "houlsby", **overrides)
    assert not model.modifications() and all(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------------------------ PHM layers
def test_kron_sum_is_the_sum_of_kronecker_products():
    torch.manual_seed(0)
    a, b = torch.randn(4, 4, 4), torch.randn(4, 3, 5)
    expected = sum(torch.kron(a[i], b[i]) for i in range(4))
    torch.testing.assert_close(kron_sum(a, b), expected)


def test_phm_linear_forward_and_rank():
    torch.manual_seed(0)
    layer = PHMLinear(12, 8, n=4, rank=2, rule_init_std=1.0)
    with torch.no_grad():
        layer.b.normal_()
    x = torch.randn(3, 12)
    w = sum(torch.kron(layer.phm_rule[i], layer.S[0, i] @ layer.T[0, i]) for i in range(4))
    torch.testing.assert_close(layer(x), x @ w + layer.b[0])
    assert torch.linalg.matrix_rank(layer.blocks()[0]) <= 2
    assert sum(p.numel() for p in layer.parameters()) == 4 * 3 * 2 + 4 * 2 * 2 + 8 + 64
    with pytest.raises(ValueError, match="divisible"):
        PHMLinear(10, 8, n=4)
    with pytest.raises(ValueError, match="divisible"):
        PHMLinear(12, 6, n=4)
    with pytest.raises(ValueError, match="rank"):
        PHMLinear(12, 8, n=4, rank=0)


# ------------------------------------------------------------------------------------ Compacter
def test_compacter_shares_one_rule(tiny_model, method_config):
    model = tiny_model("t5")
    handle = methods.apply(model, method_config("compacter"))
    rule = model.peft_shared["phm_rule"]
    layers = [m for mod in handle.modules.values() for m in (mod.down, mod.up)]
    assert len(layers) == 16 and all(layer.rule is rule for layer in layers)
    assert [n for n, p in model.named_parameters() if p is rule] == ["peft_shared.phm_rule"]
    assert 2e-5 < rule.std().item() < 3e-4  # A ~ N(0, 1e-4^2)
    # A deep copy keeps the sharing inside the copy.
    twin = copy.deepcopy(model)
    twin_rule = twin.peft_shared["phm_rule"]
    assert twin_rule is not rule
    twin_mod = twin.get_submodule(model.get_point("decoder.1.ffn").mods_path + ".compacter")
    assert twin_mod.up.rule is twin_rule


def test_compacter_trains_the_shared_rule(tiny_model, tiny_batch, method_config):
    model = tiny_model("bart")
    handle = methods.apply(model, method_config("compacter++"))
    _perturb(handle)
    model.train()
    model(**tiny_batch(model)).loss.backward()
    assert model.peft_shared["phm_rule"].grad is not None
    assert model.peft_shared["phm_rule"].grad.abs().sum() > 0


@pytest.mark.parametrize("name, sites", [("compacter", 8), ("compacter++", 4)])
def test_compacter_counts_by_hand(name, sites, tiny_model):
    model = tiny_model("t5")
    methods.apply(model, name, reduction_factor=12)  # m = 8
    d, m, n, r = 96, 8, 4, 1
    down = n * (d // n) * r + n * r * (m // n) + m  # s, t, bias
    up = n * (m // n) * r + n * r * (d // n) + d
    assert (down, up) == (112, 200)
    assert methods.count_parameters(model)["method"] == sites * (down + up) + n ** 3


def test_compacter_defaults_are_compacter_json():
    """rabeehk/compacter seq2seq/configs/compacter.json, value by value."""
    cfg = methods.get_config("compacter")
    assert (cfg.n, cfg.rank, cfg.reduction_factor, cfg.activation, cfg.rule_init_std, cfg.shared_rule,
            cfg.train_layer_norms) == (4, 1, 32, "gelu_new", 1e-4, True, True)
    assert cfg.lr == 1e-2  # tuned on vlt5-tiny (compacter.json: 3e-3 on T5-base)
    assert cfg.sublayers == ("attn", "self_attn", "ffn")
    assert methods.get_config("compacter++").sublayers == ("ffn",)  # add_adapter_in_self_attention: false


def test_compacter_options(tiny_model):
    model = tiny_model("t5")
    methods.apply(model, "compacter", reduction_factor=12, sublayers=("attn", "self_attn", "cross_attn", "ffn"))
    assert "decoder.0.cross_attn" in model.modifications()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("layer_norm" in n for n in trainable)  # compacter.json unfreeze_layer_norms: true
    model = tiny_model("t5")
    methods.apply(model, "compacter", reduction_factor=12, train_layer_norms=False)  # the former default
    assert not any("layer_norm" in n for n, p in model.named_parameters() if p.requires_grad)


def test_compacter_own_rules_unfactorised(tiny_model):
    """VL-Adapter's / VL-PET's single_compacter.sh form: --shared_phm_rule False --factorized_phm False."""
    model = tiny_model("t5")
    handle = methods.apply(model, "compacter", n=2, rank=None, reduction_factor=8, shared_rule=False,
                           rule_init_std=0.01)
    assert not hasattr(model, "peft_shared")
    rules = [layer.phm_rule for mod in handle.modules.values() for layer in (mod.down, mod.up)]
    assert len({id(r) for r in rules}) == len(rules) == 16
    assert 0.003 < float(torch.cat([r.detach().flatten() for r in rules]).std()) < 0.03
    d, m, n = 96, 12, 2
    per_adapter = (d * m // n + m + n ** 3) + (m * d // n + d + n ** 3)
    assert methods.count_parameters(model)["method"] == 8 * per_adapter


def test_phm_adapter_parallel_form():
    from workbench.methods.compacter import PHMAdapter

    torch.manual_seed(0)
    mod = PHMAdapter(8, 4, n=2, rank=None, act="gelu_new", shared_rule=None, rule_init_std=1.0, reads="x",
                     out_dim=6)
    x, y = torch.randn(3, 8), torch.randn(3, 6)
    expected = y + mod.up(torch.nn.functional.gelu(mod.down(x), approximate="tanh"))
    torch.testing.assert_close(mod(x, y), expected)
    with pytest.raises(ValueError, match="reads"):
        PHMAdapter(8, 4, n=2, rank=None, act="gelu_new", shared_rule=None, reads="z")


def test_compacter_bottleneck_not_divisible_by_n(tiny_model):
    model = tiny_model("t5")
    handle = methods.apply(model, "compacter")  # d/32 = 3 on the tiny model: rounded up to n = 4
    assert handle.bottleneck == 4
    model = tiny_model("t5")
    with pytest.raises(ValueError, match="not divisible by the PHM division n = 4"):
        methods.apply(model, "compacter", bottleneck=3)  # an explicit bottleneck is never rounded
    assert not model.modifications() and not hasattr(model, "peft_shared")
    with pytest.raises(ValueError):
        methods.get_config("compacter", rank=0)
    with pytest.raises(ValueError, match="shared_rule"):
        methods.get_config("compacter", shared_rule="no")


# ------------------------------------------------------------------------------------ BitFit
def test_bitfit_on_t5_trains_layer_norms_and_says_so(tiny_model):
    model = tiny_model("t5")
    with pytest.warns(UserWarning, match="no bias"):
        handle = methods.apply(model, "bitfit")
    assert "LayerNorm" in handle.note and "no bias" in handle.note
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("projector.")]
    assert trainable == handle.trained
    assert trainable and all(n.endswith("layer_norm.weight") for n in trainable)
    assert len(trainable) == 2 * 2 + 1 + 2 * 3 + 1  # per sub-layer + final, encoder and decoder
    handle.merge()  # nothing to do: the trained tensors are the backbone's
    with pytest.raises(ValueError, match="no bias"):
        methods.apply(tiny_model("t5"), "bitfit", no_bias_fallback="error")


def test_bitfit_on_bart_trains_biases(tiny_model):
    model = tiny_model("bart")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback, no warning
        handle = methods.apply(model, "bitfit")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("projector.")]
    assert trainable and all(n.endswith(".bias") for n in trainable)
    assert "bias" in handle.note
    counts = methods.count_parameters(model)
    assert counts["backbone"] == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert counts["method"] == 0
    assert math.isclose(counts["trainable_pct"], 100 * counts["trainable"] / counts["backbone_total"])
