"""The real datasets end to end: official-format fixture files, an HDF5 store with unequal region
counts, tiny random T5 / BART directories; the scores against values computed by hand; bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import workbench.train.loop as loop
from workbench.data import load_task
from workbench.eval import caption_scores
from workbench.models import VLModel
from workbench.train import RunConfig, run

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"

FOLDERS = {"vqa-v2": "vqa_v2", "okvqa": "okvqa", "gqa": "gqa", "coco-caption": "coco"}

# Predictions forced onto the test split, and their scores worked out by hand from the fixtures.
KNOWN = {
    "vqa-v2": {
        # 4 x "down" among the 10 answers: every leave-one-out round has >= 3 matches -> 1
        "262148000": "down",
        # 3 x "1": (3 rounds x 2/3 + 7 rounds x 3/3) / 10 = 0.9
        "262148001": "1",
        # 1 x "yes": (1 round x 0 + 9 rounds x 1/3) / 10 = 0.3
        "393225000": "yes",
    },
    "okvqa": {
        "2971475": "motocross",  # 2 x: (2 x 1/3 + 8 x 2/3) / 10 = 0.6
        "1027055": "Toyota.",  # 4 x "toyota" after normalisation -> 1
    },
    "gqa": {"20968379": "Left", "201640614": "woman", "20602163": "yes."},  # exact match: 1, 0, 1
}
EXPECTED = {
    "vqa-v2": (2.2 / 3, {"number": 0.9, "other": 1.0, "yes/no": 0.3}),
    "okvqa": (0.8, {"four": 0.6, "one": 1.0}),
    "gqa": (2 / 3, {"choose": 1.0, "compare": 1.0, "query": 0.0}),
}


def config(task, backbone, data, layout="text_first", **changes):
    options = {"root": str(FIXTURES / FOLDERS[task]), "features": str(data.store)}
    options.update(changes.pop("task_options", {}))
    base = dict(backbone=str(backbone), backbone_options={"feat_dim": data.feat_dim, "layout": layout}, task=task,
                task_options=options, n_shots=1 if task == "coco-caption" else 2, seed=13, method="full",
                lr=1e-3, max_steps=2, eval_every=1, batch_size=2, quiet=True)
    base.update(changes)
    return RunConfig(**base)


@pytest.fixture
def spy(monkeypatch):
    """Records the visual masks the trainer hands to the model, and forces KNOWN test predictions."""
    seen = {"forward": [], "generate": [], "predicted": []}
    forward, generate_text, predict = VLModel.forward, VLModel.generate_text, loop.predict

    def spy_forward(self, *args, **kw):
        seen["forward"].append(kw.get("visual_mask"))
        return forward(self, *args, **kw)

    def spy_generate(self, *args, **kw):
        seen["generate"].append(kw.get("visual_mask"))
        return generate_text(self, *args, **kw)

    def forced_predict(model, split, cfg, batch_size=256):
        out = predict(model, split, cfg, batch_size)
        seen["predicted"] += out
        known = KNOWN.get(cfg.task, {})
        if cfg.task == "coco-caption":  # the first reference of each test image
            known = {e.id: e.answers[0] for e in load_task("coco-caption", "test", root=FIXTURES / "coco")}
        return [known.get(e.id, p) for e, p in zip(split.examples, out)]

    monkeypatch.setattr(VLModel, "forward", spy_forward)
    monkeypatch.setattr(VLModel, "generate_text", spy_generate)
    monkeypatch.setattr(loop, "predict", forced_predict)
    return seen


@pytest.mark.parametrize("layout", ["text_first", "visual_first"])
@pytest.mark.parametrize("task, family", [("vqa-v2", "t5"), ("okvqa", "bart"), ("gqa", "t5"), ("coco-caption", "bart"),
                                          ("vqa-v2", "bart"), ("coco-caption", "t5")])
def test_real_task_trains_and_scores(task, family, layout, hf_backbones, real_data, tmp_path, spy):
    cfg = config(task, hf_backbones[family], real_data, layout)
    result = run(cfg, store=tmp_path)
    test = load_task(task, "test", root=FIXTURES / FOLDERS[task])
    assert set(result.predictions) == {e.id for e in test}
    assert result.metrics["steps"] == 2 and len(result.history) == 2
    assert all(isinstance(p, str) for p in spy["predicted"]) and spy["predicted"]

    # the trainer passed the store's region masks; the test images have unequal region counts
    assert spy["forward"] and all(m is not None for m in spy["forward"])
    assert any(m is not None and not bool(m.all()) for m in spy["generate"])

    m = result.metrics["test"]
    if task in EXPECTED:
        overall, per_type = EXPECTED[task]
        assert m["overall"] == pytest.approx(overall)
        assert m["per_type"] == pytest.approx(per_type)
        assert m["n"] == len(test)
    else:  # CIDEr-D with BLEU-4, as pycocoevalcap computes them on the same captions
        refs = {e.id: list(e.answers) for e in test}
        expected = caption_scores({e.id: e.answers[0] for e in test}, refs)
        assert m["overall"] == pytest.approx(expected["CIDEr"]) and m["BLEU-4"] == pytest.approx(expected["BLEU-4"])
        assert m["CIDEr"] > 1.0 and m["per_type"] == {}
    assert result.metrics["test_last"] == m  # forced predictions: both checkpoints score the same
    stored = json.loads((result.path / "config.json").read_text())
    assert stored["backbone_options"] == {"feat_dim": real_data.feat_dim, "layout": layout}


def test_real_task_reuses_the_stored_run(hf_backbones, real_data, tmp_path):
    cfg = config("gqa", hf_backbones["t5"], real_data)
    first = run(cfg, store=tmp_path)
    again = run(cfg, store=tmp_path)
    assert again.reused and again.metrics == json.loads(json.dumps(first.metrics))


def test_split_streams_features_from_the_store(hf_backbones, real_data):
    from workbench.data import FeatureStore
    from workbench.models import load_backbone

    model = load_backbone(hf_backbones["t5"], feat_dim=real_data.feat_dim)
    examples = load_task("vqa-v2", "train", root=FIXTURES / "vqa_v2")
    store = FeatureStore(real_data.store, feat_dim=real_data.feat_dim)
    split = loop.prepare_split(model, examples, store, torch.device("cpu"))
    assert split.feats is None and split.store is store  # nothing held in memory
    b = split.batch(torch.tensor([0, 2, 4]))  # images 9 (3 regions), 25 (5), 30 (2)
    assert b.feats.shape == (3, 5, real_data.feat_dim)
    assert b.visual_mask.sum(1).tolist() == [3, 5, 2]
    assert torch.equal(b.feats[2, :2], torch.from_numpy(store["30"])) and not b.feats[2, 2:].any()
    feats, ids, mask, labels = b  # unpacks as the four tensors
    assert labels.shape[0] == 3


def test_prediction_streams_batches(hf_backbones, real_data, monkeypatch):
    """Scoring never asks the store for more than one batch of images at a time."""
    from workbench.data import FeatureStore
    from workbench.models import load_backbone

    cfg = config("vqa-v2", hf_backbones["t5"], real_data)
    model = load_backbone(hf_backbones["t5"], feat_dim=real_data.feat_dim)
    store = FeatureStore(real_data.store, feat_dim=real_data.feat_dim)
    sizes = []
    get_batch = FeatureStore.get_batch
    monkeypatch.setattr(FeatureStore, "get_batch", lambda self, ids: sizes.append(len(ids)) or get_batch(self, ids))
    examples = load_task("vqa-v2", "train", root=FIXTURES / "vqa_v2")
    out = loop.predict(model, loop.prepare_split(model, examples, store, torch.device("cpu")), cfg, batch_size=4)
    assert len(out) == 6 and sizes == [4, 2]


# ------------------------------------------------------------------------------ training targets
def test_answers_are_sampled_by_soft_score(hf_backbones, real_data):
    from workbench.models import load_backbone

    model = load_backbone(hf_backbones["t5"], feat_dim=real_data.feat_dim)
    examples = load_task("vqa-v2", "train", root=FIXTURES / "vqa_v2")
    feats = {k: np.zeros((1, real_data.feat_dim), np.float32) for k in real_data.regions}
    split = loop.prepare_split(model, examples, feats, torch.device("cpu"), sample_answers=True)
    # "Is this a giraffe?" has one answer (10 x yes): never drawn for; 5 questions have a choice
    assert len(split.answers) == 5 and 2 not in split.answers.rows
    rng = np.random.default_rng(0)
    idx = torch.tensor([0, 2])  # broccoli x6 / vegetables x3 / food x1, then the one-answer question
    decoded = [model.decode(split.batch(idx, answer_rng=rng).labels.clamp(min=0))[0] for _ in range(3000)]
    freq = {a: decoded.count(a) / len(decoded) for a in set(decoded)}
    total = 1.0 + 0.9 + 0.3  # soft scores of 6, 3 and 1 humans
    assert freq == pytest.approx({"broccoli": 1 / total, "vegetables": 0.9 / total, "food": 0.3 / total}, abs=0.03)
    one = split.batch(torch.tensor([2]), answer_rng=rng).labels
    assert torch.equal(one, split.batch(torch.tensor([2])).labels)  # the single answer: always the target


def test_one_answer_examples_draw_nothing(small_config):
    from workbench.models import load_backbone

    model = load_backbone(small_config.backbone)
    examples = load_task("shapes-vqa", "train", n_scenes=20)
    feats = {e.image_id: np.zeros((4, model.config.feat_dim), np.float32) for e in examples}
    split = loop.prepare_split(model, examples, feats, torch.device("cpu"), sample_answers=True)
    rng = np.random.default_rng(5)
    state = rng.bit_generator.state
    b = split.batch(torch.arange(20), answer_rng=rng)
    assert rng.bit_generator.state == state and len(split.answers) == 0
    assert torch.equal(b.labels, split.batch(torch.arange(20)).labels) and b.visual_mask is None


def test_most_frequent_target_trains_on_the_first_answer(hf_backbones, real_data, tmp_path, monkeypatch):
    built = []
    prepare = loop.prepare_split
    monkeypatch.setattr(loop, "prepare_split", lambda *a, **k: built.append(k.get("sample_answers", False))
                        or prepare(*a, **k))
    cfg = config("vqa-v2", hf_backbones["t5"], real_data, max_steps=1, task_options={"target": "most_frequent"})
    run(cfg, store=tmp_path)
    assert built == [False, False, False]
    built.clear()
    run(cfg.replace(task_options={**cfg.task_options, "target": "sample"}), store=tmp_path)
    assert built == [True, False, False]


# ------------------------------------------------------------------------------ bad input
@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if a run gets as far as applying a method (training would follow)."""
    import workbench.methods as methods

    def refuse(*a, **k):
        raise AssertionError("training started before the bad input was reported")

    monkeypatch.setattr(methods, "apply", refuse)


