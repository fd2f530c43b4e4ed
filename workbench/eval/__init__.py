"""Evaluation maths: the official VQA accuracy, exact match, CIDEr-D / BLEU-4, VQA soft scores.

Pure functions over strings and duck-typed examples (anything with ``id``, ``answers`` and
``question_type``): this package imports nothing else of the workbench, so any layer may use it.

:func:`evaluate` scores a list of predictions with one of :data:`METRICS`, the names a task's
``TaskSpec.metric`` uses:

* ``"vqa"``: the official VQA accuracy over the human answers (:func:`vqa_accuracy`), overall
  and per question type;
* ``"exact"``: exact match after the official normalisation (:func:`exact_match`), overall and
  per question type (with one answer per question it equals ``"vqa"``);
* ``"cider"``: corpus CIDEr-D (the ``"overall"`` number) with BLEU-4 also reported
  (:func:`caption_scores`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .captions import caption_scores, normalize_caption
from .vqa import (
    ARTICLES,
    CONTRACTIONS,
    NUMBER_WORDS,
    PUNCTUATION,
    SOFT_SCORE_TABLE,
    accuracy_by_type,
    answer_soft_scores,
    exact_match,
    normalize_answer,
    soft_score,
    vqa_accuracy,
)

METRICS = ("vqa", "exact", "cider")


def evaluate(predictions: Mapping[str, str] | Sequence[str], examples: Sequence, metric: str) -> dict:
    """Score predictions of a task with one of :data:`METRICS`.

    Args:
        predictions: ``{example id: text}`` or a list aligned with ``examples``.
        examples: the scored records (``id``, ``answers``, ``question_type``).
        metric: ``"vqa"``, ``"exact"`` or ``"cider"``.

    Returns:
        ``"vqa"`` / ``"exact"``: :func:`accuracy_by_type`'s ``{"overall", "per_type", "n",
        "n_per_type"}``. ``"cider"``: ``{"overall": CIDEr, "CIDEr", "BLEU-4", "per_type": {}}``.

    Raises:
        ValueError: unknown metric (the message lists :data:`METRICS`), or as the scorers.
    """
    if metric == "vqa":
        return accuracy_by_type(predictions, examples, metric=vqa_accuracy)
    if metric == "exact":
        return accuracy_by_type(predictions, examples, metric=exact_match)
    if metric == "cider":
        examples = list(examples)
        if isinstance(predictions, Mapping):
            missing = [e.id for e in examples if e.id not in predictions]
            if missing:
                raise ValueError(f"evaluate: {len(missing)} example(s) have no prediction, first ids: {missing[:5]}")
            preds = {e.id: predictions[e.id] for e in examples}
        else:
            predictions = list(predictions)
            if len(predictions) != len(examples):
                raise ValueError(f"evaluate: {len(predictions)} predictions for {len(examples)} examples")
            preds = {e.id: p for e, p in zip(examples, predictions)}
        scores = caption_scores(preds, {e.id: list(e.answers) for e in examples})
        return {"overall": scores["CIDEr"], **scores, "per_type": {}}
    raise ValueError(f"unknown metric {metric!r}; choose from {list(METRICS)}")


__all__ = [
    "ARTICLES",
    "CONTRACTIONS",
    "METRICS",
    "NUMBER_WORDS",
    "PUNCTUATION",
    "SOFT_SCORE_TABLE",
    "accuracy_by_type",
    "answer_soft_scores",
    "caption_scores",
    "evaluate",
    "exact_match",
    "normalize_answer",
    "normalize_caption",
    "soft_score",
    "vqa_accuracy",
]
