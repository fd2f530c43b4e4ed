"""VQA scores: the official VQA accuracy and its answer normalisation, exact match, per-type means.

The normalisation reimplements the official evaluation script of the VQA API
(``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` in GT-Vision-Lab/VQA) behaviour for
behaviour, quirks included, so that numbers are comparable with published VQA v2 / OK-VQA
results. The quirks worth knowing (all reproduced on purpose):

* punctuation is handled *before* lower-casing and contraction lookup, so a straight apostrophe
  never survives: ``"can't"`` becomes ``"can t"`` while ``"cant"`` becomes ``"can't"``;
* most contraction expansions use the typographic apostrophe U+2019 (``"dont"`` ->
  ``"don’t"``), a few the straight one (``"cant"`` -> ``"can't"``), exactly as the table does;
* the capitalised keys of the table (``"Im"``, ``"Ive"``, ``"Id’ve"``) never match because
  words are lower-cased first: ``"ive"`` stays ``"ive"``;
* a comma between two digits anywhere in the answer switches every punctuation mark to
  deletion instead of replacement by a space: ``"1,000"`` -> ``"1000"`` (the number is kept in
  one piece), ``"1,000 cats!"`` -> ``"1000 cats!"`` (``!`` is not in the punctuation list);
* a period is removed unless a digit follows it (the official look-behind is mistyped as a
  look-ahead, so the preceding character is never checked): ``"3.5"`` is kept, ``"3."`` ->
  ``"3"``, ``"end."`` -> ``"end"``.

Pure functions of strings: this module imports nothing else of the workbench. Examples are
duck-typed (anything with ``id``, ``answers`` and ``question_type``, such as
``workbench.data.Example``).
"""


from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

# --------------------------------------------------------------------------------------------
# Official VQA normalisation tables (vqaEval.py). The contraction table is kept character for
# character, including its typographic apostrophes (U+2019) and its unreachable keys.
# --------------------------------------------------------------------------------------------

CONTRACTIONS: dict[str, str] = {
    'Id’ve': 'I’d’ve', 'Im': 'I’m', 'Ive': 'I’ve', 'I’dve': 'I’d’ve', 'aint': "ain't",
    'arent': "aren't", 'cant': "can't", "couldn'tve": 'couldn’t’ve', 'couldnt': "couldn't",
    'couldnt’ve': 'couldn’t’ve', 'couldve': "could've", 'didnt': 'didn’t', 'doesnt': 'doesn’t',
    'dont': 'don’t', "hadn'tve": 'hadn’t’ve', 'hadnt': 'hadn’t', 'hadnt’ve': 'hadn’t’ve',
    'hasnt': 'hasn’t', 'havent': 'haven’t', 'hed': 'he’d', 'hed’ve': 'he’d’ve', 'hes': 'he’s',
    'he’dve': 'he’d’ve', 'howd': 'how’d', 'howll': 'how’ll', 'hows': 'how’s', 'isnt': 'isn’t',
    'itd': 'it’d', 'itd’ve': 'it’d’ve', 'itll': 'it’ll', 'it’dve': 'it’d’ve', 'let’s': 'let’s',
    'maam': 'ma’am', 'mightnt': 'mightn’t', 'mightnt’ve': 'mightn’t’ve',
    'mightn’tve': 'mightn’t’ve', 'mightve': 'might’ve', 'mustnt': 'mustn’t',
    'mustve': 'must’ve', 'neednt': 'needn’t', 'notve': 'not’ve', 'oclock': 'o’clock',
    'oughtnt': 'oughtn’t', 'ow’s’at': '’ow’s’at', 'shant': 'shan’t', 'shed’ve': 'she’d’ve',
    'she’dve': 'she’d’ve', 'she’s': 'she’s', 'shouldnt': 'shouldn’t',
    'shouldnt’ve': 'shouldn’t’ve', 'shouldn’tve': 'shouldn’t’ve', 'shouldve': 'should’ve',
    'somebodyd’ve': 'somebody’d’ve', 'somebodyll': 'somebody’ll', 'somebodys': 'somebody’s',
    'somebody’d': 'somebodyd', 'somebody’dve': 'somebody’d’ve', 'someoned': 'someone’d',
    'someoned’ve': 'someone’d’ve', 'someonell': 'someone’ll', 'someones': 'someone’s',
    'someone’dve': 'someone’d’ve', 'somethingd': 'something’d',
    'somethingd’ve': 'something’d’ve', 'somethingll': 'something’ll',
    'something’dve': 'something’d’ve', 'thats': 'that’s', 'thered': 'there’d',
    'thered’ve': 'there’d’ve', 'therere': 'there’re', 'theres': 'there’s',
    'there’dve': 'there’d’ve', 'theyd': 'they’d', 'theyd’ve': 'they’d’ve', 'theyll': 'they’ll',
    'theyre': 'they’re', 'theyve': 'they’ve', 'they’dve': 'they’d’ve', 'twas': '’twas',
    'wasnt': 'wasn’t', 'wed’ve': 'we’d’ve', 'werent': 'weren’t', 'weve': "we've",
    'we’dve': 'we’d’ve', 'whatll': 'what’ll', 'whatre': 'what’re', 'whats': 'what’s',
    'whatve': 'what’ve', 'whens': 'when’s', 'whered': 'where’d', 'wheres': "where's",
    'whereve': 'where’ve', 'whod': 'who’d', 'whod’ve': 'who’d’ve', 'wholl': 'who’ll',
    'whos': 'who’s', 'whove': "who've", 'who’dve': 'who’d’ve', 'whyll': 'why’ll',
    'whyre': 'why’re', 'whys': 'why’s', 'wont': 'won’t', 'wouldnt': 'wouldn’t',
    'wouldnt’ve': 'wouldn’t’ve', 'wouldn’tve': 'wouldn’t’ve', 'wouldve': 'would’ve',
    'yall': 'y’all', 'yall’d’ve': 'y’all’d’ve', 'yall’ll': 'y’all’ll', 'youd': 'you’d',
    'youd’ve': 'you’d’ve', 'youll': 'you’ll', 'youre': 'you’re', 'youve': 'you’ve',
    'you’dve': 'you’d’ve', 'y’alld’ve': 'y’all’d’ve', 'y’allll': 'y’all’ll',
    'y’all’dve': 'y’all’d’ve', '’ows’at': '’ow’s’at', '’ow’sat': '’ow’s’at',
}

NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# Marks that are deleted or replaced by a space. Note that "." "!" "-" "&" "*" are not in the
# list: periods have their own rule, the others are kept.
PUNCTUATION: tuple[str, ...] = (
    ";", ":", "/", "'", "[", "]", '"', "(", ")", "=", "+", "\\", "_", ">", "<", "@", "`", ",", "?",
)

# A comma between two digits ("1,000"): if present, punctuation is deleted, not spaced.
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
# A period not followed by a digit (the official periodStrip, whose look-behind is inert).
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def _process_punctuation(text: str) -> str:
    """The official ``processPunctuation`` step (no lower-casing, no word mapping)."""
    delete_all = _DIGIT_COMMA.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        # The conditions look at the *input* text, as the official code does.
        if delete_all or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    # The official code passes re.UNICODE as the `count` argument of re.sub, which caps the
    # number of removed periods at 32; no real answer has that many, so all are removed here.
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _process_digit_article(text: str) -> str:
    """The official ``processDigitArticle`` step: lower-case, numbers, articles, contractions."""
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(s: str) -> str:
    """Normalise a VQA answer exactly as the official VQA evaluation does.

    Steps, in the official order: newlines and tabs become spaces and the ends are stripped;
    punctuation marks are replaced by a space, or deleted when they touch a space or when the
    answer contains a comma between two digits; periods not followed by a digit are removed;
    then the text is lower-cased and split on whitespace, number words ``"none"``, ``"zero"``
    .. ``"ten"`` become digits, the articles a/an/the are dropped and the official contraction
    table is applied word by word. See the module docstring for the quirks this reproduces.

    Args:
        s: a predicted or ground-truth answer.

    Returns:
        The normalised answer (words joined by single spaces; possibly empty).

    Raises:
        TypeError: if ``s`` is not a string.

    Examples:
        >>> normalize_answer("Two dogs.")
        '2 dogs'
        >>> normalize_answer("1,000")
        '1000'
    """
    if not isinstance(s, str):
        raise TypeError(f"normalize_answer expects a str, got {type(s).__name__}: {s!r}")
    s = s.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(s))


