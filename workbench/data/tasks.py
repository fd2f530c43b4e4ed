"""Task loaders: one name -> a sequence of :class:`Example`.

Embedded tasks (no files needed):

* ``"shapes-caption"``: ShapesWorld captioning; splits ``pretrain`` (the pre-training corpus),
  ``train`` (the downstream pool) and ``test``. Consistent with pre-training.
* ``"shapes-vqa"``: ShapesWorld VQA with 8 typed questions; splits ``train`` (the pool that
  low-resource splits are drawn from) and ``test``. Inconsistent with pre-training.
* ``"easy-vqa"``: the easy-VQA dataset read from the ``easy-vqa`` PyPI package; splits
  ``train`` and ``test``.

Images are referenced, not loaded: :func:`load_images` turns examples into pixels.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, Sequence

import numpy as np

from .example import Example
from .shapesworld import Scene, ShapesWorld

VQA_PROMPT = "vqa: {question}"
CAPTION_PROMPT = "caption:"

# Default sizes: big enough for N = 1000 train + 1000 dev, small enough to build in seconds.
DEFAULT_SIZES = {
    ("shapes-caption", "pretrain"): 20000,
    ("shapes-caption", "train"): 4000,
    ("shapes-caption", "test"): 500,
    ("shapes-vqa", "train"): 4000,
    ("shapes-vqa", "test"): 1000,
}

_TASKS: dict[str, Callable[..., list[Example]]] = {}


def register_task(name: str):
    """Decorator adding a loader ``fn(split, **options) -> list[Example]`` to the registry."""

    def add(fn):
        _TASKS[name] = fn
        return fn

    return add


def list_tasks() -> list[str]:
    """Names accepted by :func:`load_task`."""
    return sorted(_TASKS)


def load_task(name: str, split: str, **options) -> list[Example]:
    """Load a task split as a list of :class:`Example`.

    Args:
        name: one of :func:`list_tasks` (``"shapes-caption"``, ``"shapes-vqa"``, ``"easy-vqa"``).
        split: ``"train"`` or ``"test"`` (and ``"pretrain"`` for ``shapes-caption``).
        **options: task sizes and knobs, e.g. ``n_scenes=2000`` (ShapesWorld tasks: number of
            scenes; VQA uses one question per scene), ``world_seed=0``, ``prompt=...``,
            ``limit=`` (easy-vqa: keep the first ``limit`` questions).

    Raises:
        ValueError: unknown task (the message lists the known ones) or split.
    """
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}")
    return _TASKS[name](split, **options)


def _check_split(task: str, split: str, allowed: Sequence[str]) -> None:
    if split not in allowed:
        raise ValueError(f"task {task!r} has splits {list(allowed)}, got {split!r}")


def _n_scenes(task, split, n_scenes):
    n = DEFAULT_SIZES[(task, split)] if n_scenes is None else n_scenes
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n_scenes must be a positive int, got {n_scenes!r}")
    return int(n)


@register_task("shapes-caption")
def _shapes_caption(split, n_scenes=None, world_seed=0, prompt=CAPTION_PROMPT, image_size=64):
    _check_split("shapes-caption", split, ("pretrain", "train", "test"))
    world = _world(world_seed, image_size)
    world_split = "pretrain" if split == "pretrain" else f"caption-{split}"
    out = []
    for scene in world.scenes(world_split, _n_scenes("shapes-caption", split, n_scenes)):
        # The reference set: the scene's own caption first (the training target), then the
        # other surface templates, so CIDEr sees several phrasings like COCO's 5 captions.
        first = world.caption(scene)
        refs = [first] + [c for c in (world.caption(scene, t) for t in range(3)) if c != first]
        out.append(
            Example(
                id=f"shapes-caption/{split}/{scene.index}",
                image_id=scene.key,
                prompt=prompt,
                answers=tuple(refs),
                question_type=None,
                image_ref=f"shapesworld:{world_seed}:{image_size}:{world_split}:{scene.index}",
                meta={"n_objects": len(scene.objects)},
            )
        )
    return out


@register_task("shapes-vqa")
def _shapes_vqa(
    split, n_scenes=None, world_seed=0, prompt=VQA_PROMPT, image_size=64, questions_per_scene=1, types=None
):
    # types: a subset of the question types (e.g. ["exist"]) to study one skill; default all
    _check_split("shapes-vqa", split, ("train", "test"))
    world = _world(world_seed, image_size)
    world_split = f"vqa-{split}"
    out = []
    for scene in world.scenes(world_split, _n_scenes("shapes-vqa", split, n_scenes)):
        for q, (qtype, question, answer) in enumerate(world.questions(scene, questions_per_scene, types)):
            out.append(
                Example(
                    id=f"shapes-vqa/{split}/{scene.index}/{q}",
                    image_id=scene.key,
                    prompt=prompt.format(question=question),
                    answers=(answer,),
                    question_type=qtype,
                    image_ref=f"shapesworld:{world_seed}:{image_size}:{world_split}:{scene.index}",
                    meta={"question": question, "n_objects": len(scene.objects)},
                )
            )
    return out


_EASY_TYPES = {"yes": "yes/no", "no": "yes/no", "circle": "shape", "rectangle": "shape", "triangle": "shape"}


@register_task("easy-vqa")
def _easy_vqa(split, prompt=VQA_PROMPT, limit=None):
    _check_split("easy-vqa", split, ("train", "test"))
    try:
        import easy_vqa
    except ImportError as e:  # pragma: no cover - it is a declared dependency
        raise ImportError("the easy-vqa task needs the `easy-vqa` package: pip install easy-vqa") from e
    if split == "train":
        questions, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        questions, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    n = len(questions) if limit is None else min(int(limit), len(questions))
    return [
        Example(
            id=f"easy-vqa/{split}/{i}",
            image_id=f"easy-vqa-{split}-{image_ids[i]}",
            prompt=prompt.format(question=questions[i]),
            answers=(answers[i],),
            question_type=_EASY_TYPES.get(answers[i], "color"),
            image_ref=paths[image_ids[i]],
            meta={"question": questions[i]},
        )
        for i in range(n)
    ]


# ------------------------------------------------------------------------------ images
@lru_cache(maxsize=8)
def _world(seed: int, image_size: int) -> ShapesWorld:
    return ShapesWorld(seed=seed, image_size=image_size)


def _image_ref(ref: str | Example) -> str:
    if isinstance(ref, Example):
        if ref.image_ref is None:
            raise ValueError(f"example {ref.id!r} has no image_ref; real datasets use a FeatureStore")
        return ref.image_ref
    return ref


def _world_and_scene(ref: str) -> tuple[ShapesWorld, Scene]:
    _, seed, size, split, index = ref.split(":")
    world = _world(int(seed), int(size))
    return world, world.scene(split, int(index))


def load_scene(ref: str | Example) -> Scene:
    """The ShapesWorld scene (its objects, not its pixels) behind an example or a ``shapesworld:`` ref."""
    ref = _image_ref(ref)
    if not ref.startswith("shapesworld:"):
        raise ValueError(f"{ref!r} is not a ShapesWorld image (expected 'shapesworld:seed:size:split:index')")
    return _world_and_scene(ref)[1]


def load_image(ref: str | Example) -> np.ndarray:
    """Pixels (``uint8 [H, W, 3]``) for an example or its ``image_ref``.

    ``shapesworld:`` references are rendered on the fly (deterministic); anything else is a
    path to an image file read with Pillow.
    """
    ref = _image_ref(ref)
    if ref.startswith("shapesworld:"):
        world, scene = _world_and_scene(ref)
        return world.render(scene)
    from PIL import Image

    with Image.open(ref) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def load_images(examples: Sequence[Example | str]) -> np.ndarray:
    """Stack the images of ``examples`` into ``uint8 [n, H, W, 3]`` (same size required)."""
    images = [load_image(e) for e in examples]
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(f"images have different shapes {sorted(shapes)}; resize before stacking")
    return np.stack(images) if images else np.zeros((0, 0, 0, 3), dtype=np.uint8)
