"""workbench.eval: the metric dispatcher, VQA soft scores, and the package's purity."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from workbench import eval as wbeval
from workbench.eval import (
    METRICS,
    SOFT_SCORE_TABLE,
    accuracy_by_type,
    answer_soft_scores,
    caption_scores,
    evaluate,
    soft_score,
)


def ex(id, answers, qtype=None):
    # duck-typed: eval never needs workbench.data.Example
    return SimpleNamespace(id=id, answers=tuple(answers), question_type=qtype)


def test_eval_imports_nothing_else_of_the_workbench():
    # workbench.utils is the shared infrastructure every layer may use (importing workbench pins the
    # CPU numerics through it)
    code = ("import sys, workbench.eval; print(sorted(m for m in sys.modules if m.startswith('workbench.') "
            "and not m.startswith('workbench.eval') and m != 'workbench.utils'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_train_reexports_the_metrics():
    from workbench import train

    for name in ("accuracy_by_type", "caption_scores", "exact_match", "normalize_answer", "vqa_accuracy"):
        assert getattr(train, name) is getattr(wbeval, name)


def test_soft_score_table():
    assert SOFT_SCORE_TABLE == (0.0, 0.3, 0.6, 0.9, 1.0)
    assert [soft_score(k) for k in range(7)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="non-negative int"):
        soft_score(-1)


def test_answer_soft_scores_group_by_normalised_answer():
    answers = ["2", "two", "1", "2", "3", "1", "1", "1", "1", "1"]
    assert answer_soft_scores(answers) == [("2", 0.9), ("1", 1.0), ("3", 0.3)]
    assert answer_soft_scores(["Yes", "yes"] * 5) == [("Yes", 1.0)]  # one answer: nothing to sample
    assert answer_soft_scores(("red",)) == [("red", 0.3)]
    with pytest.raises(ValueError, match="no reference answers"):
        answer_soft_scores([])


def test_evaluate_vqa_and_exact():
    examples = [ex("a", ["red"] * 3 + ["blue"] * 7, "color"), ex("b", ["2"], "count"), ex("c", ["yes"], None)]
    preds = {"a": "red", "b": "two", "c": "no"}
    vqa = evaluate(preds, examples, "vqa")
    assert vqa == accuracy_by_type(preds, examples)
    assert vqa["overall"] == pytest.approx((0.9 + 1 + 0) / 3)
    assert vqa["per_type"] == pytest.approx({"color": 0.9, "count": 1.0, "untyped": 0.0})
    exact = evaluate(["red", "two", "no"], examples, "exact")
    assert exact["per_type"]["color"] == 1.0  # exact match: any reference
    # one answer per question: the two metrics agree (the ShapesWorld / easy-VQA numbers)
    one = [ex(str(i), [a], "t") for i, a in enumerate(["yes", "3", "red circle"])]
    p = ["Yes.", "three", "the red circle"]
    assert evaluate(p, one, "vqa") == evaluate(p, one, "exact")


def test_evaluate_cider():
    refs = {"1": ["a man riding a motorcycle on a dirt road", "man riding a motor bike on a dirt road"],
            "2": ["a woman cutting a large white sheet cake", "a woman cutting a cake"],
            "3": ["two dogs playing in the snow", "dogs play together in snow"]}
    examples = [ex(k, v) for k, v in refs.items()]
    preds = ["a man riding a motorcycle", "a woman cutting a cake", "two dogs in the snow"]
    out = evaluate(preds, examples, "cider")
    expected = caption_scores(dict(zip(refs, preds)), refs)
    assert out == {"overall": expected["CIDEr"], "CIDEr": expected["CIDEr"], "BLEU-4": expected["BLEU-4"],
                   "per_type": {}}
    assert evaluate(dict(zip(refs, preds)), examples, "cider") == out
    with pytest.raises(ValueError, match="2 predictions for 3 examples"):
        evaluate(preds[:2], examples, "cider")
    with pytest.raises(ValueError, match=r"have no prediction.*'3'"):
        evaluate(dict(zip(refs, preds[:2])), examples, "cider")


def test_evaluate_unknown_metric():
    assert METRICS == ("vqa", "exact", "cider")
    with pytest.raises(ValueError, match=r"unknown metric 'bleu'; choose from \['vqa', 'exact', 'cider'\]"):
        evaluate(["x"], [ex("a", ["x"])], "bleu")
