"""Tasks: specs and registration, loaders (sizes, fields, images, easy-VQA, the real datasets), unknown names."""

from pathlib import Path

import numpy as np
import pytest

from workbench.data import (
    Example,
    ShapesWorld,
    TaskSpec,
    get_task_spec,
    list_tasks,
    load_image,
    load_images,
    load_scene,
    load_task,
    register_task,
    unregister_task,
)


def test_known_tasks():
    assert {"shapes-caption", "shapes-vqa", "easy-vqa", "vqa-v2", "okvqa", "gqa", "coco-caption"} <= set(list_tasks())


def test_unknown_task_lists_known_ones():
    with pytest.raises(ValueError, match="shapes-vqa"):
        load_task("vqa-v3", "train")


def test_unknown_split():
    with pytest.raises(ValueError, match="splits"):
        load_task("shapes-vqa", "pretrain")


def test_shapes_vqa_examples():
    ex = load_task("shapes-vqa", "train", n_scenes=50)
    assert len(ex) == 50 and all(isinstance(e, Example) for e in ex)
    assert len({e.id for e in ex}) == 50
    e = ex[0]
    assert e.prompt.startswith("vqa: ") and e.prompt.endswith("?")
    assert len(e.answers) == 1 and e.question_type is not None
    assert load_image(e).shape == (64, 64, 3)


def test_load_scene_is_the_scene_behind_the_image():
    e = load_task("shapes-vqa", "test", n_scenes=3)[2]
    scene = load_scene(e)
    assert scene.key == e.image_id and len(scene.objects) == e.meta["n_objects"]
    assert np.array_equal(ShapesWorld(0).render(scene), load_image(e))
    with pytest.raises(ValueError, match="not a ShapesWorld image"):
        load_scene("data/images/cat.png")


def test_shapes_vqa_sizes_are_parameters():
    assert len(load_task("shapes-vqa", "test", n_scenes=10, questions_per_scene=2)) == 20


def test_shapes_vqa_types_select_question_types():
    ex = load_task("shapes-vqa", "train", n_scenes=40, types=["exist", "count"])
    assert len(ex) == 40 and {e.question_type for e in ex} == {"exist", "count"}
    assert all(e.prompt.startswith(("vqa: is there", "vqa: how many")) for e in ex)
    # one type on the same scenes: the same images, only that kind of question
    only = load_task("shapes-vqa", "train", n_scenes=40, types=("exist",))
    assert [e.image_id for e in only] == [e.image_id for e in ex]
    assert {e.answers[0] for e in only} == {"yes", "no"}
    for bad in ("exist", [], ["exists"]):
        with pytest.raises(ValueError, match="question types"):
            load_task("shapes-vqa", "train", n_scenes=5, types=bad)


def test_train_and_test_scenes_are_disjoint():
    train = load_task("shapes-vqa", "train", n_scenes=300)
    test = load_task("shapes-vqa", "test", n_scenes=300)
    pre = load_task("shapes-caption", "pretrain", n_scenes=300)
    assert not {e.image_ref for e in train} & {e.image_ref for e in test}
    assert not {e.image_ref for e in pre} & {e.image_ref for e in test}
    # Different splits draw different scenes, not only different names.
    a = load_images(train[:20]).reshape(20, -1)
    b = load_images(test[:20]).reshape(20, -1)
    assert not any((x == y).all() for x in a for y in b)


def test_captions_have_several_references():
    ex = load_task("shapes-caption", "test", n_scenes=5)
    assert all(len(e.answers) == 3 for e in ex) and ex[0].prompt == "caption:"
    assert ex[0].question_type is None


def test_easy_vqa_reads_the_package():
    ex = load_task("easy-vqa", "test")
    assert len(ex) == 9673  # the official test set size
    assert {e.question_type for e in ex} == {"yes/no", "shape", "color"}
    img = load_image(ex[0])
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert len(load_task("easy-vqa", "train", limit=100)) == 100


def test_load_images_stacks():
    ex = load_task("shapes-vqa", "test", n_scenes=4)
    assert load_images(ex).shape == (4, 64, 64, 3)


def test_bad_size():
    with pytest.raises(ValueError, match="n_scenes"):
        load_task("shapes-vqa", "train", n_scenes=0)


# ------------------------------------------------------------------------------ task specs
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.mark.parametrize("name, kind, metric, splits, length, pool_option, features", [
    ("shapes-caption", "caption", "cider", ("pretrain", "train", "test"), 64, "n_scenes", False),
    ("shapes-vqa", "vqa", "exact", ("train", "test"), 8, "n_scenes", False),
    ("easy-vqa", "vqa", "exact", ("train", "test"), 8, None, False),
    ("vqa-v2", "vqa", "vqa", ("train", "test"), 8, None, True),
    ("okvqa", "vqa", "vqa", ("train", "test"), 8, None, True),
    ("gqa", "vqa", "exact", ("train", "val", "test"), 8, None, True),
    ("coco-caption", "caption", "cider", ("train", "val", "test"), 64, None, True),
])
def test_registered_specs(name, kind, metric, splits, length, pool_option, features):
    spec = get_task_spec(name)
    assert isinstance(spec, TaskSpec) and spec.name == name
    assert (spec.kind, spec.metric, spec.splits, spec.max_answer_length) == (kind, metric, splits, length)
    assert (spec.pool_split, spec.test_split, spec.pool_size_option) == ("train", "test", pool_option)
    assert spec.has_pool_size == (pool_option is not None) and spec.needs_features == features
    assert spec.description


def test_unknown_task_spec_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown task 'vqa-v3'.*registered: .*okvqa.*vqa-v2"):
        get_task_spec("vqa-v3")


