"""Readers for the official file formats of the real datasets (VQA v2, OK-VQA, GQA, COCO).

Every reader returns a ``list[Example]`` (see :mod:`workbench.data.example`). Nothing is ever
downloaded: the user puts the official files where ``data/README.md`` (section "Real datasets")
says, and passes their paths. A missing file raises :class:`FileNotFoundError` naming the
official file expected; a malformed file raises :class:`ValueError` naming the file and the
offending record and field.

Conventions shared by all readers:

* ``Example.id`` and ``Example.image_id`` are strings. ``image_id`` is
  ``image_id_format.format(image_id=<id from the file>, split=<COCO folder>)`` (default
  ``"{image_id}"``), so that it can be made to match the keys of a feature store, e.g.
  ``"COCO_val2014_{image_id:012d}"`` (VQA / COCO ids are ints in the files). ``{split}`` is the
  COCO image folder (``train2014``, ``val2014``, ...): for VQA v2 / OK-VQA and official COCO
  files the split in the file name, for Karpathy's file each image's ``filepath``; so
  ``"COCO_{split}_{image_id:012d}"`` matches VL-T5's feature keys whatever the split.
* VQA v2 / OK-VQA: ``answers`` holds the human answers of the annotation file, every one of
  them exactly once (10 per question), reordered so that ``answers[0]`` (``Example.target``,
  the training target) is the ``multiple_choice_answer``. Order does not matter to
  :func:`workbench.eval.vqa_accuracy`, so ``vqa_accuracy(pred, ex.answers)`` is the
  official accuracy. The raw ``multiple_choice_answer`` is also kept in
  ``meta["multiple_choice_answer"]``.
* Files without answers (VQA v2 test questions, GQA test / challenge) give examples with
  ``answers == ()``; such examples can be predicted but not scored or trained on.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from workbench.data.example import Example

_README = "data/README.md, section 'Real datasets'"


# --------------------------------------------------------------------------------------------
# Small helpers: file loading and field access with clear errors
# --------------------------------------------------------------------------------------------


def _guess_split(name: str, splits: tuple[str, ...], default: str) -> str:
    """The first of ``splits`` that appears in a file name, else ``default``."""
    for split in splits:
        if split in name:
            return split
    return default


def _missing_file(path: Path, what: str, expected: str, pattern: str, folder: str):
    return FileNotFoundError(
        f"{what} not found: {path}. Expected the official file {expected!r} "
        f"(named {pattern}) in {folder}/; see {_README} for where to put it. "
        "Nothing is downloaded."
    )


def _read_json(path, what: str, expected: str, pattern: str, folder: str):
    """Load a JSON file, turning a missing file or a syntax error into a clear message."""
    path = Path(path)
    if not path.is_file():
        raise _missing_file(path, what, expected, pattern, folder)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({what}): {e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({what}): {e}") from None


def _field(record, key: str, where: str, path, types=None):
    """``record[key]``, or a ValueError naming the record, the field and the file."""
    if not isinstance(record, dict):
        raise ValueError(f"{where} is not a JSON object but {type(record).__name__} (in {path})")
    if key not in record:
        raise ValueError(f"{where} has no field {key!r} (in {path})")
    value = record[key]
    if types is not None and (not isinstance(value, types) or isinstance(value, bool)):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise ValueError(
            f"{where} field {key!r} must be {names}, got {type(value).__name__} "
            f"{value!r:.60} (in {path})"
        )
    return value


def _list_field(data, key: str, path) -> list:
    value = _field(data, key, "the top-level object", path, list)
    return value


def _check_prompt(prompt: str) -> None:
    if not isinstance(prompt, str) or "{question}" not in prompt:
        raise ValueError(f"prompt must be a str containing '{{question}}', got {prompt!r}")


def _format_image_id(image_id_format: str, image_id, where: str, path, split: str | None = None) -> str:
    try:
        if split is None:
            return image_id_format.format(image_id=image_id)
        return image_id_format.format(image_id=image_id, split=split)
    except (ValueError, KeyError, IndexError) as e:
        raise ValueError(
            f"image_id_format {image_id_format!r} cannot format image id {image_id!r} of "
            f"{where} (in {path}): {e}"
        ) from None


# --------------------------------------------------------------------------------------------
# VQA v2 and OK-VQA (the same two-file format)
# --------------------------------------------------------------------------------------------

_VQA_SPLITS = ("test-dev2015", "test2015", "train2014", "val2014")


def _answer_order(answers: list[str], mc_answer: str) -> list[int]:
    """Indices of the human answers: multiple-choice answer first, then by decreasing frequency.

    Sort key: verbatim equal to ``mc_answer`` first, then equal after lower-casing and
    stripping, then the rest; within a group, more frequent answers first; ties keep file
    order. Only the order changes: every answer is kept exactly once.
    """
    loose = [a.strip().lower() for a in answers]
    mc_loose = mc_answer.strip().lower()
    counts = Counter(loose)

    def key(i: int):
        group = 0 if answers[i] == mc_answer else 1 if loose[i] == mc_loose else 2
        return (group, -counts[loose[i]], i)

    return sorted(range(len(answers)), key=key)


def _load_vqa_pair(
    questions_path,
    annotations_path,
    prompt: str,
    image_id_format: str,
    type_field: str,
    dataset: str,
    folder: str,
    prefix: str,
) -> list[Example]:
    """Shared reader of the VQA two-file format (``prefix`` is ``"v2_"`` or ``""``)."""
    _check_prompt(prompt)
    if type_field not in ("answer_type", "question_type"):
        raise ValueError(f"type_field must be 'answer_type' or 'question_type', got {type_field!r}")

    questions_path = Path(questions_path)
    split = _guess_split(questions_path.name, _VQA_SPLITS, "val2014")
    q_pattern = f"{prefix}OpenEnded_mscoco_{{split}}_questions.json"
    data = _read_json(
        questions_path,
        f"{dataset} questions file",
        q_pattern.format(split=split),
        q_pattern,
        folder,
    )
    questions = _list_field(data, "questions", questions_path)

    by_id: dict[str, dict] = {}
    for i, q in enumerate(questions):
        where = f"questions[{i}]"
        qid = str(_field(q, "question_id", where, questions_path, (int, str)))
        if qid in by_id:
            raise ValueError(f"{where}: duplicate question_id {qid} (in {questions_path})")
        by_id[qid] = {
            "image_id": _field(q, "image_id", where, questions_path, (int, str)),
            "question": _field(q, "question", where, questions_path, str),
            "index": i,
        }

    annotations: dict[str, dict] = {}
    if annotations_path is not None:
        annotations_path = Path(annotations_path)
        a_split = _guess_split(annotations_path.name, _VQA_SPLITS, split)
        a_pattern = f"{prefix}mscoco_{{split}}_annotations.json"
        adata = _read_json(
            annotations_path,
            f"{dataset} annotations file",
            a_pattern.format(split=a_split),
            a_pattern,
            folder,
        )
        for i, ann in enumerate(_list_field(adata, "annotations", annotations_path)):
            where = f"annotations[{i}]"
            qid = str(_field(ann, "question_id", where, annotations_path, (int, str)))
            if qid not in by_id:
                raise ValueError(
                    f"{where}: question_id {qid} has no question in {questions_path} "
                    f"(annotations file {annotations_path}); are the two files of the same split?"
                )
            if qid in annotations:
                raise ValueError(f"{where}: duplicate question_id {qid} (in {annotations_path})")
            image_id = _field(ann, "image_id", where, annotations_path, (int, str))
            if str(image_id) != str(by_id[qid]["image_id"]):
                raise ValueError(
                    f"{where}: question_id {qid} has image_id {image_id} but its question has "
                    f"image_id {by_id[qid]['image_id']} (in {annotations_path})"
                )
            raw_answers = _field(ann, "answers", where, annotations_path, list)
            if not raw_answers:
                raise ValueError(f"{where} field 'answers' is empty (in {annotations_path})")
            answers, confidences = [], []
            for j, a in enumerate(raw_answers):
                answers.append(_field(a, "answer", f"{where}.answers[{j}]", annotations_path, str))
                confidences.append(a.get("answer_confidence"))
            annotations[qid] = {
                "answers": answers,
                "confidences": confidences,
                "mc": _field(ann, "multiple_choice_answer", where, annotations_path, str),
                "question_type": _field(ann, "question_type", where, annotations_path, str),
                "answer_type": _field(ann, "answer_type", where, annotations_path, str),
            }
        unanswered = [qid for qid in by_id if qid not in annotations]
        if unanswered:
            raise ValueError(
                f"{len(unanswered)} question(s) of {questions_path} have no annotation in "
                f"{annotations_path} (first question_ids: {unanswered[:5]}); "
                "are the two files of the same split?"
            )

    examples = []
    for qid, q in by_id.items():
        where = f"questions[{q['index']}]"
        meta = {"dataset": dataset, "question": q["question"]}
        answers: tuple[str, ...] = ()
        qtype = None
        ann = annotations.get(qid)
        if ann is not None:
            order = _answer_order(ann["answers"], ann["mc"])
            answers = tuple(ann["answers"][i] for i in order)
            qtype = ann[type_field]
            meta.update(
                multiple_choice_answer=ann["mc"],
                question_type=ann["question_type"],
                answer_type=ann["answer_type"],
                answer_confidence=tuple(ann["confidences"][i] for i in order),
            )
        examples.append(
            Example(
                id=qid,
                image_id=_format_image_id(image_id_format, q["image_id"], where, questions_path, split),
                prompt=prompt.format(question=q["question"]),
                answers=answers,
                question_type=qtype,
                meta=meta,
            )
        )
    return examples


def load_vqa_v2(
    questions_path,
    annotations_path=None,
    prompt: str = "vqa: {question}",
    image_id_format: str = "{image_id}",
    type_field: str = "answer_type",
) -> list[Example]:
    """Read VQA v2 from its official question and annotation files.

    Args:
        questions_path: ``v2_OpenEnded_mscoco_{split}_questions.json`` (split ``train2014``,
            ``val2014``, ``test2015`` or ``test-dev2015``).
        annotations_path: ``v2_mscoco_{split}_annotations.json``, or None (the test splits have
            none): the examples then have empty ``answers`` and ``question_type`` None.
        prompt: the encoder text, formatted with ``question=``.
        image_id_format: how the integer image id becomes ``Example.image_id`` (the feature
            store key), e.g. ``"COCO_val2014_{image_id:012d}"``; ``{split}`` is the file's split
            (``"COCO_{split}_{image_id:012d}"``).
        type_field: the annotation field used as ``Example.question_type``: ``"answer_type"``
            (``yes/no``, ``number``, ``other``; default) or ``"question_type"`` (the 65 question
            prefixes such as ``"what color is the"``).

    Returns:
        One :class:`Example` per question, in the order of the questions file, with
        ``id = str(question_id)``; ``answers`` = the 10 human answers, each exactly once, ordered
        with the ``multiple_choice_answer`` first (so ``target`` is the training target) then by
        decreasing frequency (if no human gave the ``multiple_choice_answer``, the most
        frequent answer comes first); ``meta`` holds ``question``, ``multiple_choice_answer``,
        ``question_type``, ``answer_type`` (raw) and ``answer_confidence`` (aligned with
        ``answers``).

    Raises:
        FileNotFoundError: a file is missing; the message names the official file expected and
            ``data/vqa_v2/``.
        ValueError: invalid JSON, a missing or mistyped field (named with its record, e.g.
            ``annotations[3] has no field 'answers'``), an annotation whose question is not in the
            questions file (or the reverse), duplicate ids.
    """
    return _load_vqa_pair(
        questions_path, annotations_path, prompt, image_id_format, type_field,
        dataset="VQA v2", folder="data/vqa_v2", prefix="v2_",
    )


def load_okvqa(
    questions_path,
    annotations_path=None,
    prompt: str = "vqa: {question}",
    image_id_format: str = "{image_id}",
    type_field: str = "question_type",
) -> list[Example]:
    """Read OK-VQA from its official question and annotation files (the VQA v2 format).

    Args:
        questions_path: ``OpenEnded_mscoco_{split}2014_questions.json``.
        annotations_path: ``mscoco_{split}2014_annotations.json``, or None (no answers).
        prompt: the encoder text, formatted with ``question=``.
        image_id_format: how the integer image id becomes ``Example.image_id`` (``{split}``: the
            file's split, e.g. ``train2014``).
        type_field: the annotation field used as ``Example.question_type``. The default
            ``"question_type"`` is OK-VQA's knowledge category (its ``answer_type`` is ``"other"``
            throughout, so useless for per-type accuracy).

    Returns:
        One :class:`Example` per question, with the same conventions as :func:`load_vqa_v2`
        (10 answers, multiple-choice answer first; OK-VQA's 10 are 5 answers given twice).

    Raises:
        FileNotFoundError: a file is missing (the message names the official file and
            ``data/okvqa/``).
        ValueError: as :func:`load_vqa_v2`.
    """
    return _load_vqa_pair(
        questions_path, annotations_path, prompt, image_id_format, type_field,
        dataset="OK-VQA", folder="data/okvqa", prefix="",
    )


# --------------------------------------------------------------------------------------------
# GQA
# --------------------------------------------------------------------------------------------

_GQA_SPLITS = ("testdev", "train", "val", "test", "challenge", "submission")


def load_gqa(
    questions_path,
    prompt: str = "vqa: {question}",
    image_id_format: str = "{image_id}",
    balanced_only: bool = False,
) -> list[Example]:
    """Read GQA from an official ``{split}_balanced_questions.json`` (or ``*_all_questions``).

    Args:
        questions_path: the questions file, a dict keyed by question id whose values have
            ``imageId``, ``question`` and, on annotated splits, ``answer``, ``fullAnswer``,
            ``types`` (``structural``, ``semantic``, ``detailed``), ``isBalanced``.
        prompt: the encoder text, formatted with ``question=``.
        image_id_format: how ``imageId`` (a string such as ``"2354786"`` or ``"n161313"``)
            becomes ``Example.image_id``.
        balanced_only: keep only questions with ``isBalanced`` true (for the ``all`` files).

    Returns:
        One :class:`Example` per question, in file order: ``id`` = the question id, ``answers``
        = ``(answer,)`` (score with exact match / :func:`vqa_accuracy`, which coincide for one
        answer), ``question_type`` = ``types["structural"]`` (verify, query, choose, logical,
        compare); ``meta`` holds ``fullAnswer``, ``semantic``, ``detailed`` and ``isBalanced``.
        Files without answers (test, challenge) give ``answers == ()`` and ``question_type``
        None; whether a file is annotated is decided by its first question, and the others must
        agree.

    Raises:
        FileNotFoundError: the file is missing (the message names the official file and
            ``data/gqa/``).
        ValueError: invalid JSON, a missing or mistyped field (named with its question id).
    """
    _check_prompt(prompt)
    questions_path = Path(questions_path)
    split = _guess_split(questions_path.name, _GQA_SPLITS, "val")
    pattern = "{split}_balanced_questions.json"
    data = _read_json(
        questions_path, "GQA questions file", pattern.format(split=split), pattern, "data/gqa"
    )
    if not isinstance(data, dict):
        raise ValueError(
            f"{questions_path} must hold a JSON object keyed by question id, "
            f"got {type(data).__name__}"
        )

    annotated = None
    examples = []
    for qid, q in data.items():
        where = f"question {qid!r}"
        image_id = _field(q, "imageId", where, questions_path, (str, int))
        question = _field(q, "question", where, questions_path, str)
        if annotated is None:
            annotated = "answer" in q
        if balanced_only and not q.get("isBalanced", False):
            continue
        meta = {"dataset": "GQA", "question": question, "isBalanced": q.get("isBalanced")}
        answers: tuple[str, ...] = ()
        qtype = None
        if annotated:
            answers = (_field(q, "answer", where, questions_path, str),)
            types = _field(q, "types", where, questions_path, dict)
            qtype = _field(types, "structural", f"{where}.types", questions_path, str)
            meta.update(
                fullAnswer=q.get("fullAnswer"),
                semantic=types.get("semantic"),
                detailed=types.get("detailed"),
            )
        elif "answer" in q:
            raise ValueError(
                f"{where} has an answer but the first question of {questions_path} has none"
            )
        examples.append(
            Example(
                id=str(qid),
                image_id=_format_image_id(image_id_format, image_id, where, questions_path),
                prompt=prompt.format(question=question),
                answers=answers,
                question_type=qtype,
                meta=meta,
            )
        )
    return examples


# --------------------------------------------------------------------------------------------
# COCO captions (official and Karpathy)
# --------------------------------------------------------------------------------------------

_KARPATHY_SPLITS = ("train", "val", "test", "restval")


def load_coco_captions(
    path,
    split: str | list[str] | tuple[str, ...] | None = None,
    prompt: str = "caption:",
    image_id_format: str = "{image_id}",
    image_root=None,
) -> list[Example]:
    """Read COCO captions from the official ``captions_{split}2014.json`` or Karpathy's file.

    The format is detected from the content: a top-level ``annotations`` list means the official
    format (``images`` with ``id``, ``file_name``; ``annotations`` with ``image_id``,
    ``caption``), images carrying ``sentences`` mean Karpathy's ``dataset_coco.json``
    (``images`` with ``cocoid``, ``split``, ``filepath``, ``filename``, ``sentences[].raw``).

    Args:
        path: the captions file.
        split: Karpathy file only: keep the images of this split (``train``, ``val``, ``test``,
            ``restval``) or of any split in a list (e.g. ``["train", "restval"]``); None keeps
            all. The official files are one split each, so ``split`` must be None for them.
        prompt: the encoder text of every example.
        image_id_format: how the integer COCO id becomes ``Example.image_id``; ``{split}`` is the
            image's folder (Karpathy: its ``filepath``; official files: the file's split).
        image_root: if given, ``image_ref`` = ``image_root / file name`` (the Karpathy
            ``filepath/filename``, or the official ``file_name``); otherwise None.

    Returns:
        One :class:`Example` per image, in file order, ``id`` = ``str(coco id)``, ``answers`` =
        all its captions (file order; the first is the training target), ``question_type``
        None, ``meta`` with ``file_name``, ``format`` (``"coco"`` or ``"karpathy"``) and, for
        Karpathy, ``split``.

    Raises:
        FileNotFoundError: the file is missing (the message names the official files and
            ``data/coco/``).
        ValueError: invalid JSON, unknown layout, a missing field (named with its record), an
            unknown split, a caption of an image not in ``images``, an image without captions.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {prompt!r}")
    path = Path(path)
    coco_split = _guess_split(path.name, ("train2014", "val2014"), "val2014")
    data = _read_json(
        path,
        "COCO captions file",
        f"captions_{coco_split}.json",
        "captions_{split}2014.json, or Karpathy's dataset_coco.json",
        "data/coco",
    )
    if not isinstance(data, dict) or "images" not in data:
        raise ValueError(
            f"{path} is neither an official COCO captions file (fields 'images', 'annotations') "
            "nor Karpathy's dataset_coco.json (field 'images' with 'sentences'): "
            "no field 'images'"
        )
    images = _list_field(data, "images", path)
    root = Path(image_root) if image_root is not None else None

    if "annotations" in data:
        if split is not None:
            raise ValueError(
                f"split={split!r} only applies to Karpathy's dataset_coco.json; {path} is an "
                "official COCO captions file, which is already one split"
            )
        return _coco_official(path, data, images, prompt, image_id_format, root, coco_split)
    if images and isinstance(images[0], dict) and "sentences" in images[0]:
        return _coco_karpathy(path, images, split, prompt, image_id_format, root)
    raise ValueError(
        f"{path}: cannot tell the format: no top-level 'annotations' (official COCO) and "
        "images[0] has no field 'sentences' (Karpathy)"
    )


