"""Insertion points: names, counts, and the sub-layer / projection modification mechanism."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workbench.models import InsertionPoint, load_backbone

L = 2  # layers per stack in the tiny configs


class Keep(nn.Module):
    """h -> h (with a parameter, so registration is visible in the state dict)."""

    def __init__(self, d=32):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d))

    def forward(self, x, h):
        return h


class Zero(nn.Module):
    def forward(self, x, h):
        return h * 0


class Record(nn.Module):
    """Remembers every (x, h) it sees; returns h."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, h):
        self.seen.append((x.detach().clone(), h.detach().clone()))
        return h


class Affine(nn.Module):
    def __init__(self, add=0.0, mul=1.0):
        super().__init__()
        self.add, self.mul = add, mul

    def forward(self, x, h):
        return (h + self.add) * self.mul


class Parallel(nn.Module):
    """A parallel adapter: h + up(down(x)), to check that gradients reach its weights."""

    def __init__(self, d=32, m=4):
        super().__init__()
        self.down, self.up = nn.Linear(d, m), nn.Linear(m, d)

    def forward(self, x, h):
        return h + self.up(torch.relu(self.down(x)))


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


# --- names and counts ---------------------------------------------------------------------------


def test_names_identical_across_families(tiny_hf_dirs):
    t5 = load_backbone(tiny_hf_dirs["t5"], feat_dim=8)
    bart = load_backbone(tiny_hf_dirs["bart"], feat_dim=8)
    assert list(t5.insertion_points()) == list(bart.insertion_points())


def test_counts_and_order(tiny_model):
    subs = tiny_model.insertion_points(kind="sublayer")
    assert len(tiny_model.insertion_points(kind="sublayer", stack="encoder")) == 2 * L
    assert len(tiny_model.insertion_points(kind="sublayer", stack="decoder")) == 3 * L
    assert list(subs) == [
        "encoder.0.attn", "encoder.0.ffn", "encoder.1.attn", "encoder.1.ffn",
        "decoder.0.self_attn", "decoder.0.cross_attn", "decoder.0.ffn",
        "decoder.1.self_attn", "decoder.1.cross_attn", "decoder.1.ffn",
    ]
    projs = tiny_model.insertion_points(kind="projection")
    attn_subs = [n for n in subs if not n.endswith("ffn")]
    for sub in attn_subs:
        for p in "qkvo":
            assert f"{sub}.{p}" in projs
    for sub in [n for n in subs if n.endswith("ffn")]:
        assert f"{sub}.wi" in projs and f"{sub}.wo" in projs
    assert len(projs) == 4 * len(attn_subs) + 2 * (2 * L)


def test_points_resolve_to_the_right_modules(tiny_model):
    d = tiny_model.d_model
    for name, p in tiny_model.insertion_points().items():
        assert isinstance(p, InsertionPoint) and p.name == name
        mod = tiny_model.get_submodule(p.module_path)
        tiny_model.get_submodule(p.x_path)
        tiny_model.get_submodule(p.layer_path)
        assert p.mods_path.startswith(p.layer_path + ".peft_mods.")
        if p.kind == "projection":
            assert (mod.in_features, mod.out_features) == (p.in_dim, p.out_dim)
            assert tiny_model.lm.get_submodule(p.lm_path) is mod
        else:
            assert (p.in_dim, p.out_dim) == (d, d)
    expected = {"t5": ("T5Attention", "T5DenseActDense", "Linear"), "bart": ("BartAttention", "Linear", "Linear")}
    attn_cls, ffn_cls, proj_cls = expected[tiny_model.family]
    assert type(tiny_model.get_point_module("encoder.1.attn")).__name__ == attn_cls
    assert type(tiny_model.get_point_module("decoder.0.ffn")).__name__ == ffn_cls
    assert type(tiny_model.get_point_module("decoder.1.cross_attn.v")).__name__ == proj_cls
    assert tiny_model.get_point("decoder.1.cross_attn.v").projection == "v"


