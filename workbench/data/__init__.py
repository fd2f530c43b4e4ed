"""Data layer: ShapesWorld, task loaders, low-resource splits, real-dataset readers, feature stores."""

from .example import Example
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
from .tasks import list_tasks, load_image, load_images, load_task, register_task

__all__ = [
    "ANSWER_VOCAB",
    "COLORS",
    "Example",
    "QUESTION_TYPES",
    "SEEDS",
    "SHAPES",
    "SHOTS",
    "SIZES",
    "Scene",
    "ShapeObject",
    "ShapesWorld",
    "list_tasks",
    "load_image",
    "load_images",
    "load_task",
    "low_resource_split",
    "register_task",
]
