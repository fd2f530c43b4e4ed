"""The embedded visual encoder and the feature cache."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from workbench.models import VisualEncoder, extract_features
from workbench.models.visual import default_cache_dir, encoder_fingerprint, grid_position_code


def images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 64, 64, 3), dtype=np.uint8)


@pytest.fixture
def encoder():
    torch.manual_seed(0)
    return VisualEncoder(feat_dim=64, grid=4).eval()


class Counter:
    """Counts forward calls of a module (a pre-hook: the module itself is untouched)."""

    def __init__(self, module):
        self.calls = 0
        module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1


def test_shapes_inputs_and_size(encoder):
    imgs = images(3)
    out = encoder(imgs)
    assert out.shape == (3, 16, 64) and out.dtype == torch.float32
    assert torch.equal(encoder(torch.from_numpy(imgs)), out)  # numpy and torch agree
    assert torch.allclose(encoder(imgs[0])[0], out[0], atol=1e-6)  # a single [H, W, 3] image
    assert torch.equal(encoder(list(imgs)), out)
    assert sum(p.numel() for p in encoder.parameters()) < 1_000_000
    assert VisualEncoder(feat_dim=96, grid=8)(imgs).shape == (3, 64, 96)
    with pytest.raises(ValueError, match="uint8"):
        encoder(imgs.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[batch, H, W, 3\]"):
        encoder(imgs[..., :2])
    with pytest.raises(ValueError, match="pos_dim"):
        VisualEncoder(feat_dim=64, pos_dim=6)


def test_features_do_not_depend_on_the_batch(encoder):
    imgs = images(5)
    together = encoder(imgs)
    alone = torch.cat([encoder(imgs[i : i + 1]) for i in range(5)])
    assert torch.allclose(together, alone, atol=1e-5)


def test_grid_position_is_recoverable(encoder):
    out = encoder(images(2))
    code = grid_position_code(4, 16)
    assert torch.equal(out[0, :, -16:], code) and torch.equal(out[1, :, -16:], code)
    assert len({tuple(r.tolist()) for r in code}) == 16  # every cell has its own code
    # row-major: cell (r, c) is token 4 r + c; the first frequency's sin/cos orders rows and columns
    rows = torch.atan2(code[:, 0], code[:, 4]).reshape(4, 4)
    assert (rows[:, 0].diff() > 0).all() and torch.allclose(rows, rows[:, :1].expand(4, 4))


def test_content_is_local(encoder):
    """A white square in one cell changes that cell's features most."""
    blank = np.zeros((1, 64, 64, 3), dtype=np.uint8)
    base = encoder(blank)[0, :, :48]
    for r, c in [(0, 0), (3, 3), (1, 2)]:
        img = blank.copy()
        img[0, 16 * r : 16 * r + 16, 16 * c : 16 * c + 16] = 255
        diff = (encoder(img)[0, :, :48] - base).norm(dim=-1)
        assert int(diff.argmax()) == 4 * r + c


def test_config_round_trip(encoder):
    twin = VisualEncoder.from_config_dict(encoder.config_dict())
    twin.load_state_dict(encoder.state_dict())
    assert torch.equal(twin(images(1)), encoder(images(1)))
    assert encoder_fingerprint(twin) == encoder_fingerprint(encoder)


# --- the cache ------------------------------------------------------------------------------------


