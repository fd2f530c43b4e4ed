"""Tasks: one name -> a :class:`TaskSpec` (how to load it, what it is, how to score it).

``register_task(name, kind=..., metric=..., splits=...)`` decorates a loader
``fn(split, **options) -> list[Example]`` and records beside it a :class:`TaskSpec`; the trainer
reads only the spec (answer length, metric, pool split, pool size, whether a feature store is
needed), never a task's name.

Embedded tasks (no files needed):

* ``"shapes-caption"``: ShapesWorld captioning; splits ``pretrain`` (the pre-training corpus),
  ``train`` (the downstream pool) and ``test``. Consistent with pre-training.
* ``"shapes-vqa"``: ShapesWorld VQA with 8 typed questions; splits ``train`` (the pool that
  low-resource splits are drawn from) and ``test``. Inconsistent with pre-training.
* ``"easy-vqa"``: the easy-VQA dataset read from the ``easy-vqa`` PyPI package; splits
  ``train`` and ``test``.

Real datasets (official files brought by the user, read from ``root=``, scored on features from a
feature store; see ``data/README.md``): ``"vqa-v2"``, ``"okvqa"``, ``"gqa"``, ``"coco-caption"``.

Images are referenced, not loaded: :func:`load_images` turns examples into pixels.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..eval import METRICS
from ..registry import Registry
from ..utils import repo_root
from .example import Example
from .readers import load_coco_captions, load_gqa, load_okvqa, load_vqa_v2
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


# ------------------------------------------------------------------------------ the registry
TASK_KINDS = ("vqa", "caption")
# Decoding budgets (max_new_tokens) when a registration gives none: VQA answers are a few words,
# captions a sentence.
DEFAULT_MAX_ANSWER_LENGTH = {"vqa": 8, "caption": 64}
_METRICS_OF_KIND = {"vqa": ("vqa", "exact"), "caption": ("cider",)}


@dataclass(frozen=True)
class TaskSpec:
    """What the trainer needs to know about a task, registered beside its loader.

    Attributes:
        name: the task's registered name.
        loader: ``fn(split, **options) -> list[Example]``.
        kind: ``"vqa"`` (a short answer per question) or ``"caption"`` (a sentence per image).
        metric: ``"vqa"`` (official VQA accuracy over the human answers), ``"exact"`` (exact match
            after the official normalisation) or ``"cider"`` (CIDEr-D, BLEU-4 also reported); see
            :func:`workbench.eval.evaluate`. VQA metrics are also reported per question type.
        splits: the split names the loader accepts.
        max_answer_length: the decoding budget in new tokens (the trainer decodes with
            ``max(RunConfig.max_new_tokens, max_answer_length)``).
        pool_split: the split low-resource (train, dev) splits are drawn from.
        test_split: the split a run is scored on.
        pool_size_option: the loader option that ``RunConfig.pool_size`` sets (``"n_scenes"`` for
            ShapesWorld), or None when the pool size is fixed by the data.
        needs_features: True for real datasets: their images come from a feature store
            (``task_options["features"]``), never from an embedded visual encoder.
        description: one line for listings (default: the loader's first docstring line).
    """

    name: str
    loader: Callable[..., list]
    kind: str = "vqa"
    metric: str = "vqa"
    splits: tuple[str, ...] = ("train", "test")
    max_answer_length: int = 8
    pool_split: str = "train"
    test_split: str = "test"
    pool_size_option: str | None = None
    needs_features: bool = False
    description: str = ""

    def __post_init__(self):
        problems = []
        if not callable(self.loader):
            problems.append(f"loader must be callable, got {self.loader!r}")
        if self.kind not in TASK_KINDS:
            problems.append(f"kind must be one of {list(TASK_KINDS)}, got {self.kind!r}")
        elif self.metric not in _METRICS_OF_KIND[self.kind]:
            problems.append(f"metric of a {self.kind!r} task must be one of {list(_METRICS_OF_KIND[self.kind])} "
                            f"(all metrics: {list(METRICS)}), got {self.metric!r}")
        if isinstance(self.splits, str) or not self.splits or not all(isinstance(s, str) for s in self.splits):
            problems.append(f"splits must be a non-empty tuple of str, got {self.splits!r}")
        else:
            object.__setattr__(self, "splits", tuple(self.splits))
            for field_name in ("pool_split", "test_split"):
                if getattr(self, field_name) not in self.splits:
                    problems.append(f"{field_name} {getattr(self, field_name)!r} is not one of splits "
                                    f"{list(self.splits)}")
        if isinstance(self.max_answer_length, bool) or not isinstance(self.max_answer_length, int) \
                or self.max_answer_length < 1:
            problems.append(f"max_answer_length must be a positive int, got {self.max_answer_length!r}")
        option = self.pool_size_option
        if option is not None and callable(self.loader) and not _accepts(self.loader, option):
            problems.append(f"pool_size_option {self.pool_size_option!r} is not an option of the loader "
                            f"(it accepts {self.options()})")
        if problems:
            raise ValueError(f"invalid TaskSpec {self.name!r}: " + "; ".join(problems))

    @property
    def has_pool_size(self) -> bool:
        """Whether ``RunConfig.pool_size`` applies (it sets :attr:`pool_size_option`)."""
        return self.pool_size_option is not None

    def options(self) -> list[str]:
        """The keyword options the loader accepts (besides ``split``)."""
        params = list(inspect.signature(self.loader).parameters.values())[1:]
        return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    def load(self, split: str, **options) -> list[Example]:
        """Check ``split`` and the option names, then call the loader."""
        if split not in self.splits:
            raise ValueError(f"task {self.name!r} has splits {list(self.splits)}, got {split!r}")
        unknown = [k for k in options if not _accepts(self.loader, k)]
        if unknown:
            raise ValueError(f"task {self.name!r} has no option(s) {unknown}; it accepts {self.options()}")
        return self.loader(split, **options)


def _accepts(fn, option: str) -> bool:
    params = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return True
    p = params.get(option)
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


TASKS: Registry[TaskSpec] = Registry("task")


def register_task(
    name: str,
    *,
    kind: str = "vqa",
    metric: str | None = None,
    splits: Sequence[str] = ("train", "test"),
    max_answer_length: int | None = None,
    pool_split: str = "train",
    test_split: str = "test",
    pool_size_option: str | None = None,
    needs_features: bool = False,
    description: str | None = None,
):
    """Decorator registering a loader ``fn(split, **options) -> list[Example]`` with its :class:`TaskSpec`.

    ``metric`` defaults to ``"vqa"`` for VQA tasks and ``"cider"`` for captioning;
    ``max_answer_length`` to 8 tokens (VQA) or 64 (captions). A name can be registered once
    (re-importing the defining module is allowed); :func:`unregister_task` frees it::

        @register_task("my-vqa", kind="vqa", metric="exact", splits=("train", "test"), needs_features=True)
        def load_my_vqa(split, root=None, limit=None) -> list[Example]:
            ...

    Raises:
        ValueError: an inconsistent spec (unknown kind or metric, a pool or test split not in
            ``splits``, ...) or a name already taken by another loader.
    """

    def add(fn):
        doc = (inspect.getdoc(fn) or "").strip().splitlines()
        spec = TaskSpec(
            name=name,
            loader=fn,
            kind=kind,
            metric=metric if metric is not None else ("cider" if kind == "caption" else "vqa"),
            splits=tuple(splits) if not isinstance(splits, str) else splits,
            max_answer_length=(DEFAULT_MAX_ANSWER_LENGTH.get(kind, 8) if max_answer_length is None
                               else max_answer_length),
            pool_split=pool_split,
            test_split=test_split,
            pool_size_option=pool_size_option,
            needs_features=needs_features,
            description=description if description is not None else (doc[0] if doc else ""),
        )
        TASKS.register(name, spec, source=fn)  # a re-imported module may register its loader again
        return fn

    return add


def unregister_task(name: str) -> TaskSpec:
    """Remove a task and return its spec (e.g. a test's throw-away task)."""
    return TASKS.unregister(name)


def get_task_spec(name: str) -> TaskSpec:
    """The :class:`TaskSpec` of a registered task.

    Raises:
        ValueError: unknown task; the message lists the registered ones.
    """
    return TASKS.get(name)


def list_tasks() -> list[str]:
    """Names accepted by :func:`load_task`, sorted."""
    return TASKS.names()


def load_task(name: str, split: str, **options) -> list[Example]:
    """Load a task split as a list of :class:`Example`.

    Args:
        name: one of :func:`list_tasks`.
        split: one of the task's ``splits`` (``get_task_spec(name).splits``).
        **options: the loader's options, e.g. ``n_scenes=2000`` (ShapesWorld: number of scenes;
            VQA uses one question per scene), ``world_seed=0``, ``prompt=...``, ``limit=`` (keep the
            first ``limit`` examples; easy-VQA and the real datasets), ``root=`` (real datasets:
            the folder of the official files).

    Raises:
        ValueError: unknown task (the message lists the registered ones), split or option.
        FileNotFoundError: a real dataset's folder or official file is missing (named).
    """
    return get_task_spec(name).load(split, **options)


def _check_split(task: str, split: str, allowed: Sequence[str]) -> None:
    if split not in allowed:
        raise ValueError(f"task {task!r} has splits {list(allowed)}, got {split!r}")


def _n_scenes(task, split, n_scenes):
    n = DEFAULT_SIZES[(task, split)] if n_scenes is None else n_scenes
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n_scenes must be a positive int, got {n_scenes!r}")
    return int(n)


@register_task("shapes-caption", kind="caption", metric="cider", splits=("pretrain", "train", "test"),
               max_answer_length=64, pool_size_option="n_scenes",
               description="ShapesWorld captioning (generated scenes; consistent with pre-training)")
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


# The current runs score shapes-vqa and easy-vqa with the official accuracy on one answer, which is
# exact match after normalisation: "exact" gives the same numbers.
@register_task("shapes-vqa", kind="vqa", metric="exact", splits=("train", "test"), max_answer_length=8,
               pool_size_option="n_scenes", description="ShapesWorld VQA with 8 question types (generated scenes)")
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


@register_task("easy-vqa", kind="vqa", metric="exact", splits=("train", "test"), max_answer_length=8,
               description="easy-VQA from its PyPI package (one coloured shape per image)")
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


# ------------------------------------------------------------------------------ real datasets
# Folders relative to the repository root (data/README.md names them); task_options["root"]
# points elsewhere. VQA v2 and OK-VQA follow the low-resource papers (VL-T5, MixPHM): the pool is
# the train2014 questions and the test split the val2014 questions.
REAL_DATA_FOLDERS = {"vqa-v2": "data/vqa_v2", "okvqa": "data/okvqa", "gqa": "data/gqa", "coco-caption": "data/coco"}
_COCO_SPLIT = {"train": "train2014", "test": "val2014"}
_GQA_FILE = {"train": "train", "val": "val", "test": "testdev"}


def _dataset_folder(task: str, root) -> tuple[Path, str]:
    """The folder of a real dataset and how to name it in errors (an option or the default)."""
    if root is None:
        return repo_root() / REAL_DATA_FOLDERS[task], f"the default folder {REAL_DATA_FOLDERS[task]}/"
    return Path(root).expanduser(), "task_options['root']"


def _official_files(task: str, split: str, root, names: Sequence[str]) -> list[Path]:
    """The official files of one split, or a FileNotFoundError naming the first missing one."""
    folder, how = _dataset_folder(task, root)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"task {task!r}: the dataset folder {folder} ({how}) does not exist. Put the official "
            f"file(s) {', '.join(map(repr, names))} for split {split!r} there; see data/README.md. "
            "Nothing is downloaded."
        )
    paths = [folder / n for n in names]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(
                f"task {task!r}, split {split!r}: the official file {path.name!r} is not in {folder} "
                f"({how}); see data/README.md for where each dataset's files go. Nothing is downloaded."
            )
    return paths


def _first(examples: list[Example], limit) -> list[Example]:
    if limit is None:
        return examples
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    return examples[: int(limit)]


@register_task("vqa-v2", kind="vqa", metric="vqa", splits=("train", "test"), needs_features=True,
               description="VQA v2 (pool: train2014 questions, test: val2014; 10 human answers)")
def _vqa_v2(split, root=None, prompt=VQA_PROMPT, image_id_format="{image_id}", type_field="answer_type",
            limit=None):
    """VQA v2: ``train`` reads the train2014 files, ``test`` the val2014 files (10 human answers each).

    Files in ``root`` (default ``data/vqa_v2``): ``v2_OpenEnded_mscoco_{split}2014_questions.json``
    and ``v2_mscoco_{split}2014_annotations.json``. Question types: ``answer_type`` (yes/no,
    number, other) by default, or ``type_field="question_type"``. ``limit`` keeps the first
    questions of the file.
    """
    _check_split("vqa-v2", split, tuple(_COCO_SPLIT))
    coco = _COCO_SPLIT[split]
    q, a = _official_files("vqa-v2", split, root, [f"v2_OpenEnded_mscoco_{coco}_questions.json",
                                                   f"v2_mscoco_{coco}_annotations.json"])
    return _first(load_vqa_v2(q, a, prompt=prompt, image_id_format=image_id_format, type_field=type_field), limit)


@register_task("okvqa", kind="vqa", metric="vqa", splits=("train", "test"), needs_features=True,
               description="OK-VQA (pool: train2014 questions, test: val2014; 10 answers)")
def _okvqa(split, root=None, prompt=VQA_PROMPT, image_id_format="{image_id}", type_field="question_type",
           limit=None):
    """OK-VQA: ``train`` reads the train2014 files, ``test`` the val2014 files (10 answers each).

    Files in ``root`` (default ``data/okvqa``): ``OpenEnded_mscoco_{split}2014_questions.json`` and
    ``mscoco_{split}2014_annotations.json``. Question types: the knowledge category.
    """
    _check_split("okvqa", split, tuple(_COCO_SPLIT))
    coco = _COCO_SPLIT[split]
    q, a = _official_files("okvqa", split, root, [f"OpenEnded_mscoco_{coco}_questions.json",
                                                  f"mscoco_{coco}_annotations.json"])
    return _first(load_okvqa(q, a, prompt=prompt, image_id_format=image_id_format, type_field=type_field), limit)


@register_task("gqa", kind="vqa", metric="exact", splits=("train", "val", "test"), needs_features=True,
               description="GQA balanced (pool: train_balanced, test: testdev_balanced; one answer)")
def _gqa(split, root=None, prompt=VQA_PROMPT, image_id_format="{image_id}", balanced_only=False, limit=None):
    """GQA (balanced questions): ``train``, ``val`` and ``test`` (= test-dev).

    ``train`` reads ``train_balanced_questions.json``, ``val`` ``val_balanced_questions.json`` and
    ``test`` ``testdev_balanced_questions.json`` (test-dev, the split GQA results are reported on).

    Files in ``root`` (default ``data/gqa``). One answer per question, scored by exact match per
    structural type (verify, query, choose, logical, compare).
    """
    _check_split("gqa", split, tuple(_GQA_FILE))
    (q,) = _official_files("gqa", split, root, [f"{_GQA_FILE[split]}_balanced_questions.json"])
    return _first(load_gqa(q, prompt=prompt, image_id_format=image_id_format, balanced_only=balanced_only), limit)


@register_task("coco-caption", kind="caption", metric="cider", splits=("train", "val", "test"), needs_features=True,
               description="COCO captions, Karpathy split (pool: train + restval, test: 5,000 images)")
def _coco_caption(split, root=None, prompt=CAPTION_PROMPT, image_id_format="{image_id}", limit=None):
    """COCO captions on the Karpathy split (``dataset_coco.json``): ``train``, ``val``, ``test``.

    ``train`` is Karpathy's train + restval (113,287 images), ``val`` and ``test`` 5,000 images
    each; about 5 captions per image (all are references, the first is the training target).

    File in ``root`` (default ``data/coco``). Scored with CIDEr-D (BLEU-4 also reported).
    """
    _check_split("coco-caption", split, ("train", "val", "test"))
    (path,) = _official_files("coco-caption", split, root, ["dataset_coco.json"])
    karpathy = ["train", "restval"] if split == "train" else split
    return _first(load_coco_captions(path, split=karpathy, prompt=prompt, image_id_format=image_id_format), limit)


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
