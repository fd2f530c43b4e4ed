"""FeatureStore over HDF5 (flat and VL-T5 layouts) and npz files written in the test."""

from __future__ import annotations

import pickle

import h5py
import numpy as np
import pytest

from workbench.data.features import FeatureStore

RNG = np.random.default_rng(0)
FIXED = {str(i): RNG.standard_normal((4, 8)).astype(np.float32) for i in (9, 25, 30)}
VARIABLE = {
    "COCO_val2014_000000000042": RNG.standard_normal((2, 6)).astype(np.float32),
    "COCO_val2014_000000000073": RNG.standard_normal((5, 6)).astype(np.float32),
}


@pytest.fixture(params=["npz", "h5", "h5-vlt5"])
def fixed_store(request, tmp_path):
    """A store of FIXED written with FeatureStore.write in each format."""
    if request.param == "npz":
        path = FeatureStore.write(tmp_path / "feats.npz", FIXED)
    elif request.param == "h5":
        path = FeatureStore.write(tmp_path / "feats.h5", FIXED)
    else:
        boxes = {k: np.tile([0.0, 0.0, 1.0, 1.0], (4, 1)) * (j + 1) for j, k in enumerate(FIXED)}
        path = FeatureStore.write(tmp_path / "feats.hdf5", FIXED, boxes=boxes)
    with FeatureStore(path) as store:
        yield store


def test_round_trip(fixed_store):
    store = fixed_store
    assert len(store) == 3
    assert sorted(store.keys()) == ["25", "30", "9"]
    assert "9" in store and 9 in store and "10" not in store and None not in store
    for key, arr in FIXED.items():
        out = store[key]
        assert out.dtype == np.float32 and out.shape == (4, 8)
        np.testing.assert_array_equal(out, arr)
    np.testing.assert_array_equal(store[25], FIXED["25"])  # int ids are converted
    assert store.feat_dim == 8
    assert store.n_visual == 4
    assert sorted(store) == sorted(FIXED)


def test_get_batch_fixed(fixed_store):
    feats, mask = fixed_store.get_batch(["30", "9"])
    assert feats.shape == (2, 4, 8) and feats.dtype == np.float32
    assert mask.shape == (2, 4) and mask.dtype == bool and mask.all()
    np.testing.assert_array_equal(feats[0], FIXED["30"])
    np.testing.assert_array_equal(feats[1], FIXED["9"])


def test_missing_and_shape_read_no_features(fixed_store):
    assert fixed_store.missing(["9", 25, "404", "9", "404", "7"]) == ["404", "7"]
    assert fixed_store.missing([]) == []
    assert fixed_store.shape("30") == (4, 8) and fixed_store.shape(9) == (4, 8)
    with pytest.raises(KeyError, match="'404'"):
        fixed_store.shape("404")


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_variable_length_padding(tmp_path, suffix):
    store = FeatureStore(FeatureStore.write(tmp_path / f"var{suffix}", VARIABLE))
    assert store.shape("COCO_val2014_000000000073") == (5, 6)
    assert store.n_visual is None
    assert store.feat_dim == 6
    ids = ["COCO_val2014_000000000042", "COCO_val2014_000000000073"]
    feats, mask = store.get_batch(ids)
    assert feats.shape == (2, 5, 6)
    assert mask.tolist() == [[True, True, False, False, False], [True] * 5]
    np.testing.assert_array_equal(feats[0, :2], VARIABLE[ids[0]])
    assert not feats[0, 2:].any()  # zero padding
    np.testing.assert_array_equal(feats[1], VARIABLE[ids[1]])


def test_vlt5_layout_hand_made(tmp_path):
    """A file built directly with h5py in the VL-T5 layout, float16 like the released ones."""
    path = tmp_path / "COCO_val2014_obj36.h5"
    with h5py.File(path, "w") as f:
        for key in ("COCO_val2014_000000000042", "COCO_val2014_000000000073"):
            g = f.create_group(key)
            g.create_dataset("features", data=np.ones((36, 16), dtype=np.float16))
            g.create_dataset("boxes", data=np.full((36, 4), 0.5, dtype=np.float32))
            g.create_dataset("img_h", data=480)
            g.create_dataset("img_w", data=640)
    store = FeatureStore(path, feat_dim=16)
    assert store.layout == "vlt5"
    assert store["COCO_val2014_000000000042"].dtype == np.float32
    assert store.n_visual == 36 and store.feat_dim == 16
    boxes = store.boxes("COCO_val2014_000000000073")
    assert boxes.shape == (36, 4) and boxes.dtype == np.float32


