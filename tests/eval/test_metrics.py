"""workbench.eval: the official VQA normalisation and accuracy, exact match, captioning scores."""

from __future__ import annotations

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from workbench.data.example import Example
from workbench.eval import (
    CONTRACTIONS,
    accuracy_by_type,
    caption_scores,
    exact_match,
    normalize_answer,
    normalize_caption,
    vqa_accuracy,
)

RSQ = "\u2019"  # the typographic apostrophe most of the official contraction table uses

# input -> output of the official vqaEval.py (processPunctuation then processDigitArticle).
NORMALISATION_TABLE = [
    # lower-case, whitespace
    ("Yes", "yes"),
    ("  RED  ", "red"),
    ("two\ndogs\t", "2 dogs"),
    ("", ""),
    # number words (manualMap), word by word only
    ("none", "0"),
    ("zero", "0"),
    ("One", "1"),
    ("three", "3"),
    ("ten", "10"),
    ("eleven", "eleven"),
    ("twenty one", "twenty 1"),
    ("someone", "someone"),
    # articles
    ("a dog", "dog"),
    ("An apple", "apple"),
    ("the man", "man"),
    ("on a table", "on table"),
    ("the", ""),
    ("another", "another"),
    # contractions (values exactly as in the official table)
    ("dont", f"don{RSQ}t"),
    ("doesnt", f"doesn{RSQ}t"),
    ("cant", "can't"),
    ("isnt", f"isn{RSQ}t"),
    ("weve", "we've"),
    ("whats", f"what{RSQ}s"),
    ("oclock", f"o{RSQ}clock"),
    ("ive", "ive"),  # the table's key is "Ive" but words are lower-cased first: never matches
    ("Im", "im"),
    ("can't", "can t"),  # the straight apostrophe is punctuation, handled before contractions
    (f"don{RSQ}t", f"don{RSQ}t"),  # the typographic one is not punctuation
    # periods: removed unless a digit follows
    ("3.5", "3.5"),
    ("0.25 inches", "0.25 inches"),
    ("yes.", "yes"),
    ("3.", "3"),
    ("mr. smith", "mr smith"),
    ("u.s.a", "usa"),
    (".5", ".5"),
    # commas between digits: all punctuation deleted instead of spaced, numbers kept whole
    ("1,000", "1000"),
    ("10,000 people", "10000 people"),
    ("1,000/2", "10002"),
    # punctuation replaced by a space...
    ("red/white", "red white"),
    ("black,white", "black white"),
    ("what?", "what"),
    ("(left)", "left"),
    ("a+b", "b"),
    ("lady's", "lady s"),
    ("10:30", "10 30"),
    ('"hi"', "hi"),
    ("x_y", "x y"),
    # ...or deleted when it touches a space
    ("yes, it is", "yes it is"),
    ("no ; yes", "no yes"),
    ("red / white", "red white"),
    # marks outside the official list are kept
    ("t-shirt", "t-shirt"),
    ("wow!", "wow!"),
    ("black & white", "black & white"),
]


@pytest.mark.parametrize("raw, expected", NORMALISATION_TABLE)
def test_normalize_answer_official_table(raw, expected):
    assert normalize_answer(raw) == expected


def test_contraction_table_is_complete():
    assert len(CONTRACTIONS) == 120
    assert CONTRACTIONS["dont"] == f"don{RSQ}t"
    assert CONTRACTIONS["wheres"] == "where's"
    assert CONTRACTIONS["Ive"] == f"I{RSQ}ve"
    reachable = 0
    for key, value in CONTRACTIONS.items():
        # keys with a capital or a straight apostrophe can never match (see the module doc)
        if key == key.lower() and "'" not in key:
            assert normalize_answer(key) == value
            reachable += 1
    assert reachable == 114


def test_normalize_answer_rejects_non_strings():
    with pytest.raises(TypeError, match="expects a str"):
        normalize_answer(3)


# --------------------------------------------------------------------------- VQA accuracy


def ten(matching: int, answer: str = "red", other: str = "blue") -> list[str]:
    return [answer] * matching + [other] * (10 - matching)


