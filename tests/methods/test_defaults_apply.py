"""Every registered method, with its default config, applies to the embedded backbone (vlt5-tiny)
and trains: a forward, the method's extra losses, a backward, gradients on the trainable tensors.

vlt5-tiny has d_model 128. Defaults that do not divide it are resolved by the methods' documented
rules (MixPHM's d // 12 = 10 is rounded up to the PHM n = 4: bottleneck 12); this file checks that
no registered method is left that cannot be applied as registered. The README's example of
``methods.apply(model, "mixphm", num_experts=4)`` is run as printed.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

from workbench import methods
from workbench.models import load_backbone

README = Path(__file__).resolve().parents[2] / "README.md"
BACKBONE = "vlt5-tiny"
N_VISUAL = 9  # the embedded encoder's 3 x 3 grid


def _batch(model, n: int = 3, seed: int = 0) -> dict:
    """``n`` examples with padding in prompts and targets (``model(**batch)``)."""
    prompts = ["what colour is the circle?", "how many squares are there?", "is there a red shape?"]
    targets = ["red", "two", "no"]
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, N_VISUAL, model.config.feat_dim, generator=g)
    ids, mask = model.encode_prompts((prompts * n)[:n])
    return dict(visual_feats=feats, input_ids=ids, attention_mask=mask,
                labels=model.encode_targets((targets * n)[:n]))


def _train_step(model, handle, batch) -> torch.Tensor:
    """One training forward + backward as the trainer does it; returns the loss."""
    model.train()

    def forward():
        return model(**batch)

    loss = handle.loss(forward)
    loss.backward()
    return loss


@pytest.fixture(scope="module")
def backbone_state():
    """One load of the backbone's weights (a fresh model per test is rebuilt from it: cheap)."""
    return load_backbone(BACKBONE).state_dict()


def _fresh(state):
    model = load_backbone(BACKBONE)
    model.load_state_dict(state)
    return model.eval()


@pytest.mark.parametrize("name", methods.list_methods())
def test_every_method_applies_with_its_defaults_and_trains(name, backbone_state):
    torch.manual_seed(0)
    model = _fresh(backbone_state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. BitFit's "T5 has no bias" notice, peft's CUDA notices
        handle = methods.apply(model, name)  # the registered defaults, nothing overridden
    trainable = handle.trainable_parameters()
    assert trainable, f"{name}: nothing trains"
    batch = _batch(model)
    loss = _train_step(model, handle, batch)
    assert torch.isfinite(loss), (name, loss)
    # Methods that route each forward to one expert (adamix: separate expert modules) reach an expert
    # only when it is drawn: a few more backward passes (gradients accumulate) until all are reached.
    for _ in range(40):
        missing = [n for n, p in trainable if p.grad is None]
        if not missing:
            break
        _train_step(model, handle, batch)
    assert not missing, f"{name}: no gradient reached {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for _, p in trainable), name
    assert any(p.grad.abs().sum() > 0 for _, p in trainable), f"{name}: every gradient is zero"
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen, f"{name}: frozen parameters got gradients: {frozen[:5]}"


def test_mixphm_rounds_its_bottleneck_up_to_a_multiple_of_n(backbone_state):
    model = _fresh(backbone_state)
    assert model.d_model == 128 and 128 // 12 == 10  # not a multiple of n = 4
    handle = methods.apply(model, "mixphm")
    assert handle.bottleneck == 12 == methods.get_config("mixphm").resolved_bottleneck(128)
    assert {(m.down.out_features, m.up.in_features) for m in handle.modules.values()} == {(12, 12)}
    assert "bottleneck=12" in repr(next(iter(handle.modules.values())))


def test_the_readme_mixphm_example(backbone_state, tmp_path, monkeypatch):
    """README "PEFT methods": the code block as printed, on vlt5-tiny."""
    text = README.read_text()
    section = text[text.index("## PEFT methods"):]
    block = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    assert 'methods.apply(model, "mixphm", num_experts=4)' in block
    monkeypatch.chdir(tmp_path)  # the example saves to a relative path
    namespace = {"model": _fresh(backbone_state), "fresh_model": _fresh(backbone_state)}
    exec(compile(block, "README.md", "exec"), namespace)
    handle, model, fresh = namespace["handle"], namespace["model"], namespace["fresh_model"]
    assert handle.config.num_experts == 4 and handle.bottleneck == 12
    assert (tmp_path / "mixphm.safetensors").exists()
    # The loaded copy holds the same method weights, and the example's model trains.
    loaded = methods.handle_of(fresh).state_dict()
    assert loaded.keys() == handle.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in handle.state_dict().items())
    loss = _train_step(model, handle, _batch(model))
    assert torch.isfinite(loss)
    assert all(p.grad is not None for _, p in handle.trainable_parameters())


# The methods that compile in pieces (README, "The backbone"): AdaMix and MixPHM draw their expert as a
# Python int in every forward (the official routing), PETAL checks its labels in its bottleneck loss,
# and peft's DoRA, LoHa and LoKr break the graph inside peft. Every other method traces as one graph.
COMPILES_IN_PIECES = {"adamix", "mixphm", "petal", "dora", "loha", "lokr"}


@pytest.mark.parametrize("name", methods.list_methods())
def test_which_methods_trace_as_one_graph(name, backbone_state):
    torch.manual_seed(0)
    model = _fresh(backbone_state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = methods.apply(model, name)
    model.train()
    batch = _batch(model)
    # fullgraph=True stops at the first graph break; the "eager" backend only traces (no code generation).
    compiled = torch.compile(lambda: handle.loss(lambda: model(**batch)), fullgraph=True, backend="eager")
    torch._dynamo.reset()
    try:
        compiled()
        why = None
    except torch._dynamo.exc.TorchDynamoException as e:
        why = str(e).splitlines()[0]
    finally:
        torch._dynamo.reset()
    if name in COMPILES_IN_PIECES:
        assert why is not None, f"{name} now traces as one graph: update COMPILES_IN_PIECES and the README"
    else:
        assert why is None, (name, why)


def test_the_readme_counts_the_methods_that_trace_as_one_graph():
    text = " ".join(README.read_text().split())
    pieces = len(COMPILES_IN_PIECES)
    peft_methods = len(methods.list_methods()) - 1  # all but full fine-tuning
    assert f"{peft_methods - pieces} of the {peft_methods} PEFT methods" in text