def _check_answers(prediction, answers, fn: str) -> list[str]:
    if not isinstance(prediction, str):
        raise TypeError(f"{fn}: prediction must be a str, got {type(prediction).__name__}")
    if isinstance(answers, str) or not isinstance(answers, Sequence):
        raise TypeError(
            f"{fn}: answers must be a list or tuple of str (not a single str), "
            f"got {type(answers).__name__}: {answers!r}"
        )
    if len(answers) == 0:
        raise ValueError(
            f"{fn}: no reference answers (an unannotated split, e.g. the VQA v2 test split, "
            "cannot be scored)"
        )
    for i, answer in enumerate(answers):
        if not isinstance(answer, str):
            raise TypeError(f"{fn}: answers[{i}] must be a str, got {type(answer).__name__}")
    return list(answers)


def vqa_accuracy(
    prediction: str, answers: Sequence[str], official_references: bool = False
) -> float:
    """The official VQA accuracy of one prediction against the human answers.

    With ``n`` reference answers (10 for VQA v2 and OK-VQA), each human is left out in turn and
    the prediction scores ``min(1, matches among the other n - 1 answers / t)``; the ``n``
    scores are averaged. For ``n >= 4`` the threshold is the official ``t = 3`` (so with 10
    answers: 0 matches -> 0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, 4 or more -> 1). For fewer answers
    ``t = min(3, n - 1)`` so that a perfect score stays reachable: with ``n = 2`` or ``3`` a
    prediction gets full credit from the left-out rounds in which it matches one (``n = 2``)
    or two (``n = 3``) of the others, e.g. ``["red", "blue"]`` scores 0.5 for ``"red"``.
    With a single answer (``n = 1``: ShapesWorld, easy-VQA, GQA) it is exact match after
    normalisation. Order of ``answers`` does not matter.

    Args:
        prediction: the predicted answer (raw text; normalised here).
        answers: the reference answers, e.g. ``Example.answers`` (the 10 human answers of a VQA
            v2 question, or one answer).
        official_references: normalisation of the references. ``False`` (default) applies
            :func:`normalize_answer` to the prediction and to every reference. ``True``
            reproduces the official script literally: the references only get the punctuation
            step, and only when they are not all identical (the released VQA annotations are
            already normalised); use it to reproduce leaderboard numbers to the last digit.
            The two agree whenever the references are already in normalised form.

    Returns:
        The accuracy, in [0, 1].

    Raises:
        TypeError: if ``prediction`` is not a str or ``answers`` is not a sequence of str.
        ValueError: if ``answers`` is empty.
    """
    refs = _check_answers(prediction, answers, "vqa_accuracy")
    pred = normalize_answer(prediction)
    if official_references:
        if len(set(refs)) > 1:
            refs = [_process_punctuation(r) for r in refs]
    else:
        refs = [normalize_answer(r) for r in refs]
    n = len(refs)
    if n == 1:
        return float(pred == refs[0])
    threshold = min(3, n - 1)
    matches = [r == pred for r in refs]
    total = sum(matches)
    scores = [min(1.0, (total - int(m)) / threshold) for m in matches]
    return sum(scores) / n


def exact_match(prediction: str, answers: Sequence[str], normalize: bool = True) -> float:
    """1.0 if the prediction equals any reference answer, else 0.0.

    Args:
        prediction: the predicted answer.
        answers: the reference answers (``Example.answers``); one for GQA.
        normalize: compare after :func:`normalize_answer` on both sides (default) or verbatim.

    Returns:
        1.0 or 0.0.

    Raises:
        TypeError: if ``prediction`` is not a str or ``answers`` is not a sequence of str.
        ValueError: if ``answers`` is empty.
    """
    refs = _check_answers(prediction, answers, "exact_match")
    if normalize:
        prediction = normalize_answer(prediction)
        refs = [normalize_answer(r) for r in refs]
    return float(prediction in refs)