def test_unknown_point_suggests_names(tiny_model):
    with pytest.raises(ValueError, match=r"unknown insertion point 'encoder.0.fn'.*did you mean.*'encoder.0.ffn'"):
        tiny_model.get_point("encoder.0.fn")
    with pytest.raises(ValueError, match="decoder.0.cross_attn"):
        tiny_model.add_sublayer_modification("decoder.7.cross_attn", Keep())
    with pytest.raises(ValueError, match="kind"):
        tiny_model.insertion_points(kind="ffn")


# --- sub-layer modifications -----------------------------------------------------------------------


def test_identity_modifications_are_bit_identical(tiny_model, batch):
    ref = logits(tiny_model, batch)
    args = (batch["visual_feats"], batch["input_ids"], batch["attention_mask"])
    ref_gen = tiny_model.generate(*args, num_beams=2, max_new_tokens=4)
    for name in tiny_model.insertion_points(kind="sublayer"):
        tiny_model.add_sublayer_modification(name, Keep())
    for name in tiny_model.insertion_points(kind="projection"):
        tiny_model.add_projection_modification(name, Keep(1))
    assert torch.equal(logits(tiny_model, batch), ref)
    assert torch.equal(tiny_model.generate(*args, num_beams=2, max_new_tokens=4), ref_gen)


def test_zero_ffn_equals_zeroed_ffn_weights(tiny_model, batch):
    """h * 0 at an FFN point == a copy whose FFN output projection is zeroed (H = 0 exactly)."""
    patched = copy.deepcopy(tiny_model)
    wo = patched.get_point_module("encoder.1.ffn.wo")
    with torch.no_grad():
        wo.weight.zero_()
        if wo.bias is not None:
            wo.bias.zero_()
    ref = logits(tiny_model, batch)
    tiny_model.add_sublayer_modification("encoder.1.ffn", Zero())
    ours = logits(tiny_model, batch)
    assert torch.equal(ours, logits(patched, batch))
    assert not torch.equal(ours, ref)  # the point does act on the output


def test_zero_attention_equals_zeroed_output_projection(tiny_model, batch):
    patched = copy.deepcopy(tiny_model)
    o = patched.get_point_module("decoder.0.cross_attn.o")
    with torch.no_grad():
        o.weight.zero_()
        if o.bias is not None:
            o.bias.zero_()
    tiny_model.add_sublayer_modification("decoder.0.cross_attn", Zero())
    assert torch.equal(logits(tiny_model, batch), logits(patched, batch))


def _independent_x_and_h(model, name):
    """Register plain hooks that compute (X, H) of a sub-layer from the family's definitions."""
    seen = {}
    p = model.get_point(name)
    layer = model.get_submodule(p.layer_path)
    handles = []

    def grab(key, idx=None):
        def hook(mod, args, out):
            seen[key] = (out[idx] if idx is not None else out).detach().clone()

        return hook

    def grab_input(key):
        def hook(mod, args):
            seen[key] = args[0].detach().clone()

        return hook

    if model.family == "t5":
        # X: the block input (attn) or the output of the previous sub-layer container.
        k = {"attn": 0, "self_attn": 0, "cross_attn": 1, "ffn": 2 if p.stack == "decoder" else 1}[p.sublayer]
        if k == 0:
            handles.append(layer.register_forward_pre_hook(grab_input("x")))
        else:
            handles.append(layer.layer[k - 1].register_forward_hook(grab("x", 0)))
        container = layer.layer[k]
        if p.sublayer == "ffn":
            def h_hook(mod, args, out):  # H = wo(act(wi(layer_norm(X)))), recomputed by hand
                drd = mod.DenseReluDense
                inner = drd.act(F.linear(mod.layer_norm(args[0]), drd.wi.weight))
                seen["h"] = F.linear(inner, drd.wo.weight).detach().clone()
            handles.append(container.register_forward_hook(h_hook))
        else:
            inner = container.SelfAttention if k == 0 else container.EncDecAttention
            handles.append(inner.register_forward_hook(grab("h", 0)))
    else:
        # BART post-LN: X is the layer input (self attention) or the previous LayerNorm's output.
        prev_norm = {"cross_attn": "self_attn_layer_norm",
                     "ffn": "encoder_attn_layer_norm" if p.stack == "decoder" else "self_attn_layer_norm"}
        if p.sublayer in prev_norm:
            handles.append(getattr(layer, prev_norm[p.sublayer]).register_forward_hook(grab("x")))
        else:
            handles.append(layer.register_forward_pre_hook(grab_input("x")))
        if p.sublayer == "ffn":
            def h_hook(mod, args, out):  # H = fc2(act(fc1(X))), recomputed by hand
                inner = layer.activation_fn(F.linear(args[0], layer.fc1.weight, layer.fc1.bias))
                seen["h"] = F.linear(inner, layer.fc2.weight, layer.fc2.bias).detach().clone()
            handles.append(layer.fc1.register_forward_pre_hook(lambda m, a: h_hook(m, a, None)))
        else:
            attn = layer.self_attn if p.sublayer in ("attn", "self_attn") else layer.encoder_attn
            handles.append(attn.register_forward_hook(grab("h", 0)))
    return seen, handles


