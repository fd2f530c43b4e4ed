"""The PHM adapters' bottleneck rule (``workbench.methods._phm.phm_bottleneck``; MixPHM, Compacter).

The official m = d // reduction_factor is kept wherever it is a multiple of the PHM n; otherwise it
is rounded up to the next multiple of n, silently (the resolved size is ``handle.bottleneck``). An
explicit ``bottleneck=`` is never changed, and a d_model that n does not divide is still an error.
"""

from __future__ import annotations

import warnings

import pytest

from workbench import methods
from workbench.methods._phm import phm_bottleneck


@pytest.mark.parametrize("d, reduction, n, expected", [
    (768, 12, 4, 64),  # T5-base MixPHM: the official size, unchanged
    (768, 32, 4, 24),  # T5-base Compacter: unchanged
    (768, 8, 2, 96),  # VL-PET's Compacter (n 2, d // 8): unchanged
    (128, 12, 4, 12),  # vlt5-tiny MixPHM: 10 -> 12
    (128, 32, 4, 4),  # vlt5-tiny Compacter: 4, unchanged
    (96, 32, 4, 4),  # d = 96 Compacter: 3 -> 4
    (96, 12, 4, 8),
    (100, 12, 4, 8),  # 8, a multiple already
    (100, 9, 4, 12),  # 11 -> 12
    (64, 64, 4, 4),  # 1 -> 4
])
def test_the_rule(d, reduction, n, expected):
    assert phm_bottleneck(d, reduction, None, n, "x") == expected
    assert expected % n == 0 and expected >= d // reduction


def test_an_explicit_bottleneck_is_never_rounded():
    assert phm_bottleneck(128, 12, 10, 4, "x") == 10  # apply then refuses it (below)
    with pytest.raises(ValueError, match="bottleneck"):
        phm_bottleneck(96, 200, None, 4, "mixphm")  # d // 200 = 0: still an error


def test_mixphm_rounds_up_without_a_warning(tiny_model):
    model = tiny_model("t5")  # d 96
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        handle = methods.apply(model, "mixphm", reduction_factor=10)  # 96 // 10 = 9
    assert handle.bottleneck == 12
    assert {m.down.out_features for m in handle.modules.values()} == {12}
    assert methods.get_config("mixphm", reduction_factor=10).resolved_bottleneck(96) == 12
    assert methods.apply(tiny_model("t5"), "mixphm").bottleneck == 8  # 96 // 12 = 8: as is


def test_mixphm_explicit_bottleneck_and_d_model_still_checked(tiny_model):
    model = tiny_model("t5")
    with pytest.raises(ValueError, match="not divisible by the PHM division n = 4"):
        methods.apply(model, "mixphm", bottleneck=10)
    assert not model.modifications() and not hasattr(model, "peft_shared")
    with pytest.raises(ValueError, match="divisible"):
        methods.apply(model, "mixphm", n=5)  # d = 96 is not a multiple of 5: no rounding can fix it
    assert not model.modifications()


def test_compacter_rounds_up_the_same_way(tiny_model):
    """compacter.json's d // 32 is 3 on d = 96: rounded up to 4 (it was an error before the rule)."""
    for name in ("compacter", "compacter++"):
        model = tiny_model("t5")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            handle = methods.apply(model, name)
        assert handle.bottleneck == 4
        assert {m.down.out_features for m in handle.modules.values()} == {4}
    model = tiny_model("t5")
    with pytest.raises(ValueError, match="not divisible by the PHM division n = 4"):
        methods.apply(model, "compacter", bottleneck=6)
    assert not model.modifications() and not hasattr(model, "peft_shared")


def test_the_official_sizes_are_unchanged_on_t5_base(meta_backbone):
    model = meta_backbone("t5")
    assert methods.apply(model, "mixphm").bottleneck == 64
    assert methods.count_parameters(model)["method"] == 874_048
    model = meta_backbone("t5")
    assert methods.apply(model, "compacter").bottleneck == 24
    model = meta_backbone("bart")
    assert methods.apply(model, "compacter++").bottleneck == 24