def accuracy_by_type(
    predictions: Mapping[str, str] | Sequence[str],
    examples: Sequence,
    metric: Callable[[str, Sequence[str]], float] = vqa_accuracy,
) -> dict:
    """Mean accuracy over examples, overall and per question type.

    Args:
        predictions: the predicted answers, either a mapping from ``Example.id`` to text (extra
            ids are ignored) or a sequence aligned with ``examples``.
        examples: the records scored (``workbench.data.Example`` or anything with ``id``,
            ``answers`` and ``question_type``); each needs at least one reference answer.
            Examples whose ``question_type`` is None are grouped under ``"untyped"``.
        metric: the per-example score, :func:`vqa_accuracy` (default) or :func:`exact_match`
            (GQA).

    Returns:
        ``{"overall": float, "per_type": {type: float}, "n": int, "n_per_type": {type: int}}``,
        accuracies in [0, 1], types sorted by name.

    Raises:
        TypeError: if ``predictions`` is neither a mapping nor a sequence.
        ValueError: if ``examples`` is empty, lengths differ, a prediction is missing or an
            example has no reference answer.
    """
    examples = list(examples)
    if not examples:
        raise ValueError("accuracy_by_type: no examples to score")
    if isinstance(predictions, Mapping):
        missing = [ex.id for ex in examples if ex.id not in predictions]
        if missing:
            raise ValueError(
                f"accuracy_by_type: {len(missing)} example(s) have no prediction, "
                f"first ids: {missing[:5]}"
            )
        preds = [predictions[ex.id] for ex in examples]
    elif isinstance(predictions, Sequence) and not isinstance(predictions, str):
        if len(predictions) != len(examples):
            raise ValueError(
                f"accuracy_by_type: {len(predictions)} predictions for {len(examples)} examples"
            )
        preds = list(predictions)
    else:
        raise TypeError(
            "accuracy_by_type: predictions must be a dict {example id: answer} or a list "
            f"aligned with examples, got {type(predictions).__name__}"
        )

    per_type: dict[str, list[float]] = {}
    scores = []
    for ex, pred in zip(examples, preds):
        if not ex.answers:
            raise ValueError(
                f"accuracy_by_type: example {ex.id!r} has no reference answer "
                "(unannotated split?)"
            )
        score = metric(pred, ex.answers)
        scores.append(score)
        qtype = getattr(ex, "question_type", None)
        qtype = qtype if qtype is not None else "untyped"
        per_type.setdefault(qtype, []).append(score)
    return {
        "overall": sum(scores) / len(scores),
        "per_type": {t: sum(v) / len(v) for t, v in sorted(per_type.items())},
        "n": len(scores),
        "n_per_type": {t: len(v) for t, v in sorted(per_type.items())},
    }


# --------------------------------------------------------------------------------------------
# Soft scores: the training targets of the official VL-T5 / MixPHM VQA code
# --------------------------------------------------------------------------------------------

# The score of an answer given by k of the 10 humans, as in the bottom-up-attention / LXMERT
# preprocessing (``get_score``) whose labels VL-T5 and MixPHM train on. It is the official
# accuracy rounded per count (0.3 for one human, not 1/3), so it is kept as a table.
SOFT_SCORE_TABLE: tuple[float, ...] = (0.0, 0.3, 0.6, 0.9, 1.0)


def soft_score(count: int) -> float:
    """The VQA soft score of an answer that ``count`` humans gave: 0, 0.3, 0.6, 0.9, then 1."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"soft_score: count must be a non-negative int, got {count!r}")
    return SOFT_SCORE_TABLE[min(count, len(SOFT_SCORE_TABLE) - 1)]


def answer_soft_scores(answers: Sequence[str]) -> list[tuple[str, float]]:
    """The distinct answers of a question with their soft scores (:func:`soft_score` of their count).

    Answers are grouped by :func:`normalize_answer` (``"Two"`` and ``"2"`` are one answer); each
    group is represented by its first raw spelling in ``answers`` and listed in order of first
    appearance (the readers put the ``multiple_choice_answer`` first, so it leads the list).
    Sampling a training target in proportion to these scores is what the official VL-T5 / MixPHM
    VQA code does each time an example is used.

    Args:
        answers: the human answers of one question (10 for VQA v2 / OK-VQA).

    Returns:
        ``[(answer, score), ...]``, one entry per distinct normalised answer.

    Raises:
        TypeError / ValueError: as :func:`vqa_accuracy` (not a sequence of str, or empty).
    """
    refs = _check_answers("", answers, "answer_soft_scores")
    first: dict[str, str] = {}
    counts: dict[str, int] = {}
    for raw in refs:
        key = normalize_answer(raw)
        first.setdefault(key, raw)
        counts[key] = counts.get(key, 0) + 1
    return [(first[key], soft_score(counts[key])) for key in first]