@pytest.mark.parametrize("name", ["encoder.0.attn", "encoder.1.ffn", "decoder.1.self_attn", "decoder.0.cross_attn",
                                  "decoder.1.ffn"])
def test_module_sees_true_x_and_h(tiny_model, batch, name):
    rec = Record()
    tiny_model.add_sublayer_modification(name, rec)
    seen, handles = _independent_x_and_h(tiny_model, name)
    logits(tiny_model, batch)
    for h in handles:
        h.remove()
    assert len(rec.seen) == 1
    x, h = rec.seen[0]
    assert torch.equal(x, seen["x"])
    assert torch.allclose(h, seen["h"], atol=1e-6)


def test_modifications_compose_in_order_and_are_submodules(tiny_model, batch):
    first, last = Record(), Record()
    path = tiny_model.add_sublayer_modification("decoder.0.ffn", first, name="first")
    tiny_model.add_sublayer_modification("decoder.0.ffn", Affine(add=1.0))
    tiny_model.add_sublayer_modification("decoder.0.ffn", Affine(mul=2.0))
    tiny_model.add_sublayer_modification("decoder.0.ffn", last, name="last")
    logits(tiny_model, batch)
    assert torch.allclose(last.seen[0][1], (first.seen[0][1] + 1.0) * 2.0)

    point = tiny_model.get_point("decoder.0.ffn")
    assert path == f"{point.mods_path}.first"
    assert tiny_model.get_submodule(path) is first
    assert [n for n, _ in tiny_model.modifications()["decoder.0.ffn"]] == ["first", "1", "2", "last"]
    keep = Keep()
    tiny_model.add_sublayer_modification("encoder.0.attn", keep, name="keep")
    assert f"{tiny_model.get_point('encoder.0.attn').mods_path}.keep.w" in tiny_model.state_dict()
    assert any(p is keep.w for p in tiny_model.parameters())
    tiny_model.to(torch.float64)
    assert keep.w.dtype == torch.float64
    with pytest.raises(ValueError, match="already exists"):
        tiny_model.add_sublayer_modification("encoder.0.attn", Keep(), name="keep")


def test_remove_restores_the_model(tiny_model, batch):
    ref = logits(tiny_model, batch)
    hook_counts = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in tiny_model.modules()]
    n_keys = len(tiny_model.state_dict())
    for name in tiny_model.insertion_points(kind="sublayer"):
        tiny_model.add_sublayer_modification(name, Zero())
    tiny_model.add_projection_modification("encoder.0.attn.q", Zero())
    assert not torch.equal(logits(tiny_model, batch), ref)
    removed = tiny_model.remove_sublayer_modifications()
    assert len(removed) == 10 and list(tiny_model.modifications()) == ["encoder.0.attn.q"]
    tiny_model.remove_projection_modifications("encoder.0.attn.q")
    assert torch.equal(logits(tiny_model, batch), ref)
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in tiny_model.modules()] == hook_counts
    assert len(tiny_model.state_dict()) == n_keys
    assert not any(hasattr(m, "peft_mods") for m in tiny_model.modules())


