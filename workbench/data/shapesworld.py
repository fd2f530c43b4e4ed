"""ShapesWorld: the deterministic scene generator behind every embedded task.

A scene is a small RGB canvas with 1-4 objects placed in distinct cells of a 3x3 grid. Each
object has a shape, a colour and a size. From a scene we derive

* an image (``render``): pure NumPy rasterisation, so the same seed gives the same pixels on
  any machine (no anti-aliasing library, no font, no platform-dependent maths beyond IEEE
  comparisons);
* captions (``caption``): every object with its attributes and coarse position;
* typed questions with answers computed from the scene (``questions``).

Randomness comes from NumPy's legacy ``RandomState`` seeded with ``(world seed, split, index)``:
its stream is frozen by NumPy's compatibility policy, unlike ``Generator``'s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
    "cyan": (40, 200, 210),
    "white": (245, 245, 245),
}
SIZES = ("small", "large")
QUESTION_TYPES = (
    "exist",
    "count",
    "query_color",
    "query_shape",
    "query_size",
    "relate",
    "compare",
    "logic",
)
# The 3x3 grid's cells named as a caption would name them: (row, col) -> phrase.
POSITIONS = {
    (0, 0): "top left",
    (0, 1): "top",
    (0, 2): "top right",
    (1, 0): "left",
    (1, 1): "center",
    (1, 2): "right",
    (2, 0): "bottom left",
    (2, 1): "bottom",
    (2, 2): "bottom right",
}
NUMBER_WORDS = ("0", "1", "2", "3", "4")
ANSWER_VOCAB = ("yes", "no", *NUMBER_WORDS, *COLORS, *SHAPES, *SIZES)

# Split codes seed disjoint streams of scenes. Captioning and VQA use different pools so a
# downstream test scene is never a pre-training scene.
SPLITS = {
    "pretrain": 0,
    "vqa-train": 1,
    "vqa-test": 2,
    "caption-train": 3,
    "caption-test": 4,
}

_GRID = 3
_BACKGROUND = 40  # dark grey; white objects stay visible
_RADIUS = {"small": 0.22, "large": 0.36}  # fraction of a cell's size; with the jitter, objects never touch


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene: attributes plus its cell and jittered centre in pixels."""

    shape: str
    color: str
    size: str
    row: int
    col: int
    cx: float
    cy: float

    @property
    def position(self) -> str:
        return POSITIONS[(self.row, self.col)]

    def phrase(self) -> str:
        return f"{self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A ShapesWorld scene: its identity (split, index), its objects and its noise seed."""

    split: str
    index: int
    objects: tuple[ShapeObject, ...]
    noise_seed: int
    image_size: int

    @property
    def key(self) -> str:
        """The image id used by tasks and feature caches."""
        return f"{self.split}-{self.index}"


