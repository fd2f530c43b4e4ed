"""redundancy_analysis on tiny random T5 / BART VLModels with simple test adapters."""

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from torch import nn

torch.set_num_threads(1)

from workbench.models.testing import RandomAdapter, tiny_vlmodel  # noqa: E402
from workbench.models import capture  # noqa: E402
from workbench.probes import DegenerateInputWarning, cka, compare_rdms, rdm  # noqa: E402
from workbench.studies import BAND_COLUMNS, redundancy_analysis  # noqa: E402
from workbench.studies import COLUMNS as COLUMNS_ALL  # noqa: E402

CORPUS = [
    "a large red circle at the top left",
    "a small blue square at the bottom right",
    "vqa: what colour is the circle?",
    "vqa: how many squares are there?",
    "vqa: is there a triangle?",
    "caption:", "red", "blue", "green", "yes", "no", "two",
]
PROMPTS = ["vqa: what colour is the circle?", "caption:", "vqa: how many squares are there?",
           "vqa: is there a triangle?", "red", "a small blue square"]
TARGETS = ["red", "a large red circle", "two", "no", "yes", "blue"]
FEAT_DIM, N_VISUAL, D = 16, 5, 32
COLUMNS = ["method", "layer", "stack", "measure", "target", "value"]


class Adapter(RandomAdapter):
    """The shared random adapter at this file's width (its class name labels the probe rows)."""

    def __init__(self, seed=0):
        super().__init__(D, seed=seed)


class Copy(nn.Module):
    """The planted case: the module's contribution is a copy of h (h' = h + h)."""

    def forward(self, x, h):
        return h + h.clone()


class Zero(nn.Module):
    """A zero-initialised adapter before training: Delta = 0."""

    def forward(self, x, h):
        return h + 0.0 * h


def batches(model, n_batches=4):
    out = []
    for b in range(n_batches):
        g = torch.Generator().manual_seed(b)
        feats = torch.randn(len(PROMPTS), N_VISUAL, FEAT_DIM, generator=g)
        order = torch.randperm(len(PROMPTS), generator=g).tolist()
        ids, mask = model.encode_prompts([PROMPTS[i] for i in order])
        labels = model.encode_targets([TARGETS[i] for i in order])
        out.append(dict(visual_feats=feats, input_ids=ids, attention_mask=mask, labels=labels))
    return out


@pytest.fixture(scope="module", params=["t5", "bart"])
def model(request):
    """A tiny random VLModel (eval mode): d_model D, 2 + 2 layers, 4 heads, tokenizer trained on CORPUS."""
    return tiny_vlmodel(request.param, feat_dim=FEAT_DIM, d_model=D, layers=2, heads=4, d_ff=64, corpus=CORPUS).eval()


@pytest.fixture
def adapted(model):
    for i in range(2):
        model.add_sublayer_modification(f"encoder.{i}.ffn", Adapter(seed=i))
        model.add_sublayer_modification(f"decoder.{i}.ffn", Adapter(seed=10 + i))
    model.add_sublayer_modification("encoder.1.attn", Adapter(seed=7))
    yield model
    model.remove_modifications()


def test_rows_and_ranges(adapted):
    data = batches(adapted)
    df = redundancy_analysis(adapted, data, max_samples=20)
    assert list(df.columns[:6]) == COLUMNS
    # 5 modules x 2 measures x 2 targets, in forward order
    assert len(df) == 5 * 2 * 2
    assert list(dict.fromkeys(df["point"])) == ["encoder.0.ffn", "encoder.1.attn", "encoder.1.ffn",
                                                "decoder.0.ffn", "decoder.1.ffn"]
    assert set(df["measure"]) == {"rsa", "cka"} and set(df["target"]) == {"pretrained", "task"}
    assert set(df["stack"]) == {"encoder", "decoder"}
    assert df.groupby("point").size().eq(4).all()
    assert (df["n_samples"] == 20).all()
    assert (df["method"] == "Adapter").all()
    assert df["value"].notna().all()
    assert df["value"].between(-1 - 1e-9, 1 + 1e-9).all()
    assert df.loc[df.measure == "cka", "value"].between(0, 1 + 1e-9).all()
    enc1 = df[(df.point == "encoder.1.attn")]
    assert (enc1["layer"] == 1).all() and (enc1["sublayer"] == "attn").all()


def test_values_match_direct_computation(adapted):
    data = batches(adapted)
    df = redundancy_analysis(adapted, data, max_samples=12, stacks="decoder")
    assert set(df["stack"]) == {"decoder"}
    acts = capture(adapted, ["decoder.1.ffn@0:delta", "decoder.1.ffn", "decoder.final"], data=data, max_samples=12,
                   dtype=torch.float64)
    u, h, t = acts["decoder.1.ffn@0:delta"], acts["decoder.1.ffn"], acts["decoder.final"]
    row = df[(df.point == "decoder.1.ffn")].set_index(["measure", "target"])["value"]
    np.testing.assert_allclose(row["rsa", "pretrained"], float(compare_rdms(rdm(u, "cosine"), rdm(h, "cosine"),
                                                                             "pearson")), atol=1e-12)
    np.testing.assert_allclose(row["cka", "task"], float(cka(u, t)), atol=1e-12)