def test_flat_layout_hand_made(tmp_path):
    path = tmp_path / "flat.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("391895", data=np.zeros((3, 5), dtype=np.float64))
    store = FeatureStore(path)
    assert store.layout == "flat"
    assert store["391895"].dtype == np.float32
    with pytest.raises(ValueError, match="no boxes for image '391895'"):
        store.boxes("391895")


def test_npz_written_by_numpy(tmp_path):
    path = tmp_path / "plain.npz"
    np.savez(path, **{"1": np.ones((2, 3)), "2": np.zeros((2, 3))})
    store = FeatureStore(path, feat_dim=3)
    assert store.layout == "npz" and len(store) == 2 and store.n_visual == 2
    with pytest.raises(ValueError, match="only the VL-T5"):
        store.boxes("1")


def test_boxes(tmp_path):
    boxes = {"9": np.arange(16, dtype=np.float32).reshape(4, 4)}
    store = FeatureStore(FeatureStore.write(tmp_path / "b.h5", {"9": FIXED["9"]}, boxes=boxes))
    np.testing.assert_array_equal(store.boxes(9), boxes["9"])


def test_missing_image_names_id_and_store(fixed_store):
    with pytest.raises(KeyError, match=r"image id '12345' not in feature store .*feats") as e:
        fixed_store["12345"]
    assert str(fixed_store.path) in str(e.value)
    with pytest.raises(KeyError, match="'12345'"):
        fixed_store.get_batch(["9", "12345"])
    with pytest.raises(KeyError, match="'12345'"):
        fixed_store.boxes("12345")


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_wrong_feature_dim_names_image(tmp_path, suffix):
    path = FeatureStore.write(tmp_path / f"f{suffix}", FIXED)
    store = FeatureStore(path, feat_dim=2048)
    with pytest.raises(ValueError, match=r"image '9' .* feat_dim 8, expected 2048"):
        store["9"]
    assert store.feat_dim == 2048


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_nan_or_inf_names_image(tmp_path, suffix, bad):
    path = tmp_path / f"bad{suffix}"
    arr = np.ones((2, 3), dtype=np.float32)
    arr[1, 2] = bad
    if suffix == ".npz":
        np.savez(path, good=np.ones((2, 3)), broken=arr)
    else:
        with h5py.File(path, "w") as f:
            f.create_dataset("good", data=np.ones((2, 3)))
            f.create_dataset("broken", data=arr)
    store = FeatureStore(path)
    assert store["good"].shape == (2, 3)
    with pytest.raises(ValueError, match=r"image 'broken' .* NaN or inf \(1 values\)"):
        store["broken"]
    with pytest.raises(ValueError, match="'broken'"):
        store.validate()


def test_bad_shapes_and_mixed_dims(tmp_path):
    path = tmp_path / "odd.npz"
    np.savez(path, flat=np.ones(5), ok=np.ones((1, 5)))
    store = FeatureStore(path)
    with pytest.raises(ValueError, match=r"image 'flat' .* shape \(5,\); expected \[n_visual, feat_dim\]"):
        store["flat"]
    with pytest.raises(ValueError, match="'flat'"):
        store.n_visual

    mixed = tmp_path / "mixed.npz"
    np.savez(mixed, a=np.ones((2, 4)), b=np.ones((2, 5)))
    store = FeatureStore(mixed)
    with pytest.raises(ValueError, match="mixes dimensions: image 'b' has feat_dim 5"):
        store.feat_dim
    with pytest.raises(ValueError, match="image 'b' .* feat_dim 5, but image 'a'"):
        store.get_batch(["a", "b"])


def test_unknown_extension_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"'\.pt'.*\.h5, \.hdf5, \.npz"):
        FeatureStore(tmp_path / "feats.pt")
    with pytest.raises(ValueError, match=r"\.h5, \.hdf5, \.npz"):
        FeatureStore.write(tmp_path / "feats.pkl", FIXED)
    with pytest.raises(FileNotFoundError, match=r"feats\.h5.*data/features/.*data/README\.md"):
        FeatureStore(tmp_path / "feats.h5")