def test_missing_root_names_the_official_file_and_folder(hf_backbones, real_data, tmp_path, no_training):
    cfg = config("vqa-v2", hf_backbones["t5"], real_data, task_options={"root": str(tmp_path / "nowhere")})
    with pytest.raises(FileNotFoundError, match=r"nowhere.*task_options\['root'\].*v2_OpenEnded_mscoco_train2014"):
        run(cfg, store=tmp_path / "runs")
    partial = tmp_path / "okvqa"
    partial.mkdir()
    (partial / "OpenEnded_mscoco_train2014_questions.json").write_text("{}")
    cfg = config("okvqa", hf_backbones["t5"], real_data, task_options={"root": str(partial)})
    with pytest.raises(FileNotFoundError, match=r"'mscoco_train2014_annotations\.json' is not in .*okvqa"):
        run(cfg, store=tmp_path / "runs")
    cfg = config("gqa", hf_backbones["t5"], real_data, task_options={"root": str(partial)})
    with pytest.raises(FileNotFoundError, match=r"train_balanced_questions\.json"):
        run(cfg, store=tmp_path / "runs")


def test_store_without_an_image_names_it(hf_backbones, real_data, tmp_path, no_training):
    from workbench.data import FeatureStore

    partial = {k: np.ones((n, real_data.feat_dim), np.float32) for k, n in real_data.regions.items() if k != "393225"}
    store = FeatureStore.write(tmp_path / "partial.npz", partial)
    data = type(real_data)(**{**vars(real_data), "store": store})
    with pytest.raises(ValueError, match=r"no features for 1 image.*'393225'.*image_id_format"):
        run(config("vqa-v2", hf_backbones["t5"], data), store=tmp_path / "runs")