def test_planted_copy_is_redundant(model):
    model.add_sublayer_modification("encoder.1.ffn", Copy())
    model.add_sublayer_modification("decoder.0.ffn", Adapter(seed=3))
    try:
        df = redundancy_analysis(model, batches(model), max_samples=24, mi=True)
    finally:
        model.remove_modifications()
    copy = df[(df.point == "encoder.1.ffn") & (df.target == "pretrained")].set_index("measure")["value"]
    assert copy["rsa"] == pytest.approx(1.0, abs=1e-9)
    assert copy["cka"] == pytest.approx(1.0, abs=1e-9)
    other = df[(df.point == "decoder.0.ffn") & (df.target == "pretrained")].set_index("measure")["value"]
    assert other["cka"] < copy["cka"]
    assert set(df["measure"]) == {"rsa", "cka", "mi"}
    mi = df[df.measure == "mi"]["value"]
    assert np.isfinite(mi).all()
    # a copy shares everything with H: its MI is at least the adapter's
    assert copy["mi"] > other["mi"] - 0.1


def test_output_option_and_degenerate(model):
    model.add_sublayer_modification("encoder.0.ffn", Zero())
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            df = redundancy_analysis(model, batches(model, 2), max_samples=8, stacks=("encoder",))
        assert df["value"].isna().all()  # Delta = 0 cannot be measured
        assert any(issubclass(w.category, DegenerateInputWarning) for w in caught)
        # the whole output h' = H: identical to the pretrained representation
        df = redundancy_analysis(model, batches(model, 2), max_samples=8, stacks="encoder", output="output",
                                 measures="cka", targets="pretrained")
        assert len(df) == 1 and df["value"].iloc[0] == pytest.approx(1.0, abs=1e-9)
    finally:
        model.remove_modifications()


class Scale(nn.Module):
    """A projection modification y -> 1.5 y: its contribution 0.5 y is the projection's output, scaled."""

    def forward(self, x, y):
        return 1.5 * y


def test_projection_modules(model):
    model.add_projection_modification("decoder.0.cross_attn.v", Scale())
    model.add_sublayer_modification("encoder.0.ffn", Adapter())
    try:
        df = redundancy_analysis(model, batches(model, 2), max_samples=10, kinds="projection")
        assert set(df["point"]) == {"decoder.0.cross_attn.v"} and len(df) == 4
        pre = df[df.target == "pretrained"].set_index("measure")["value"]
        assert pre["rsa"] == pytest.approx(1.0, abs=1e-9) and pre["cka"] == pytest.approx(1.0, abs=1e-9)
        both = redundancy_analysis(model, batches(model, 2), max_samples=10, kinds=("sublayer", "projection"))
        assert list(dict.fromkeys(both["point"])) == ["encoder.0.ffn", "decoder.0.cross_attn.v"]
    finally:
        model.remove_modifications()


def test_null_bands_and_intervals(model):
    model.add_sublayer_modification("encoder.1.ffn", Copy())
    model.add_sublayer_modification("decoder.0.ffn", Adapter(seed=3))
    try:
        data = batches(model)
        plain = redundancy_analysis(model, data, max_samples=24, mi=True)
        df = redundancy_analysis(model, data, max_samples=24, mi=True, n_perm=49, n_boot=30, seed=1)
    finally:
        model.remove_modifications()
    assert list(df.columns) == COLUMNS_ALL + BAND_COLUMNS
    # resampling does not change the values
    np.testing.assert_allclose(df["value"], plain["value"], atol=1e-10)
    copy = df[(df.point == "encoder.1.ffn") & (df.target == "pretrained")].set_index("measure")
    # a copy of H is far outside the null of shuffled pairs
    for m in ("rsa", "cka", "mi"):
        assert copy.loc[m, "value"] > copy.loc[m, "null_hi"]
        assert copy.loc[m, "p_value"] == pytest.approx(1 / 50)
    sim = df[df.measure != "mi"]
    assert (sim["null_lo"] <= sim["null_hi"]).all() and (sim["ci_lo"] <= sim["ci_hi"]).all()
    assert df[df.measure == "mi"]["ci_lo"].isna().all()  # no bootstrap for KSG (duplicated points)
    with pytest.raises(ValueError, match="n_perm"):
        redundancy_analysis(model.add_sublayer_modification("encoder.0.ffn", Adapter()) or model, data, n_perm=-1)
    with pytest.raises(ValueError, match="critic per permutation"):
        redundancy_analysis(model, data, mi="infonce", n_perm=5)
    model.remove_modifications()


def test_bad_input(model):
    data = batches(model, 1)
    with pytest.raises(ValueError, match="no sub-layer method modules"):
        redundancy_analysis(model, data)
    model.add_sublayer_modification("encoder.0.ffn", Adapter())
    try:
        with pytest.raises(ValueError, match="measures"):
            redundancy_analysis(model, data, measures=("svcca",))
        with pytest.raises(ValueError, match="targets"):
            redundancy_analysis(model, data, targets=("labels",))
        with pytest.raises(ValueError, match="output"):
            redundancy_analysis(model, data, output="h")
        with pytest.raises(ValueError, match="max_samples"):
            redundancy_analysis(model, data, max_samples=2)
        with pytest.raises(ValueError, match="mi must be"):
            redundancy_analysis(model, data, mi="kde")
        with pytest.raises(ValueError, match="no sub-layer method modules in"):
            redundancy_analysis(model, data, stacks="decoder")
        with pytest.raises(ValueError, match="no projection method modules"):
            redundancy_analysis(model, data, kinds="projection")
        with pytest.raises(ValueError, match="kinds"):
            redundancy_analysis(model, data, kinds=("ffn",))
    finally:
        model.remove_modifications()
