"""Captioning scores: CIDEr-D and BLEU-4 with pycocoevalcap's scorers.

Captions go through pycocoevalcap's ``Cider`` (which is CIDEr-D: Gaussian length penalty,
clipped n-gram counts) and ``Bleu`` scorers on tokens produced by :func:`normalize_caption`
instead of the Java PTBTokenizer. This module imports nothing else of the workbench.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

_NON_WORD = re.compile(r"[^\w\s]|_")


def normalize_caption(s: str) -> str:
    """Tokenise a caption for scoring: lower-case, punctuation removed, single spaces.

    A Java-free stand-in for the PTBTokenizer that pycocoevalcap normally uses: every character
    that is neither a letter, a digit nor whitespace becomes a space (so ``"dog's"`` gives the
    tokens ``dog s``).

    Args:
        s: a caption.

    Returns:
        The space-joined tokens.

    Raises:
        TypeError: if ``s`` is not a string.
    """
    if not isinstance(s, str):
        raise TypeError(f"normalize_caption expects a str, got {type(s).__name__}: {s!r}")
    return " ".join(_NON_WORD.sub(" ", s.lower()).split())


def caption_scores(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict:
    """Corpus CIDEr-D and BLEU-4 of generated captions, with pycocoevalcap's scorers.

    Both texts are tokenised by :func:`normalize_caption`. CIDEr is a corpus-level score (its
    IDF weights come from the references of all images), so it is only meaningful over many
    images; with a single image it is 0. Scales are pycocoevalcap's: CIDEr roughly in
    [0, 10] (x10 inside the scorer), BLEU-4 in [0, 1].

    Args:
        predictions: ``{image or example id: generated caption}``.
        references: ``{same id: list of reference captions}``; the ids must match those of
            ``predictions`` exactly.

    Returns:
        ``{"CIDEr": float, "BLEU-4": float}``.

    Raises:
        TypeError: if the arguments are not mappings of str / sequences of str.
        ValueError: if there is nothing to score, ids differ, or an id has no reference.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if not isinstance(predictions, Mapping) or not isinstance(references, Mapping):
        raise TypeError("caption_scores: predictions and references must be dicts keyed by id")
    if not predictions:
        raise ValueError("caption_scores: no predictions to score")
    missing_refs = [k for k in predictions if k not in references]
    missing_preds = [k for k in references if k not in predictions]
    if missing_refs or missing_preds:
        raise ValueError(
            "caption_scores: predictions and references must have the same ids; "
            f"without references: {missing_refs[:5]}, without prediction: {missing_preds[:5]}"
        )
    gts, res = {}, {}
    for key, pred in predictions.items():
        refs = references[key]
        if not isinstance(pred, str):
            raise TypeError(f"caption_scores: prediction for {key!r} must be a str, got {pred!r}")
        if isinstance(refs, str) or not isinstance(refs, Sequence):
            raise TypeError(
                f"caption_scores: references for {key!r} must be a list of str, got {refs!r}"
            )
        if len(refs) == 0:
            raise ValueError(f"caption_scores: id {key!r} has no reference caption")
        for r in refs:
            if not isinstance(r, str):
                raise TypeError(f"caption_scores: a reference of {key!r} is not a str: {r!r}")
        res[key] = [normalize_caption(pred)]
        gts[key] = [normalize_caption(r) for r in refs]
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"CIDEr": float(cider), "BLEU-4": float(bleu[3])}
