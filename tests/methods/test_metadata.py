"""What a method's registration records: family, main knob, parameter prefixes, default lr."""

from dataclasses import dataclass, fields

import pytest

from workbench import methods
from workbench.viz.panels import main_knob
from workbench.viz.training_plots import method_family


def test_every_method_carries_its_metadata():
    for name in methods.list_methods():
        spec = methods.method_spec(name)
        assert spec.name == name and spec.family and spec.param_prefixes
        lr = methods.get_config(name).lr
        assert spec.default_lr == lr and (lr is None) == name.endswith(("vlpet", "+g+lw"))  # VL-PET: per family
        assert lr is None or lr > 0
        if spec.main_knob is not None:
            knob, values = spec.main_knob
            assert knob in {f.name for f in fields(spec.config_cls)} and values
        # the viz layer reads the registration, it keeps no table of its own
        assert method_family(name) == spec.family and main_knob(name) == spec.main_knob


def test_families_group_the_papers_methods():
    assert method_family("prompt") == method_family("prefix") == "embedding composition"
    assert method_family("houlsby") == method_family("pfeiffer") == method_family("parallel")
    assert method_family("mixphm") == method_family("compacter")
    assert main_knob("mixphm")[0] == "num_experts" and main_knob("full") is None


def test_registration_refuses_duplicates_and_bad_metadata():
    @dataclass
    class Cfg(methods.MethodConfig):
        r: int = 2

    def apply_fn(model, cfg):
        return methods.MethodHandle(model, cfg)

    with pytest.raises(ValueError, match="method 'lora' is already registered"):
        methods.register_method("lora", Cfg, family="x")(apply_fn)
    with pytest.raises(ValueError, match="main_knob"):
        methods.register_method("_bad_knob", Cfg, family="x", main_knob=("rank", (1, 2)))
    with pytest.raises(ValueError, match="family"):
        methods.register_method("_no_family", Cfg, family="")
    with pytest.raises(TypeError, match="MethodConfig"):
        methods.register_method("_not_a_config", dict, family="x")
    assert "_bad_knob" not in methods.list_methods()


def test_parameter_prefixes_match_name_components_exactly():
    lora = methods.method_spec("lora")
    assert lora.is_method_parameter("lm.encoder.block.0.layer.0.SelfAttention.q.lora_A.default.weight")
    assert not lora.is_method_parameter("lm.encoder.block.0.layer.0.SelfAttention.q.randlora_A.default")
    assert not lora.is_method_parameter("lm.encoder.block.0.layer.0.SelfAttention.q.weight")
    houlsby = methods.method_spec("houlsby")
    assert houlsby.is_method_parameter("lm.encoder.block.0.peft_mods.ffn.houlsby.down.weight")
    assert not houlsby.is_method_parameter("lm.encoder.block.0.layer.1.DenseReluDense.wi.weight")