def test_register_task_decorator_records_a_spec():
    @register_task("tiny-test-task", kind="vqa", metric="exact", splits=("train", "test"), needs_features=True)
    def loader(split, size=3):
        """Three questions."""
        return [Example(f"{split}/{i}", f"img{i}", "vqa: q?", ("yes",)) for i in range(size)]

    try:
        spec = get_task_spec("tiny-test-task")
        assert spec.loader is loader and spec.description == "Three questions." and spec.max_answer_length == 8
        assert spec.options() == ["size"] and len(load_task("tiny-test-task", "test", size=2)) == 2
        with pytest.raises(ValueError, match=r"has no option\(s\) \['n_scenes'\]; it accepts \['size'\]"):
            load_task("tiny-test-task", "train", n_scenes=3)
        with pytest.raises(ValueError, match="already registered"):
            register_task("tiny-test-task")(lambda split: [])
        register_task("tiny-test-task", kind="vqa", metric="exact", needs_features=True)(loader)  # re-import: fine
    finally:
        unregister_task("tiny-test-task")
    assert "tiny-test-task" not in list_tasks()


@pytest.mark.parametrize("options, message", [
    (dict(kind="audio"), "kind must be one of"),
    (dict(kind="caption", metric="vqa"), "metric of a 'caption' task must be one of"),
    (dict(metric="bleu"), "metric of a 'vqa' task"),
    (dict(splits=("dev", "test")), "pool_split 'train' is not one of splits"),
    (dict(max_answer_length=0), "max_answer_length must be a positive int"),
    (dict(pool_size_option="n_images"), "pool_size_option 'n_images' is not an option of the loader"),
])
def test_inconsistent_specs_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        register_task("bad-task", **options)(lambda split, limit=None: [])
    assert "bad-task" not in list_tasks()


# ------------------------------------------------------------------------------ real datasets
def test_vqa_v2_task_reads_train2014_for_train_and_val2014_for_test():
    train = load_task("vqa-v2", "train", root=FIXTURES / "vqa_v2")
    test = load_task("vqa-v2", "test", root=str(FIXTURES / "vqa_v2"))
    assert [e.id for e in train] == ["9000", "9001", "25000", "25001", "30000", "30001"]
    assert [e.id for e in test] == ["262148000", "262148001", "393225000"]
    assert train[0].image_id == "9" and len(train[0].answers) == 10 and train[0].target == "broccoli"
    assert {e.question_type for e in test} == {"yes/no", "number", "other"}
    assert [e.id for e in load_task("vqa-v2", "train", root=FIXTURES / "vqa_v2", limit=2)] == ["9000", "9001"]
    fmt = load_task("vqa-v2", "test", root=FIXTURES / "vqa_v2", image_id_format="COCO_val2014_{image_id:012d}")
    assert fmt[0].image_id == "COCO_val2014_000000262148"


def test_okvqa_gqa_and_coco_tasks():
    ok = load_task("okvqa", "train", root=FIXTURES / "okvqa")
    assert len(ok) == 4 and ok[0].question_type == "four" and len(ok[0].answers) == 10
    assert [e.id for e in load_task("okvqa", "test", root=FIXTURES / "okvqa")] == ["2971475", "1027055"]
    gqa_train = load_task("gqa", "train", root=FIXTURES / "gqa")
    gqa_test = load_task("gqa", "test", root=FIXTURES / "gqa")  # testdev_balanced_questions.json
    assert len(gqa_train) == 4 and [e.id for e in gqa_test] == ["20968379", "201640614", "20602163"]
    assert {e.question_type for e in gqa_test} == {"choose", "query", "compare"}
    assert [e.id for e in load_task("gqa", "val", root=FIXTURES / "gqa")] == ["05451384", "201307251", "20968379"]
    coco_train = load_task("coco-caption", "train", root=FIXTURES / "coco")  # Karpathy train + restval
    coco_test = load_task("coco-caption", "test", root=FIXTURES / "coco")
    assert [e.id for e in coco_train] == ["522418", "57870", "318219"]
    assert [e.id for e in coco_test] == ["391895", "184613", "403013"]
    assert coco_test[0].prompt == "caption:" and len(coco_test[0].answers) == 2
    assert load_task("coco-caption", "val", root=FIXTURES / "coco") == []


def test_real_task_without_its_files(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"dataset folder .*nowhere \(task_options\['root'\]\).*"
                                                r"'OpenEnded_mscoco_val2014_questions\.json'"):
        load_task("okvqa", "test", root=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"'testdev_balanced_questions\.json' is not in"):
        load_task("gqa", "test", root=tmp_path)
    import workbench.data.tasks as tasks

    monkeypatch.setattr(tasks, "repo_root", lambda: tmp_path)  # no data/ folder: the default is named
    with pytest.raises(FileNotFoundError, match=r"the default folder data/coco/.*dataset_coco\.json"):
        load_task("coco-caption", "train")
    with pytest.raises(ValueError, match="limit must be a positive int"):
        load_task("vqa-v2", "test", root=FIXTURES / "vqa_v2", limit=0)


def test_image_id_format_can_name_the_coco_folder():
    fmt = "COCO_{split}_{image_id:012d}"
    assert load_task("vqa-v2", "train", root=FIXTURES / "vqa_v2", image_id_format=fmt)[0].image_id == \
        "COCO_train2014_000000000009"
    assert load_task("okvqa", "test", root=FIXTURES / "okvqa", image_id_format=fmt)[0].image_id == \
        "COCO_val2014_000000297147"
    train = load_task("coco-caption", "train", root=FIXTURES / "coco", image_id_format=fmt)
    assert [e.image_id for e in train] == ["COCO_val2014_000000522418", "COCO_train2014_000000057870",
                                           "COCO_train2014_000000318219"]  # restval images live in val2014
