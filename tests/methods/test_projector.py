"""Whether the visual projector trains follows each method's official code, except that a freshly
initialised projector always trains (and the handle says why)."""

from dataclasses import dataclass
from typing import ClassVar

import pytest

from workbench import methods
from workbench.models.testing import tiny_vlmodel


@dataclass
class _FrozenProjectorConfig(methods.MethodConfig):
    OFFICIAL_TRAIN_PROJECTOR: ClassVar[bool] = False


@pytest.fixture
def frozen_projector_method():
    def apply_fn(model, cfg):
        methods.freeze_backbone(model)
        return methods.MethodHandle(model, cfg)

    methods.register_method("_frozen_projector", _FrozenProjectorConfig, family="test")(apply_fn)
    yield "_frozen_projector"
    methods.METHODS.unregister("_frozen_projector")


def _trains(model) -> bool:
    flags = {p.requires_grad for p in model.projector.parameters()}
    assert len(flags) == 1
    return flags.pop()


def _loaded(tmp_path):
    fresh = tiny_vlmodel("t5")
    assert fresh.projector_fresh
    fresh.save_pretrained(tmp_path / "ck")
    from workbench.models import load_backbone

    model = load_backbone(tmp_path / "ck")
    assert not model.projector_fresh  # its projector's weights come from the checkpoint
    return model


def test_official_setting_on_a_pretrained_projector(tmp_path, frozen_projector_method):
    model = _loaded(tmp_path)
    handle = methods.apply(model, frozen_projector_method)
    assert not _trains(model) and handle.projector_note.startswith("frozen (the official setting")
    assert methods.count_parameters(model)["projector"] == 0

    model = _loaded(tmp_path)
    handle = methods.apply(model, frozen_projector_method, train_projector=True)
    assert _trains(model) and "train_projector" in handle.projector_note

    model = _loaded(tmp_path)
    methods.apply(model, "houlsby")  # the adapters' official code trains the visual projection
    assert _trains(model)
    model = _loaded(tmp_path)
    methods.apply(model, "houlsby", train_projector=False)
    assert not _trains(model)


def test_a_fresh_projector_always_trains(frozen_projector_method):
    model = tiny_vlmodel("t5")
    handle = methods.apply(model, frozen_projector_method)
    assert _trains(model) and "freshly initialised" in handle.projector_note and "frozen" in handle.projector_note


def test_train_projector_is_validated():
    with pytest.raises(ValueError, match="train_projector"):
        methods.get_config("lora", train_projector="yes")
