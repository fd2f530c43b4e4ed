"""The method test matrix (like peft's): every registered method x {T5, BART} on tiny random models.

Parametrised over ``workbench.methods.list_methods()`` at collection time, so a method another
module registers later is tested too. Per method and family:

- forward + backward: finite loss (plus the method's extra losses), only trainable tensors get
  gradients, and what trains is the method's own parameters + the visual projector (``full``:
  everything; ``bitfit``: biases / LayerNorm weights; any method may also unfreeze LayerNorms, as
  VL-PET does);
- ``generate`` works;
- ``save_method`` / ``load_method`` onto a fresh backbone gives identical outputs;
- eval mode is deterministic, also after a (stochastic) training forward in between;
- zero-initialised methods leave the outputs unchanged at step 0 (:data:`EXACT_IDENTITY`, exact);
  Compacter and MixPHM use the official N(0, small^2) init of the shared A, so they are only
  nearly unchanged (:data:`NEAR_IDENTITY`) -- and exactly unchanged with A = 0;
- a second method is refused; an unknown name lists the registry.
"""

from __future__ import annotations

import warnings
from functools import partial

import pytest
import torch

from workbench import methods

from .conftest import perturb_trainable

METHODS = methods.list_methods()

# Zero-initialised: the model is unchanged at step 0 (checked exactly).
EXACT_IDENTITY = {
    "full", "bitfit",  # nothing inserted
    "lora", "dora", "loha", "lokr", "vera", "randlora", "delora", "gralora",  # one factor starts at zero
    "ia3",  # scaling vectors start at one
    "parallel",  # Up starts at zero (houlsby and pfeiffer keep nn.Linear's default init, as officially)
    "petal",  # p_j = 0 and zero expert up-projections
}
# Official init with a small random shared A: nearly unchanged (relative to the logits' scale).
NEAR_IDENTITY = {"compacter": 1e-3, "compacter++": 1e-3, "mixphm": 2e-2}