def test_corrupt_file(tmp_path):
    path = tmp_path / "broken.h5"
    path.write_bytes(b"not an hdf5 file")
    with pytest.raises(ValueError, match="cannot read .*broken.h5"):
        FeatureStore(path)
    npz = tmp_path / "broken.npz"
    npz.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot read .*broken.npz"):
        FeatureStore(npz)


def test_write_is_atomic(tmp_path, monkeypatch):
    path = FeatureStore.write(tmp_path / "feats.npz", FIXED)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(np.lib.format, "write_array", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        FeatureStore.write(path, {"1": np.ones((1, 2))})
    assert path.read_bytes() == before  # the old store is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feats.npz"]  # no temp file left


def test_write_validates(tmp_path):
    with pytest.raises(ValueError, match="non-empty mapping"):
        FeatureStore.write(tmp_path / "a.npz", {})
    with pytest.raises(ValueError, match="image 'x' contain NaN"):
        FeatureStore.write(tmp_path / "a.npz", {"x": np.full((1, 2), np.nan)})
    with pytest.raises(ValueError, match=r"image 'x' have shape \(2,\)"):
        FeatureStore.write(tmp_path / "a.h5", {"x": np.ones(2)})
    with pytest.raises(ValueError, match="image 'y' have feat_dim 3, the others 2"):
        FeatureStore.write(tmp_path / "a.h5", {"x": np.ones((1, 2)), "y": np.ones((1, 3))})
    with pytest.raises(ValueError, match="cannot be a store key"):
        FeatureStore.write(tmp_path / "a.h5", {"a/b": np.ones((1, 2))})
    with pytest.raises(ValueError, match="boxes can only be written"):
        FeatureStore.write(tmp_path / "a.npz", {"x": np.ones((1, 2))}, boxes={"x": np.ones((1, 4))})
    with pytest.raises(ValueError, match=r"boxes of image 'x' have shape \(2, 4\); expected \[1, 4\]"):
        FeatureStore.write(tmp_path / "a.h5", {"x": np.ones((1, 2))}, boxes={"x": np.ones((2, 4))})
    assert not list(tmp_path.iterdir())


def test_get_batch_needs_ids(fixed_store):
    with pytest.raises(ValueError, match="at least one image id"):
        fixed_store.get_batch([])
    with pytest.raises(TypeError, match="image id must be a str"):
        fixed_store[1.5]


def test_pickles_and_reopens(fixed_store):
    clone = pickle.loads(pickle.dumps(fixed_store))
    np.testing.assert_array_equal(clone["9"], FIXED["9"])
    fixed_store.close()
    np.testing.assert_array_equal(fixed_store["30"], FIXED["30"])  # reopened lazily


def test_hdf5_external_links_merge_stores(tmp_path, monkeypatch):
    """data/README.md's recipe: one store over VL-T5's train2014 and val2014 files, linked, not copied."""
    FeatureStore.write(tmp_path / "train2014_obj36.h5", {"COCO_train2014_000000000009": FIXED["9"]},
                       boxes={"COCO_train2014_000000000009": np.zeros((4, 4))})
    FeatureStore.write(tmp_path / "val2014_obj36.h5", {"COCO_val2014_000000000042": VARIABLE[
        "COCO_val2014_000000000042"][:, :2].repeat(4, axis=1)}, layout="vlt5")
    with h5py.File(tmp_path / "coco_obj36.h5", "w") as out:
        for name in ("train2014_obj36.h5", "val2014_obj36.h5"):
            with h5py.File(tmp_path / name, "r") as f:
                for key in f:
                    out[key] = h5py.ExternalLink(name, key)
    monkeypatch.chdir("/")  # links resolve beside the linking file, not in the working directory
    store = FeatureStore(tmp_path / "coco_obj36.h5", feat_dim=8)
    assert store.layout == "vlt5" and len(store) == 2
    feats, mask = store.get_batch(["COCO_train2014_000000000009", "COCO_val2014_000000000042"])
    assert feats.shape == (2, 4, 8) and mask.sum(1).tolist() == [4, 2]
    np.testing.assert_array_equal(feats[0], FIXED["9"])