def test_feat_dim_that_disagrees_names_the_option_and_both_values(hf_backbones, real_data, tmp_path,
                                                                   no_training):
    cfg = config("gqa", hf_backbones["t5"], real_data).replace(backbone_options={"feat_dim": 12})
    with pytest.raises(ValueError, match=rf"backbone_options\['feat_dim'\]=12 .* feat_dim {real_data.feat_dim}"):
        run(cfg, store=tmp_path)
    cfg = cfg.replace(backbone_options={})  # an HF directory needs feat_dim: say where to put it
    with pytest.raises(ValueError, match=rf"backbone_options=.*'feat_dim'.*feat_dim {real_data.feat_dim}"):
        run(cfg, store=tmp_path)


def test_feature_task_without_a_store_names_the_option(hf_backbones, real_data, tmp_path, no_training):
    cfg = config("coco-caption", hf_backbones["t5"], real_data)
    cfg = cfg.replace(task_options={"root": cfg.task_options["root"]})
    with pytest.raises(ValueError, match=r"needs a feature store: set task_options\['features'\]"):
        run(cfg, store=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"task_options\['features'\].*not found"):
        run(cfg.replace(task_options={**cfg.task_options, "features": str(tmp_path / "none.h5")}), store=tmp_path)


def test_embedded_backbone_without_encoder_needs_a_store(hf_backbones, tmp_path, no_training):
    cfg = RunConfig(backbone=str(hf_backbones["t5"]), backbone_options={"feat_dim": 16}, task="shapes-vqa",
                    n_shots=2, quiet=True, task_options={"n_scenes": 10})
    with pytest.raises(ValueError, match=r"no visual encoder: set task_options=\{'features'"):
        run(cfg, store=tmp_path)


