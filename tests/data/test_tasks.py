"""Task loaders: sizes, fields, images, easy-VQA, unknown names."""

import numpy as np
import pytest

from workbench.data import Example, ShapesWorld, list_tasks, load_image, load_images, load_scene, load_task


def test_known_tasks():
    assert {"shapes-caption", "shapes-vqa", "easy-vqa"} <= set(list_tasks())


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
