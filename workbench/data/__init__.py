"""Data layer: ShapesWorld, registered tasks (TaskSpec), low-resource splits, real-dataset readers, feature stores."""

from .example import Example
from .features import FeatureStore
from .readers import load_coco_captions, load_gqa, load_okvqa, load_vqa_v2
from .shapesworld import (
    ANSWER_VOCAB,
    COLORS,
    QUESTION_TYPES,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    ShapesWorld,
)
from .splits import SEEDS, SHOTS, low_resource_split
from .tasks import (
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

__all__ = [
    "ANSWER_VOCAB",
    "COLORS",
    "Example",
    "FeatureStore",
    "load_coco_captions",
    "load_gqa",
    "load_okvqa",
    "load_vqa_v2",
    "QUESTION_TYPES",
    "SEEDS",
    "SHAPES",
    "SHOTS",
    "SIZES",
    "Scene",
    "ShapeObject",
    "ShapesWorld",
    "TaskSpec",
    "get_task_spec",
    "list_tasks",
    "load_image",
    "load_images",
    "load_scene",
    "load_task",
    "low_resource_split",
    "register_task",
    "unregister_task",
]