def test_options_that_do_not_apply_are_named(hf_backbones, real_data, tmp_path, no_training):
    cfg = config("vqa-v2", hf_backbones["t5"], real_data)
    with pytest.raises(ValueError, match=r"pool_size"):
        run(cfg.replace(pool_size=100), store=tmp_path)
    with pytest.raises(ValueError, match=r"task 'vqa-v2' has no option\(s\) \['n_scenes'\]; it accepts \[.*'root'"):
        run(cfg.replace(task_options={**cfg.task_options, "n_scenes": 10}), store=tmp_path)
    with pytest.raises(ValueError, match=r"task_options\['target'\] must be one of"):
        run(cfg.replace(task_options={**cfg.task_options, "target": "mode"}), store=tmp_path)
    with pytest.raises(TypeError, match=r"backbone_options: .*unknown option.*'colour'"):
        run(cfg.replace(backbone_options={"feat_dim": real_data.feat_dim, "colour": 1}), store=tmp_path)
    with pytest.raises(ValueError, match=r"unknown task 'vqa-v3'.*vqa-v2"):
        cfg.replace(task="vqa-v3")


# ------------------------------------------------------------------------------ RunConfig
def test_backbone_options_are_hashed_only_when_set():
    # pinned: a hash must not depend on the machine, the dict order or the Python session
    assert RunConfig(backbone="/nonexistent/ckpt").hash == "205dc82aeecd"  # LoRA at lr 1.5e-3 (3e-3: 29b675e775eb)
    old = RunConfig(backbone="/nonexistent/ckpt", task="shapes-caption", method="full", n_shots=16, pool_size=100,
                    task_options={"types": ["exist"]})
    assert old.hash == "3396699603a3"
    assert RunConfig.from_dict({k: v for k, v in old.to_dict().items() if k != "backbone_options"}).hash == old.hash
    assert old.replace(backbone_options={"feat_dim": 2048}).hash != old.hash
    with pytest.raises(ValueError, match="backbone_options cannot set 'device'"):
        RunConfig(backbone_options={"device": "cpu"})


def test_the_hash_covers_the_methods_resolved_defaults(monkeypatch):
    import workbench.methods as methods_pkg

    cfg = RunConfig(backbone="/nonexistent/ckpt", method="lora")
    assert cfg.replace(method_config={"r": 8}).hash == cfg.hash  # spelling out a default: the same run
    assert cfg.replace(method_config={"r": 16}).hash != cfg.hash
    real = methods_pkg.get_config
    monkeypatch.setattr(methods_pkg, "get_config", lambda name, **o: real(name, **{"r": 4, **o}))
    assert RunConfig(backbone="/nonexistent/ckpt", method="lora").hash != "205dc82aeecd"  # a new default: a new run
    with pytest.raises(ValueError, match="unknown options"):
        RunConfig(backbone="/nonexistent/ckpt", method="lora", method_config={"rank": 4}).hash


def test_store_for_an_embedded_task_on_a_backbone_with_its_own_encoder(small_config, tmp_path, no_training):
    from workbench.data import FeatureStore

    examples = load_task("shapes-vqa", "train", n_scenes=40) + load_task("shapes-vqa", "test", n_scenes=40)
    store = FeatureStore.write(tmp_path / "shapes.npz", {e.image_id: np.zeros((4, 24), np.float32) for e in examples})
    cfg = small_config.replace(task_options={**small_config.task_options, "features": str(store)})
    with pytest.raises(ValueError, match=r"its own visual encoder; task_options\['features'\] would bypass it"):
        run(cfg, store=tmp_path / "runs")


def test_store_for_an_embedded_task_on_a_backbone_without_encoder(hf_backbones, tmp_path):
    """Precomputed features for ShapesWorld (e.g. perfect perception) on an encoder-less backbone train."""
    from workbench.data import FeatureStore

    examples = load_task("shapes-vqa", "train", n_scenes=8) + load_task("shapes-vqa", "test", n_scenes=4)
    store = FeatureStore.write(tmp_path / "shapes.npz", {e.image_id: np.ones((3, 16), np.float32) for e in examples})
    cfg = RunConfig(backbone=str(hf_backbones["t5"]), backbone_options={"feat_dim": 16}, task="shapes-vqa", n_shots=2,
                    method="full", max_steps=1, batch_size=2, quiet=True, test_size=4,
                    task_options={"n_scenes": 8, "features": str(store)})
    result = run(cfg, store=tmp_path / "runs")
    assert result.metrics["test"]["n"] == 4