def test_gradients_reach_modifications(tiny_model, batch):
    tiny_model.requires_grad_(False)
    adapter = Parallel(tiny_model.d_model)
    tiny_model.add_sublayer_modification("encoder.0.ffn", adapter)
    nn.init.normal_(adapter.up.weight)
    tiny_model(**batch).loss.backward()
    assert adapter.down.weight.grad is not None and adapter.down.weight.grad.abs().sum() > 0


def test_deepcopy_keeps_modifications_separate(tiny_model, batch):
    rec = Record()
    tiny_model.add_sublayer_modification("encoder.0.ffn", rec)
    twin = copy.deepcopy(tiny_model)
    logits(twin, batch)
    assert rec.seen == []  # the copy's hooks call the copy's module
    twin_rec = dict(twin.modifications()["encoder.0.ffn"])["0"]
    assert twin_rec is not rec and len(twin_rec.seen) == 1
    twin.remove_sublayer_modifications()
    logits(tiny_model, batch)
    assert len(rec.seen) == 1


# --- projection modifications ------------------------------------------------------------------------


def test_projection_modification(tiny_model, batch):
    patched = copy.deepcopy(tiny_model)
    v = patched.get_point_module("encoder.1.attn.v")
    with torch.no_grad():
        v.weight.zero_()
        if v.bias is not None:
            v.bias.zero_()
    rec = Record()
    tiny_model.add_projection_modification("encoder.1.attn.v", rec)
    tiny_model.add_projection_modification("encoder.1.attn.v", Zero())
    assert torch.equal(logits(tiny_model, batch), logits(patched, batch))
    x, y = rec.seen[0]
    v_orig = tiny_model.get_point_module("encoder.1.attn.v")  # calling it would run the hooks again
    assert torch.equal(F.linear(x, v_orig.weight, v_orig.bias), y)
    with pytest.raises(ValueError, match="projection point; use add_projection_modification"):
        tiny_model.add_sublayer_modification("encoder.1.attn.v", Zero())
    with pytest.raises(ValueError, match="sublayer point; use add_sublayer_modification"):
        tiny_model.add_projection_modification("encoder.1.attn", Zero())
    with pytest.raises(TypeError, match="nn.Module"):
        tiny_model.add_projection_modification("encoder.1.attn.q", lambda x, y: y)


def test_hooks_follow_a_peft_wrapped_projection(tiny_model, batch):
    """peft replaces the FFN's output projection by a LoRA wrapper: H must include the LoRA update."""
    from peft import LoraConfig, inject_adapter_in_model

    point = tiny_model.get_point("encoder.0.ffn")
    rec = Record()
    tiny_model.add_sublayer_modification("encoder.0.ffn", rec)
    wo_path = tiny_model.get_point("encoder.0.ffn.wo").lm_path
    inject_adapter_in_model(LoraConfig(r=2, target_modules=[wo_path], init_lora_weights=False), tiny_model.lm)
    wrapped = tiny_model.get_point_module("encoder.0.ffn.wo")
    assert hasattr(wrapped, "base_layer")
    logits(tiny_model, batch)
    assert len(rec.seen) == 1  # applied once, not once on the base layer and once on the wrapper
    x, h = rec.seen[0]
    if tiny_model.family == "t5":
        ff = tiny_model.get_submodule(point.x_path)
        expected = ff.DenseReluDense(ff.layer_norm(x))
    else:
        layer = tiny_model.get_submodule(point.layer_path)
        expected = layer.fc2(layer.activation_fn(layer.fc1(x)))
    assert torch.allclose(h, expected, atol=1e-6)
    # and the LoRA update is really in it (init_lora_weights=False makes it non-zero)
    inner = x_ffn_input(tiny_model, point, x)
    assert not torch.allclose(wrapped(inner), wrapped.base_layer(inner))


def x_ffn_input(model, point, x):
    """The input of the FFN's output projection, recomputed from X."""
    if model.family == "t5":
        drd = model.get_submodule(point.module_path)
        ff = model.get_submodule(point.x_path)
        return drd.act(drd.wi(ff.layer_norm(x)))
    layer = model.get_submodule(point.layer_path)
    return layer.activation_fn(layer.fc1(x))