def _apply(model, name, config_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitfit's T5 note, peft's notices
        return methods.apply(model, config_factory(name))


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


_perturb = partial(perturb_trainable, scale=0.05, relative=False)


def _allowed_trainable(name: str, pname: str) -> bool:
    if pname.startswith("projector.") or methods.method_spec(name).is_method_parameter(pname):
        return True
    low = pname.lower()
    if "layer_norm" in low or "layernorm" in low:
        return True  # LayerNorms may be unfrozen by a method (VL-PET; BitFit on T5)
    if name == "bitfit":
        return pname.endswith("bias")
    return name == "full" and not pname.startswith("visual_encoder.")


@pytest.mark.parametrize("name", METHODS)
def test_forward_backward_trains_only_the_method(name, family, tiny_model, tiny_batch, method_config):
    model = tiny_model(family)
    batch = tiny_batch(model)
    handle = _apply(model, name, method_config)
    model.train()
    torch.manual_seed(0)
    out = model(**batch)
    extra = handle.extra_losses()
    loss = out.loss + sum(extra.values(), torch.zeros(()))
    assert torch.isfinite(loss), f"{name}: non-finite loss {loss}"
    loss.backward()

    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert {n for n, _ in handle.trainable_parameters()} == trainable
    bad = sorted(n for n in trainable if not _allowed_trainable(name, n))
    assert not bad, f"{name} trains backbone tensors it should not: {bad[:5]}"
    assert all(params[n].requires_grad for n in params if n.startswith("projector.")), "the projector must train"
    leaked = [n for n, p in params.items() if not p.requires_grad and p.grad is not None]
    assert not leaked, f"frozen tensors got gradients: {leaked[:5]}"
    assert all(params[n].grad is not None for n in params if n.startswith("projector."))
    others = [n for n in trainable if not n.startswith("projector.")]
    assert others, f"{name} trains nothing but the projector"
    assert any(params[n].grad is not None and params[n].grad.abs().sum() > 0 for n in others), \
        f"{name}: no gradient reached the method's parameters"
    counts = methods.count_parameters(model)
    assert counts["trainable"] == sum(params[n].numel() for n in trainable)
    if name not in ("full", "bitfit"):
        assert counts["method"] > 0


@pytest.mark.parametrize("name", METHODS)
def test_generate(name, family, tiny_model, tiny_batch, method_config):
    model = tiny_model(family)
    batch = tiny_batch(model)
    _perturb(_apply(model, name, method_config))
    model.eval()
    texts = model.generate_text(batch["visual_feats"], batch["input_ids"], batch["attention_mask"], max_new_tokens=4)
    assert isinstance(texts, list) and len(texts) == 2 and all(isinstance(t, str) for t in texts)
    ids = model.generate(batch["visual_feats"], batch["input_ids"], batch["attention_mask"], num_beams=2,
                         max_new_tokens=3)
    assert ids.shape[0] == 2


@pytest.mark.parametrize("name", METHODS)
def test_save_load_roundtrip_on_a_fresh_backbone(name, family, tiny_model, tiny_batch, method_config, tmp_path):
    model = tiny_model(family)
    batch = tiny_batch(model)
    _perturb(_apply(model, name, method_config))
    model.eval()
    expected = _logits(model, batch)
    path = tmp_path / f"{name}.safetensors"
    methods.save_method(model, path)

    fresh = tiny_model(family)
    torch.manual_seed(123)  # a different init RNG state than the first apply: loading must not depend on it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = methods.load_method(fresh, path)
    assert handle.name == name
    fresh.eval()
    torch.testing.assert_close(_logits(fresh, batch), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_eval_is_deterministic(name, family, tiny_model, tiny_batch, method_config):
    model = tiny_model(family)
    batch = tiny_batch(model)
    _perturb(_apply(model, name, method_config))
    model.eval()
    first = _logits(model, batch)
    model.train()
    with torch.no_grad():
        model(**batch)  # a stochastic training forward (dropout, MixPHM's random expert) in between
    model.eval()
    torch.testing.assert_close(_logits(model, batch), first, rtol=0, atol=0)
    torch.testing.assert_close(_logits(model, batch), first, rtol=0, atol=0)


@pytest.mark.parametrize("name", METHODS)
def test_step0_outputs(name, family, tiny_model, tiny_batch, method_config):
    if name not in EXACT_IDENTITY and name not in NEAR_IDENTITY:
        pytest.skip(f"{name} is not zero-initialised (its own tests check what it changes)")
    model = tiny_model(family)
    batch = tiny_batch(model)
    reference = _logits(model, batch)
    _apply(model, name, method_config)
    model.eval()
    got = _logits(model, batch)
    if name in EXACT_IDENTITY:
        torch.testing.assert_close(got, reference, rtol=0, atol=0)
        return
    rel = ((got - reference).abs().max() / reference.abs().max()).item()
    assert 0 < rel < NEAR_IDENTITY[name], f"{name}: relative change {rel:.2e} at step 0"
    with torch.no_grad():
        model.peft_shared["phm_rule"].zero_()  # A = 0 -> W = 0 and zero biases: exactly the backbone
    torch.testing.assert_close(_logits(model, batch), reference, rtol=0, atol=0)


@pytest.mark.parametrize("name", METHODS)
def test_second_method_is_refused(name, family, tiny_model, method_config):
    model = tiny_model(family)
    _apply(model, name, method_config)
    other = "pfeiffer" if name != "pfeiffer" else "lora"
    with pytest.raises(ValueError, match="already has the method"):
        methods.apply(model, other)


def test_unknown_method_lists_the_registry(tiny_model):
    model = tiny_model("t5")
    with pytest.raises(ValueError) as err:
        methods.apply(model, "no-such-method")
    for name in METHODS:
        assert name in str(err.value)
    assert not any(p.requires_grad is False for p in model.parameters()), "a refused apply must not freeze anything"