class ShapesWorld:
    """The scene generator.

    Args:
        seed: the world seed; the same seed gives the same scenes, pixels and text.
        image_size: canvas side in pixels (a multiple of 3 is not required).
        max_objects: 1..4 objects per scene.
        noise: amplitude of the background noise (0 turns it off).
        jitter: maximum shift of an object's centre inside its cell, as a fraction of a cell.

    Example:
        >>> world = ShapesWorld(seed=0)
        >>> scene = world.scene("vqa-train", 0)
        >>> image = world.render(scene)      # uint8 [64, 64, 3]
        >>> world.caption(scene)
        '...'
    """

    def __init__(
        self,
        seed: int = 0,
        image_size: int = 64,
        max_objects: int = 4,
        noise: int = 12,
        jitter: float = 0.08,
    ):
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if not 24 <= image_size <= 512:
            raise ValueError(f"image_size must be in [24, 512] pixels, got {image_size}")
        if not 1 <= max_objects <= 4:
            raise ValueError(f"max_objects must be in [1, 4], got {max_objects}")
        if noise < 0 or not 0 <= jitter < 0.2:
            raise ValueError(f"noise must be >= 0 and jitter in [0, 0.2), got {noise}, {jitter}")
        self.seed = int(seed)
        self.image_size = image_size
        self.max_objects = max_objects
        self.noise = noise
        self.jitter = jitter

    # ------------------------------------------------------------------ scenes
    def _rng(self, split: str, index: int, stream: int = 0) -> np.random.RandomState:
        if split not in SPLITS:
            raise ValueError(f"unknown ShapesWorld split {split!r}; known: {sorted(SPLITS)}")
        if index < 0:
            raise ValueError(f"scene index must be >= 0, got {index}")
        return np.random.RandomState([self.seed, SPLITS[split], int(index), stream])

    def scene(self, split: str, index: int) -> Scene:
        """The scene number ``index`` of ``split`` (a pure function of seed, split, index)."""
        rng = self._rng(split, index)
        n = int(rng.randint(1, self.max_objects + 1))
        cells = rng.choice(_GRID * _GRID, size=n, replace=False)
        cell = self.image_size / _GRID
        objects = []
        for c in sorted(int(c) for c in cells):  # reading order keeps captions canonical
            row, col = divmod(c, _GRID)
            dx, dy = rng.uniform(-self.jitter, self.jitter, size=2) * cell
            objects.append(
                ShapeObject(
                    shape=SHAPES[rng.randint(len(SHAPES))],
                    color=list(COLORS)[rng.randint(len(COLORS))],
                    size=SIZES[rng.randint(len(SIZES))],
                    row=row,
                    col=col,
                    cx=(col + 0.5) * cell + float(dx),
                    cy=(row + 0.5) * cell + float(dy),
                )
            )
        return Scene(split, int(index), tuple(objects), int(rng.randint(2**31 - 1)), self.image_size)

    def scenes(self, split: str, n: int, start: int = 0) -> Iterator[Scene]:
        """Scenes ``start .. start + n - 1`` of ``split``."""
        for i in range(start, start + n):
            yield self.scene(split, i)

    # --------------------------------------------------------------- rendering
    def render(self, scene: Scene) -> np.ndarray:
        """Rasterise a scene to a ``uint8`` array ``[H, W, 3]``."""
        s = scene.image_size
        rng = np.random.RandomState(scene.noise_seed)
        noise = rng.randint(-self.noise, self.noise + 1, size=(s, s, 1)) if self.noise else 0
        image = np.full((s, s, 3), _BACKGROUND, dtype=np.int16) + noise
        ys, xs = np.mgrid[0:s, 0:s].astype(np.float64) + 0.5  # pixel centres
        cell = s / _GRID
        for obj in scene.objects:
            mask = shape_mask(obj.shape, xs - obj.cx, ys - obj.cy, _RADIUS[obj.size] * cell)
            image[mask] = COLORS[obj.color]
        return np.clip(image, 0, 255).astype(np.uint8)

    # ---------------------------------------------------------------- captions
    def caption(self, scene: Scene, template: int | None = None) -> str:
        """A sentence naming every object with its size, colour, shape and position.

        ``template`` picks one of the surface forms (0-2); by default it is drawn from the
        scene's own stream so the corpus mixes them deterministically.
        """
        if template is None:
            template = int(self._rng(scene.split, scene.index, stream=1).randint(3))
        parts = [f"a {o.phrase()} at the {o.position}" for o in scene.objects]
        body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        if template == 0:
            return f"{body}."
        if template == 1:
            return f"there is {body}."
        if template == 2:
            return f"the image shows {body}."
        raise ValueError(f"template must be 0, 1 or 2, got {template}")

    # --------------------------------------------------------------- questions
    def questions(self, scene: Scene, n: int = 1, types: tuple[str, ...] | None = None):
        """Up to ``n`` typed questions about the scene, as ``(type, question, answer)``.

        Types are drawn uniformly from ``types`` (default: all of :data:`QUESTION_TYPES`);
        a type that the scene cannot support (e.g. ``relate`` with one object) is re-drawn.
        Yes/no questions are balanced by drawing the intended answer first.
        """
        if types is None:
            types = QUESTION_TYPES
        if isinstance(types, str) or not types:
            raise ValueError(f"types must be a non-empty list of question types from {QUESTION_TYPES}, got {types!r}")
        types = tuple(types)
        unknown = set(types) - set(QUESTION_TYPES)
        if unknown:
            raise ValueError(f"unknown question types {sorted(unknown)}; known: {QUESTION_TYPES}")
        rng = self._rng(scene.split, scene.index, stream=2)
        out, seen = [], set()
        for _ in range(20 * n):
            if len(out) == n:
                break
            qtype = types[rng.randint(len(types))]
            qa = _ASKERS[qtype](scene.objects, rng)
            if qa is not None and qa[0] not in seen:
                seen.add(qa[0])
                out.append((qtype, *qa))
        return out


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of a shape of 'radius' ``r`` centred at the origin of ``(dx, dy)``."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        half = r * 0.85  # equal-area-ish with the circle so size reads the same
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r * 1.15
    if shape == "triangle":  # apex up; base at +r*0.8
        top, bottom = -r, r * 0.8
        width = (dy - top) / (bottom - top) * r  # half width grows linearly from the apex
        return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= width)
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


