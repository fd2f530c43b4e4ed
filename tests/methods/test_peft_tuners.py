"""The peft tuners (ia3, loha, lokr, vera, dora, randlora, delora, gralora) on T5 and BART."""

from __future__ import annotations

import pytest
import torch

from workbench import methods
from workbench.methods import peft_tuners

REGISTERED = [n for n in peft_tuners.TUNERS if n in methods.list_methods()]


def _perturb(handle, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in handle.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _tuner_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def test_the_required_tuners_are_registered():
    for name in ("ia3", "loha", "lokr", "vera", "dora"):
        assert name in methods.list_methods()
    # Each registration records the tuner's own parameter prefix, matched exactly on name components.
    for name, (cls, _, _) in peft_tuners.TUNERS.items():
        spec = methods.method_spec(name)
        assert spec.param_prefixes == (cls.param_prefix,)
        assert spec.is_method_parameter(f"lm.x.{cls.param_prefix}A.default")
    # "oft_" is inside "boft_R" but is not its prefix; "lora_" is inside "randlora_A".
    assert not methods.method_spec("oft").is_method_parameter("lm.x.boft_R.default")
    assert not methods.method_spec("lora").is_method_parameter("lm.x.randlora_A.default")


@pytest.mark.parametrize("name", REGISTERED)
def test_targets_resolve_on_both_families(name, family, tiny_model):
    model = tiny_model(family)
    handle = methods.apply(model, name)
    layers = _tuner_layers(model)
    names = set(handle.config.targets)
    expected = {p.module_path for p in model.insertion_points(kind="projection").values() if p.projection in names}
    assert set(layers) == expected
    # 6 attentions (2 encoder, 2 x 2 decoder) and 4 FFNs in the tiny 2 + 2 layer models.
    assert len(layers) == sum(6 if t in ("q", "k", "v", "o") else 4 for t in names)
    # Every trainable LM tensor belongs to the tuner.
    assert all(handle.config.param_prefix in n for n, p in model.lm.named_parameters() if p.requires_grad)


def test_ia3_scales_k_v_and_the_ffn_input(tiny_model):
    model = tiny_model("t5")
    handle = methods.apply(model, "ia3")
    assert handle.config.lr == 3e-2  # tuned on vlt5-tiny (docs/methods.md)
    d, d_ff = 96, 192
    # encoder: k, v (out dim d) + wo's input (d_ff) per layer; decoder: self and cross k, v + wo.
    assert methods.count_parameters(model)["method"] == 2 * (2 * d + d_ff) + 2 * (4 * d + d_ff)
    wo = model.get_submodule(model.get_point("encoder.0.ffn.wo").module_path)
    assert wo.is_feedforward
    with pytest.raises(ValueError, match="feedforward"):
        methods.get_config("ia3", targets=("k", "v"), feedforward=("wo",))


def test_vera_works_despite_the_injection_refusal(tiny_model, tiny_batch):
    """peft refuses inject_adapter_in_model for VeRA; the workbench injects through the tuner class."""
    a, b = tiny_model("t5"), tiny_model("t5")
    ha, hb = methods.apply(a, "vera"), methods.apply(b, "vera")
    layer_a = a.get_submodule(a.get_point("decoder.1.cross_attn.v").module_path)
    layer_b = b.get_submodule(b.get_point("decoder.1.cross_attn.v").module_path)
    # The frozen random projections are regenerated from projection_prng_key, identically...
    torch.testing.assert_close(layer_a.vera_A["default"], layer_b.vera_A["default"])
    # ... so they are not part of the method's weights, only the trainable lambdas are.
    assert all("vera_lambda" in k or k.startswith("projector.") for k in ha.state_dict())
    assert methods.count_parameters(a)["method"] == 12 * (256 + 96)  # lambda_d (r) + lambda_b (out)


@pytest.mark.parametrize("name", REGISTERED)
def test_merge_folds_the_tuner_into_the_backbone(name, tiny_model, tiny_batch):
    model = tiny_model("bart")
    batch = tiny_batch(model)
    handle = methods.apply(model, name)
    _perturb(handle)
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
    methods.merge(model)
    assert not _tuner_layers(model)
    with torch.no_grad():
        after = model(**batch).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    model.backbone_state_dict()  # a plain backbone again (raises while peft layers are injected)


def test_options_pass_through_and_are_checked(tiny_model):
    model = tiny_model("t5")
    methods.apply(model, "loha", options={"rank_dropout": 0.1})
    layer = model.get_submodule(model.get_point("encoder.0.attn.q").module_path)
    assert layer.rank_dropout["default"] == 0.1
    with pytest.raises(ValueError, match="invalid peft option"):
        methods.apply(tiny_model("t5"), "lokr", options={"no_such_option": 1})
    with pytest.raises(ValueError, match="projection names"):
        methods.get_config("loha", targets=("query",))
    with pytest.raises(ValueError, match="rank"):
        methods.get_config("lokr", r=0)


def test_dora_adds_a_magnitude_vector(tiny_model):
    model = tiny_model("t5")
    methods.apply(model, "dora")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in names)
    # 12 targets (q, v of every attention): A (8 x 96) + B (96 x 8) + magnitude (96) each.
    assert methods.count_parameters(model)["method"] == 12 * (8 * 96 + 96 * 8 + 96)


def test_lora_merge_keeps_the_outputs_and_removes_the_lora_parameters(family, tiny_model, tiny_batch):
    """LoRA's handle is the peft tuner handle (``PeftTunerHandle``): ``methods.merge`` folds B A in."""
    from workbench.methods.peft_tuners import PeftTunerHandle

    model = tiny_model(family)
    batch = tiny_batch(model)
    with torch.no_grad():
        base = model(**batch).logits
    handle = methods.apply(model, "lora")
    assert isinstance(handle, PeftTunerHandle)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:  # lora_B starts at zero: make both factors non-zero
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
    assert (before - base).abs().max() > 1e-3  # the LoRA update is not a no-op
    methods.merge(model)
    assert not [n for n, _ in model.named_parameters() if "lora_" in n]
    assert not _tuner_layers(model)
    with torch.no_grad():
        after = model(**batch).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