def test_cache_is_reused_and_keyed(encoder, tmp_path):
    imgs = images(10)
    expected = encoder(imgs).detach().numpy()
    counter = Counter(encoder)
    first = extract_features(encoder, imgs, cache_dir=tmp_path, key="toy", batch_size=4, quiet=True)
    assert first.shape == (10, 16, 64) and first.dtype == np.float32 and counter.calls == 3
    files = sorted(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("toy-") and files[0].suffix == ".npy"
    assert np.allclose(first, expected, atol=1e-6)

    again = extract_features(encoder, imgs, cache_dir=tmp_path, key="toy", quiet=True)
    assert counter.calls == 3  # no re-encoding
    assert np.array_equal(again, first)

    # changed images -> a new key
    extract_features(encoder, images(10, seed=1), cache_dir=tmp_path, key="toy", quiet=True)
    assert counter.calls == 4 and len(list(tmp_path.iterdir())) == 2

    # changed weights -> a new key, never the stale file
    with torch.no_grad():
        encoder.proj.bias.add_(1.0)
    changed = extract_features(encoder, imgs, cache_dir=tmp_path, key="toy", quiet=True)
    assert counter.calls == 5 and len(list(tmp_path.iterdir())) == 3
    assert not np.allclose(changed, first)
    assert encoder.training is False  # the mode is restored


def test_cache_options(encoder, tmp_path, capsys):
    counter = Counter(encoder)
    imgs = images(4)
    extract_features(encoder, imgs, cache_dir=tmp_path, use_cache=False, quiet=True)
    assert list(tmp_path.iterdir()) == []
    out = extract_features(encoder, imgs, cache_dir=tmp_path, quiet=True)
    assert capsys.readouterr().err == ""  # quiet: no progress bar
    # a damaged cache file is rebuilt, not trusted
    (file,) = tmp_path.iterdir()
    file.write_bytes(b"not a npy file")
    rebuilt = extract_features(encoder, imgs, cache_dir=tmp_path, quiet=True)
    assert np.array_equal(rebuilt, out) and counter.calls == 3
    assert [p.name for p in tmp_path.iterdir()] == [file.name]  # no temporary files left behind
    assert default_cache_dir().parts[-2:] == (".cache", "features")
    with pytest.raises(ValueError, match="key"):
        extract_features(encoder, imgs, cache_dir=tmp_path, key="a/b", quiet=True)
    with pytest.raises(ValueError, match="uint8"):
        extract_features(encoder, imgs.astype(np.float32), cache_dir=tmp_path, quiet=True)


@dataclass(frozen=True)
class FakeExample:
    id: str
    image_id: str
    image_ref: str


def test_examples_are_encoded_once_per_image(encoder, tmp_path):
    pixels = {f"img{i}": images(1, seed=i)[0] for i in range(3)}
    loads = []

    def loader(ref):
        loads.append(ref)
        return pixels[ref]

    examples = [FakeExample(f"q{k}", f"img{k % 3}", f"img{k % 3}") for k in range(7)]
    feats = extract_features(encoder, examples, cache_dir=tmp_path, quiet=True, image_loader=loader)
    assert sorted(feats) == ["img0", "img1", "img2"] and len(loads) == 3
    for image_id, f in feats.items():
        assert f.shape == (16, 64)
        assert np.allclose(f, encoder(pixels[image_id])[0].detach().numpy(), atol=1e-6)


def _conv_backends(module, seen):
    """Record the backend torch picks for each convolution of ``module`` as it runs."""
    def hook(conv, args):
        x = args[0]
        seen.append(str(torch._C._select_conv_backend(x, conv.weight, conv.bias, list(conv.stride), list(conv.padding),
                                                      list(conv.dilation), False, [0, 0], conv.groups, None)))
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_pre_hook(hook)


def test_portable_numerics_keep_convolutions_off_onednn_and_nnpack(encoder, tmp_path, monkeypatch):
    import workbench.utils

    imgs = images(16)  # from 16 images on, torch picks NNPACK when oneDNN is off
    monkeypatch.setattr(workbench.utils, "_mode_at_import", "pinned")
    seen = []
    _conv_backends(encoder, seen)
    pinned = encoder(imgs).detach()
    assert seen and all(b.endswith("Mkldnn") for b in seen)
    pinned_file = extract_features(encoder, imgs, cache_dir=tmp_path, key="toy", quiet=True)
    monkeypatch.setattr(workbench.utils, "_mode_at_import", "portable")
    seen.clear()
    portable = encoder(imgs).detach()
    assert seen and all(b.endswith("Slow2d") for b in seen), seen  # im2col + an MKL product
    assert torch.backends.mkldnn.enabled and torch._C._get_nnpack_enabled()  # restored after the pass
    # another code path, the same convolution up to rounding
    torch.testing.assert_close(portable, pinned, atol=1e-5, rtol=0)
    # features from another code path are other features: a new cache key, never the pinned file
    again = extract_features(encoder, imgs, cache_dir=tmp_path, key="toy", quiet=True)
    assert len(list(tmp_path.iterdir())) == 2
    assert np.allclose(again, pinned_file, atol=1e-5)