# --------------------------------------------------------------------------- question makers
# Each takes the scene's objects and an rng and returns (question, answer) or None when the
# scene does not support that question type. Answers are computed from the objects only.


def _unique_ref(objs, obj):
    """The shortest phrase that singles ``obj`` out among ``objs`` (or None)."""
    for attrs in (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape")):
        key = tuple(getattr(obj, a) for a in attrs)
        if sum(tuple(getattr(o, a) for a in attrs) == key for o in objs) == 1:
            return " ".join(key)
    return None


def _yes_no(rng) -> bool:
    return bool(rng.randint(2))


def _ask_exist(objs, rng):
    if _yes_no(rng):
        o = objs[rng.randint(len(objs))]
        color, shape = o.color, o.shape
    else:
        present = {(o.color, o.shape) for o in objs}
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        color, shape = absent[rng.randint(len(absent))]
    answer = any(o.color == color and o.shape == shape for o in objs)
    return f"is there a {color} {shape}?", "yes" if answer else "no"


def _ask_count(objs, rng):
    # Ask mostly about attributes that are present, so answers are not dominated by "0".
    o = objs[rng.randint(len(objs))]
    if _yes_no(rng):
        shape = o.shape if rng.uniform() < 0.75 else SHAPES[rng.randint(len(SHAPES))]
        n = sum(p.shape == shape for p in objs)
        return f"how many {shape}s are there?", str(n)
    color = o.color if rng.uniform() < 0.75 else list(COLORS)[rng.randint(len(COLORS))]
    n = sum(p.color == color for p in objs)
    return f"how many {color} shapes are there?", str(n)


def _ask_query(attr):
    def ask(objs, rng):
        o = objs[rng.randint(len(objs))]
        if rng.randint(2):
            ref = f"the shape at the {o.position}"
        else:
            # Refer by the attributes other than the one asked about.
            other = [a for a in ("size", "color", "shape") if a != attr]
            key = tuple(getattr(o, a) for a in other)
            if sum(tuple(getattr(p, a) for a in other) == key for p in objs) != 1:
                ref = f"the shape at the {o.position}"
            else:
                words = [getattr(o, a) for a in other]
                ref = f"the {' '.join(words)}" if "shape" in other else f"the {' '.join(words)} shape"
        word = {"color": "color", "shape": "shape", "size": "size"}[attr]
        return f"what {word} is {ref}?", getattr(o, attr)

    return ask


_RELATIONS = {
    "left of": lambda a, b: a.col < b.col and a.row == b.row,
    "right of": lambda a, b: a.col > b.col and a.row == b.row,
    "above": lambda a, b: a.row < b.row and a.col == b.col,
    "below": lambda a, b: a.row > b.row and a.col == b.col,
}


def _ask_relate(objs, rng):
    if len(objs) < 2:
        return None
    options = []
    for ref in objs:
        phrase = _unique_ref(objs, ref)
        if phrase is None:
            continue
        for rel, holds in _RELATIONS.items():
            hits = [o for o in objs if o is not ref and holds(o, ref)]
            if len(hits) == 1:
                options.append((phrase, rel, hits[0]))
    if not options:
        return None
    phrase, rel, target = options[rng.randint(len(options))]
    attr = ("color", "shape")[rng.randint(2)]
    return f"what {attr} is the shape {rel} the {phrase}?", getattr(target, attr)


def _ask_compare(objs, rng):
    refs = [(o, _unique_ref(objs, o)) for o in objs]
    refs = [(o, p) for o, p in refs if p is not None]
    if len(refs) < 2:
        return None
    want = _yes_no(rng)
    candidates = [
        (a, b, attr)
        for i, (a, _) in enumerate(refs)
        for j, (b, _) in enumerate(refs)
        if i < j
        for attr in ("color", "shape", "size")
    ]
    # Prefer a pair whose answer is the drawn one, to balance yes and no.
    matching = [c for c in candidates if (getattr(c[0], c[2]) == getattr(c[1], c[2])) == want]
    pool = matching or candidates
    a, b, attr = pool[rng.randint(len(pool))]
    if rng.randint(2):
        a, b = b, a
    pa, pb = _unique_ref(objs, a), _unique_ref(objs, b)
    same = getattr(a, attr) == getattr(b, attr)
    return f"are the {pa} and the {pb} the same {attr}?", "yes" if same else "no"


def _ask_logic(objs, rng):
    op = ("or", "and")[rng.randint(2)]
    want = _yes_no(rng)

    def term():
        if rng.randint(2):
            o = objs[rng.randint(len(objs))]
            c, s = o.color, o.shape
        else:
            c, s = list(COLORS)[rng.randint(len(COLORS))], SHAPES[rng.randint(len(SHAPES))]
        return c, s, any(o.color == c and o.shape == s for o in objs)

    # Draw a few candidate pairs and keep the first with the intended answer (balance).
    for _ in range(8):
        (c1, s1, h1), (c2, s2, h2) = term(), term()
        if (c1, s1) == (c2, s2):
            continue
        answer = (h1 or h2) if op == "or" else (h1 and h2)
        if answer == want:
            break
    else:
        return None
    return f"is there a {c1} {s1} {op} a {c2} {s2}?", "yes" if answer else "no"


_ASKERS = {
    "exist": _ask_exist,
    "count": _ask_count,
    "query_color": _ask_query("color"),
    "query_shape": _ask_query("shape"),
    "query_size": _ask_query("size"),
    "relate": _ask_relate,
    "compare": _ask_compare,
    "logic": _ask_logic,
}


# --------------------------------------------------------------------------- caption checking
_PHRASE = re.compile(
    r"(small|large) (" + "|".join(COLORS) + r") (" + "|".join(SHAPES) + r") at the ("
    + "|".join(sorted(POSITIONS.values(), key=len, reverse=True)) + r")\b"
)


def parse_caption(text: str) -> list[tuple[str, str, str, str]]:
    """The ``(size, colour, shape, position)`` object phrases a caption mentions, in order."""
    return [m.groups() for m in _PHRASE.finditer(text.lower())]


def caption_correctness(text: str, scene: Scene) -> dict:
    """Does a generated caption describe ``scene``? Booleans at three levels of detail.

    * ``color_shape``: the multiset of (colour, shape) pairs equals the scene's (every object's
      colour and shape named, nothing invented);
    * ``attributes``: the same with sizes;
    * ``full``: the same with sizes and positions.
    """
    found = parse_caption(text)
    objs = [(o.size, o.color, o.shape, o.position) for o in scene.objects]

    def same(key):
        return sorted(key(f) for f in found) == sorted(key(o) for o in objs)

    return {
        "color_shape": same(lambda t: (t[1], t[2])),
        "attributes": same(lambda t: t[:3]),
        "full": same(lambda t: t),
    }