def _coco_official(path, data, images, prompt, image_id_format, root, coco_split) -> list[Example]:
    captions: dict[str, list[str]] = {}
    order = []
    info = {}
    for i, img in enumerate(images):
        where = f"images[{i}]"
        image_id = _field(img, "id", where, path, (int, str))
        key = str(image_id)
        if key in info:
            raise ValueError(f"{where}: duplicate image id {image_id} (in {path})")
        info[key] = (image_id, img.get("file_name"), where)
        captions[key] = []
        order.append(key)
    for i, ann in enumerate(_list_field(data, "annotations", path)):
        where = f"annotations[{i}]"
        key = str(_field(ann, "image_id", where, path, (int, str)))
        caption = _field(ann, "caption", where, path, str)
        if key not in captions:
            raise ValueError(f"{where}: image_id {key} is not in 'images' (in {path})")
        captions[key].append(caption.strip())

    examples = []
    for key in order:
        image_id, file_name, where = info[key]
        if not captions[key]:
            raise ValueError(f"{where}: image {key} has no caption in 'annotations' (in {path})")
        examples.append(
            Example(
                id=key,
                image_id=_format_image_id(image_id_format, image_id, where, path, coco_split),
                prompt=prompt,
                answers=tuple(captions[key]),
                image_ref=str(root / file_name) if root is not None and file_name else None,
                meta={"dataset": "COCO captions", "format": "coco", "file_name": file_name},
            )
        )
    return examples