@pytest.mark.parametrize(
    "matches, expected",
    [
        (0, 0.0),
        (1, 0.3),  # (1 * 0 + 9 * 1/3) / 10
        (2, 0.6),  # (2 * 1/3 + 8 * 2/3) / 10
        (3, 0.9),  # (3 * 2/3 + 7 * 1) / 10
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_vqa_accuracy_ten_answers(matches, expected):
    assert vqa_accuracy("red", ten(matches)) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides_and_ignores_order():
    answers = ["2", "two", "2", "1", "3", "1", "1", "1", "1", "1"]
    assert vqa_accuracy("Two.", answers) == pytest.approx(0.9)  # "two" counts as "2"
    assert vqa_accuracy("two", list(reversed(answers))) == pytest.approx(0.9)
    assert vqa_accuracy("the dog", ["dog"] * 10) == 1.0


def test_vqa_accuracy_official_reference_processing():
    # References only get the punctuation step (and only when they disagree): "two" stays.
    answers = ["two", "two", "two", "2", "1", "1", "1", "1", "1", "1"]
    assert vqa_accuracy("2", answers, official_references=True) == pytest.approx(0.3)
    assert vqa_accuracy("2", answers) == pytest.approx(1.0)
    # already-normalised references: the two modes agree
    refs = ten(3, "2", "1")
    assert vqa_accuracy("two", refs, official_references=True) == vqa_accuracy("two", refs)


def test_vqa_accuracy_single_answer_is_exact_match():
    assert vqa_accuracy("Yes", ["yes"]) == 1.0
    assert vqa_accuracy("3", ["three"]) == 1.0
    assert vqa_accuracy("no", ["yes"]) == 0.0


@pytest.mark.parametrize(
    "answers, prediction, expected",
    [
        (["red", "red"], "red", 1.0),
        (["red", "blue"], "red", 0.5),  # threshold 1: full credit when "red" is among the others
        (["red", "blue"], "green", 0.0),
        (["red", "red", "blue"], "red", 2 / 3),  # threshold 2: (1/2 + 1/2 + 1) / 3
        (["red", "red", "red"], "red", 1.0),
        (["red", "blue", "blue", "blue", "blue"], "red", 4 / 15),  # threshold 3: (0 + 4/3) / 5
        (["red"] * 4, "red", 1.0),
    ],
)
def test_vqa_accuracy_few_answers(answers, prediction, expected):
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected)


def test_vqa_accuracy_validates():
    with pytest.raises(TypeError, match="list or tuple of str"):
        vqa_accuracy("yes", "yes")
    with pytest.raises(TypeError, match="prediction must be a str"):
        vqa_accuracy(None, ["yes"])
    with pytest.raises(TypeError, match=r"answers\[1\] must be a str"):
        vqa_accuracy("yes", ["yes", 1])
    with pytest.raises(ValueError, match="no reference answers"):
        vqa_accuracy("yes", [])
    with pytest.raises(ValueError, match="no reference answers"):
        exact_match("yes", ())


def test_exact_match():
    assert exact_match("Yes.", ["yes"]) == 1.0
    assert exact_match("two", ["2", "3"]) == 1.0
    assert exact_match("3", ["2", "4"]) == 0.0
    assert exact_match("Yes", ["yes"], normalize=False) == 0.0
    assert exact_match("yes", ("yes",), normalize=False) == 1.0


# --------------------------------------------------------------------------- per type


def _examples():
    return [
        Example("q1", "i1", "vqa: a?", tuple(ten(3, "red")), question_type="other"),
        Example("q2", "i1", "vqa: b?", tuple(ten(10, "yes")), question_type="yes/no"),
        Example("q3", "i2", "vqa: c?", tuple(ten(10, "no")), question_type="yes/no"),
        Example("q4", "i2", "vqa: d?", ("2",), question_type=None),
    ]


def test_accuracy_by_type_with_dict_and_list():
    examples = _examples()
    preds = {"q1": "red", "q2": "yes", "q3": "yes", "q4": "two", "extra": "ignored"}
    result = accuracy_by_type(preds, examples)
    assert result["overall"] == pytest.approx((0.9 + 1 + 0 + 1) / 4)
    assert result["per_type"] == pytest.approx({"other": 0.9, "untyped": 1.0, "yes/no": 0.5})
    assert result["n"] == 4
    assert result["n_per_type"] == {"other": 1, "untyped": 1, "yes/no": 2}
    as_list = accuracy_by_type(["red", "yes", "yes", "two"], examples)
    assert as_list == result
    em = accuracy_by_type(["red", "yes", "yes", "two"], examples, metric=exact_match)
    assert em["per_type"]["other"] == 1.0


def test_accuracy_by_type_validates():
    examples = _examples()
    with pytest.raises(ValueError, match=r"1 example\(s\) have no prediction.*'q4'"):
        accuracy_by_type({"q1": "a", "q2": "b", "q3": "c"}, examples)
    with pytest.raises(ValueError, match="3 predictions for 4 examples"):
        accuracy_by_type(["a", "b", "c"], examples)
    with pytest.raises(TypeError, match="predictions must be"):
        accuracy_by_type("abcd", examples)
    with pytest.raises(ValueError, match="no examples"):
        accuracy_by_type({}, [])
    unanswered = [Example("t1", "i", "vqa: x?", ())]
    with pytest.raises(ValueError, match="example 't1' has no reference answer"):
        accuracy_by_type({"t1": "yes"}, unanswered)


# --------------------------------------------------------------------------- captions

REFS = {
    "1": ["A man riding a motorcycle on a dirt road.", "Man riding a motor bike on a dirt road."],
    "2": ["A woman cutting a large white sheet cake.", "A woman cutting a cake."],
    "3": ["Two dogs playing in the snow.", "Dogs play together in snow!"],
    "4": ["A red bus parked on the street.", "A bus on a city street."],
}
GOOD = {
    "1": "a man riding a motorcycle on a dirt road",
    "2": "a woman cutting a large white cake",
    "3": "two dogs playing in the snow",
    "4": "a red bus parked on a street",
}
BAD = {"1": "a plate of food", "2": "a cat on a sofa", "3": "a bus", "4": "two dogs on a road"}


def test_normalize_caption():
    assert normalize_caption("A Man, riding a motor-bike!") == "a man riding a motor bike"
    assert normalize_caption("  dog's   toy. ") == "dog s toy"
    with pytest.raises(TypeError):
        normalize_caption(["a"])


def test_caption_scores_match_pycocoevalcap_on_the_same_tokens():
    scores = caption_scores(GOOD, REFS)
    gts = {k: [normalize_caption(r) for r in v] for k, v in REFS.items()}
    res = {k: [normalize_caption(v)] for k, v in GOOD.items()}
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert set(scores) == {"CIDEr", "BLEU-4"}
    assert scores["CIDEr"] == pytest.approx(cider)
    assert scores["BLEU-4"] == pytest.approx(bleu[3])


def test_caption_scores_rank_good_above_bad():
    good = caption_scores(GOOD, REFS)
    bad = caption_scores(BAD, REFS)
    copies = caption_scores({k: v[0] for k, v in REFS.items()}, REFS)
    assert good["CIDEr"] > bad["CIDEr"] and good["BLEU-4"] > bad["BLEU-4"]
    assert copies["CIDEr"] > bad["CIDEr"]
    assert bad["BLEU-4"] < 1e-3
    assert 0.0 <= good["BLEU-4"] <= 1.0


def test_caption_scores_ignore_case_and_punctuation():
    shouted = {k: v.upper() + "!!" for k, v in GOOD.items()}
    assert caption_scores(shouted, REFS) == pytest.approx(caption_scores(GOOD, REFS))


def test_caption_scores_validate():
    with pytest.raises(ValueError, match="no predictions"):
        caption_scores({}, REFS)
    with pytest.raises(ValueError, match=r"same ids.*without prediction: \['4'\]"):
        caption_scores({k: GOOD[k] for k in "123"}, REFS)
    with pytest.raises(ValueError, match=r"without references: \['9'\]"):
        caption_scores({**GOOD, "9": "x"}, REFS)
    with pytest.raises(ValueError, match="id '1' has no reference caption"):
        caption_scores(GOOD, {**REFS, "1": []})
    with pytest.raises(TypeError, match="references for '1' must be a list of str"):
        caption_scores(GOOD, {**REFS, "1": "a man"})
    with pytest.raises(TypeError, match="prediction for '2' must be a str"):
        caption_scores({**GOOD, "2": None}, REFS)
    with pytest.raises(TypeError, match="must be dicts"):
        caption_scores(list(GOOD.values()), REFS)
