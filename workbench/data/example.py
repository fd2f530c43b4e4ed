"""The one record type every task loader returns."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Example:
    """One (image, prompt, answers) item of a VQA or captioning task.

    Attributes:
        id: unique id of the example within its task (question id, caption id, ...).
        image_id: id of the image; the key into a feature store.
        prompt: the text fed to the encoder beside the visual tokens (e.g. ``"vqa: how many ...?"``).
        answers: the reference answers (10 human answers for VQA v2, one for ShapesWorld,
            several captions for captioning). The first one is the training target.
        question_type: the question's type, for per-type accuracy (``None`` for captions).
        image_ref: where the pixels come from: a file path, or a ``"shapesworld:..."`` key
            that :func:`workbench.data.load_image` renders on demand.
        meta: anything else a reader keeps (answer type, GQA structural type, ...).
    """

    id: str
    image_id: str
    prompt: str
    answers: tuple[str, ...]
    question_type: str | None = None
    image_ref: str | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def target(self) -> str:
        """The training target: the first reference answer."""
        return self.answers[0]