def _coco_karpathy(path, images, split, prompt, image_id_format, root) -> list[Example]:
    if split is None:
        keep = None
    else:
        keep = {split} if isinstance(split, str) else set(split)
        unknown = keep - set(_KARPATHY_SPLITS)
        if unknown:
            raise ValueError(
                f"unknown Karpathy split(s) {sorted(unknown)}; choose from {list(_KARPATHY_SPLITS)}"
            )
    examples = []
    seen = set()
    for i, img in enumerate(images):
        where = f"images[{i}]"
        image_split = _field(img, "split", where, path, str)
        if keep is not None and image_split not in keep:
            continue
        image_id = _field(img, "cocoid", where, path, (int, str))
        if str(image_id) in seen:
            raise ValueError(f"{where}: duplicate cocoid {image_id} (in {path})")
        seen.add(str(image_id))
        sentences = _field(img, "sentences", where, path, list)
        if not sentences:
            raise ValueError(f"{where} field 'sentences' is empty (in {path})")
        caps = tuple(
            _field(s, "raw", f"{where}.sentences[{j}]", path, str).strip()
            for j, s in enumerate(sentences)
        )
        filename = img.get("filename")
        rel = str(Path(img.get("filepath", "")) / filename) if filename else None
        examples.append(
            Example(
                id=str(image_id),
                image_id=_format_image_id(image_id_format, image_id, where, path, img.get("filepath", "")),
                prompt=prompt,
                answers=caps,
                image_ref=str(root / rel) if root is not None and rel else None,
                meta={
                    "dataset": "COCO captions",
                    "format": "karpathy",
                    "split": image_split,
                    "file_name": rel,
                },
            )
        )
    return examples
