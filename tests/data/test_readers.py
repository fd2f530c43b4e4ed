"""Readers of the official real-dataset formats, on tiny hand-written fixture files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from workbench.data.example import Example
from workbench.data.readers import load_coco_captions, load_gqa, load_okvqa, load_vqa_v2

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
VQA_Q = FIXTURES / "vqa_v2" / "v2_OpenEnded_mscoco_val2014_questions.json"
VQA_A = FIXTURES / "vqa_v2" / "v2_mscoco_val2014_annotations.json"
OK_Q = FIXTURES / "okvqa" / "OpenEnded_mscoco_val2014_questions.json"
OK_A = FIXTURES / "okvqa" / "mscoco_val2014_annotations.json"
GQA = FIXTURES / "gqa" / "val_balanced_questions.json"
COCO = FIXTURES / "coco" / "captions_val2014.json"
KARPATHY = FIXTURES / "coco" / "dataset_coco.json"


def _raw_answers(path, question_id):
    for ann in json.loads(Path(path).read_text())["annotations"]:
        if ann["question_id"] == question_id:
            return [a["answer"] for a in ann["answers"]]
    raise AssertionError(question_id)


def _write_variant(tmp_path, src, name, edit):
    """Copy a fixture under its official name with ``edit(data)`` applied."""
    data = json.loads(Path(src).read_text())
    edit(data)
    out = tmp_path / name
    out.write_text(json.dumps(data))
    return out


# ------------------------------------------------------------------------------------ VQA v2


def test_vqa_v2_round_trip():
    examples = load_vqa_v2(VQA_Q, VQA_A)
    assert [ex.id for ex in examples] == ["262148000", "262148001", "393225000"]  # questions order
    assert all(isinstance(ex, Example) for ex in examples)
    looking, count, bowl = examples
    assert looking.image_id == "262148" and bowl.image_id == "393225"
    assert looking.prompt == "vqa: Where is he looking?"
    assert looking.question_type == "other"
    assert count.question_type == "number"
    assert bowl.question_type == "yes/no"
    assert looking.meta["question_type"] == "none of the above"
    assert count.meta["answer_type"] == "number"
    assert looking.image_ref is None


def test_vqa_v2_answers_are_the_ten_humans_with_multiple_choice_first():
    looking, count, bowl = load_vqa_v2(VQA_Q, VQA_A)
    for ex, qid in [(looking, 262148000), (count, 262148001), (bowl, 393225000)]:
        raw = _raw_answers(VQA_A, qid)
        assert len(ex.answers) == 10
        assert Counter(ex.answers) == Counter(raw)  # same multiset: the metric is unchanged
        assert ex.target == ex.meta["multiple_choice_answer"]
    # "down" (mc, 4 votes) first although "skateboard" has as many votes and comes first in file
    assert looking.answers[:4] == ("down",) * 4
    assert looking.answers[4:8] == ("skateboard",) * 4
    assert looking.answers[8:] == ("at table", "table")
    assert count.answers == ("2",) * 6 + ("1",) * 3 + ("3",)
    # confidences are reordered with their answers
    assert count.meta["answer_confidence"] == ("yes",) * 6 + ("maybe",) * 4


def test_vqa_v2_prompt_image_id_format_and_type_field():
    examples = load_vqa_v2(
        VQA_Q, VQA_A, prompt="question: {question} answer:",
        image_id_format="COCO_val2014_{image_id:012d}", type_field="question_type",
    )
    assert examples[0].prompt == "question: Where is he looking? answer:"
    assert examples[0].image_id == "COCO_val2014_000000262148"
    assert examples[1].question_type == "how many"
    with pytest.raises(ValueError, match=r"\{question\}"):
        load_vqa_v2(VQA_Q, VQA_A, prompt="vqa:")
    with pytest.raises(ValueError, match="type_field"):
        load_vqa_v2(VQA_Q, VQA_A, type_field="nope")


def test_vqa_v2_without_annotations_gives_empty_answers():
    examples = load_vqa_v2(VQA_Q)
    assert len(examples) == 3
    assert all(ex.answers == () and ex.question_type is None for ex in examples)


def test_vqa_v2_missing_files_name_the_official_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"v2_OpenEnded_mscoco_val2014_questions\.json") as e:
        load_vqa_v2(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json")
    assert "data/vqa_v2/" in str(e.value) and "data/README.md" in str(e.value)
    assert "Real datasets" in str(e.value)
    with pytest.raises(FileNotFoundError, match=r"v2_OpenEnded_mscoco_train2014_questions\.json"):
        load_vqa_v2(tmp_path / "v2_OpenEnded_mscoco_train2014_questions.json")
    with pytest.raises(FileNotFoundError, match=r"v2_mscoco_val2014_annotations\.json.*data/vqa_v2/"):
        load_vqa_v2(VQA_Q, tmp_path / "v2_mscoco_val2014_annotations.json")


def test_vqa_v2_missing_field_is_named(tmp_path):
    def drop_answers(data):
        del data["annotations"][2]["answers"]

    bad = _write_variant(tmp_path, VQA_A, "v2_mscoco_val2014_annotations.json", drop_answers)
    with pytest.raises(ValueError, match=r"annotations\[2\] has no field 'answers'") as e:
        load_vqa_v2(VQA_Q, bad)
    assert str(bad) in str(e.value)

    def drop_question(data):
        del data["questions"][1]["question"]

    badq = _write_variant(tmp_path, VQA_Q, "v2_OpenEnded_mscoco_val2014_questions.json", drop_question)
    with pytest.raises(ValueError, match=r"questions\[1\] has no field 'question'"):
        load_vqa_v2(badq)

    def drop_answer_text(data):
        del data["annotations"][0]["answers"][3]["answer"]

    bad2 = _write_variant(tmp_path, VQA_A, "a.json", drop_answer_text)
    with pytest.raises(ValueError, match=r"annotations\[0\]\.answers\[3\] has no field 'answer'"):
        load_vqa_v2(VQA_Q, bad2)

    bad3 = _write_variant(tmp_path, VQA_Q, "q.json", lambda d: d.pop("questions"))
    with pytest.raises(ValueError, match="no field 'questions'"):
        load_vqa_v2(bad3)


def test_vqa_v2_wrong_type_is_named(tmp_path):
    def answers_as_str(data):
        data["annotations"][1]["answers"] = "down"

    bad = _write_variant(tmp_path, VQA_A, "a.json", answers_as_str)
    with pytest.raises(ValueError, match=r"annotations\[1\] field 'answers' must be list"):
        load_vqa_v2(VQA_Q, bad)


def test_vqa_v2_malformed_json_names_the_file(tmp_path):
    bad = tmp_path / "v2_mscoco_val2014_annotations.json"
    bad.write_text('{"annotations": [')
    with pytest.raises(ValueError, match="not valid JSON") as e:
        load_vqa_v2(VQA_Q, bad)
    assert str(bad) in str(e.value)


def test_vqa_v2_annotation_without_question_is_an_error(tmp_path):
    def orphan(data):
        data["annotations"][0]["question_id"] = 999

    bad = _write_variant(tmp_path, VQA_A, "a.json", orphan)
    with pytest.raises(ValueError, match=r"annotations\[0\]: question_id 999 has no question"):
        load_vqa_v2(VQA_Q, bad)


def test_vqa_v2_question_without_annotation_is_an_error(tmp_path):
    bad = _write_variant(tmp_path, VQA_A, "a.json", lambda d: d["annotations"].pop(0))
    with pytest.raises(ValueError, match=r"1 question\(s\) .* have no annotation.*393225000"):
        load_vqa_v2(VQA_Q, bad)


def test_vqa_v2_mismatched_image_and_duplicates(tmp_path):
    def other_image(data):
        data["annotations"][0]["image_id"] = 1

    bad = _write_variant(tmp_path, VQA_A, "a.json", other_image)
    with pytest.raises(ValueError, match="image_id 1 but its question has image_id 393225"):
        load_vqa_v2(VQA_Q, bad)

    def duplicate(data):
        data["questions"].append(dict(data["questions"][0]))

    badq = _write_variant(tmp_path, VQA_Q, "q.json", duplicate)
    with pytest.raises(ValueError, match="duplicate question_id 262148000"):
        load_vqa_v2(badq)


def test_vqa_v2_multiple_choice_answer_absent_puts_most_frequent_first(tmp_path):
    def odd_mc(data):
        data["annotations"][2]["multiple_choice_answer"] = "two"

    path = _write_variant(tmp_path, VQA_A, "a.json", odd_mc)
    count = load_vqa_v2(VQA_Q, path)[1]
    assert count.answers[0] == "2"
    assert count.meta["multiple_choice_answer"] == "two"


# ------------------------------------------------------------------------------------ OK-VQA


def test_okvqa_round_trip():
    sport, brand = load_okvqa(OK_Q, OK_A)
    assert sport.id == "2971475" and sport.image_id == "297147"
    assert sport.prompt == "vqa: What sport can you use this for?"
    assert sport.answers == ("race",) * 6 + ("motocross",) * 2 + ("ride",) * 2
    assert sport.target == "race"
    assert sport.question_type == "four"  # the knowledge category
    assert sport.meta["answer_type"] == "other"
    assert brand.answers[:4] == ("toyota",) * 4
    assert Counter(brand.answers) == Counter(_raw_answers(OK_A, 1027055))
    assert load_okvqa(OK_Q, OK_A, type_field="answer_type")[0].question_type == "other"
    assert all(ex.answers == () for ex in load_okvqa(OK_Q))


def test_okvqa_missing_file_names_official_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'OpenEnded_mscoco_val2014_questions\.json'.*data/okvqa/"):
        load_okvqa(tmp_path / "OpenEnded_mscoco_val2014_questions.json")
    with pytest.raises(FileNotFoundError, match=r"'mscoco_train2014_annotations\.json'"):
        load_okvqa(OK_Q, tmp_path / "mscoco_train2014_annotations.json")


# ------------------------------------------------------------------------------------ GQA


def test_gqa_round_trip():
    examples = load_gqa(GQA)
    assert [ex.id for ex in examples] == ["05451384", "201307251", "20968379"]
    table, lamp, man = examples
    assert table.image_id == "2354786" and man.image_id == "n161313"
    assert table.prompt == "vqa: What is on the table?"
    assert table.answers == ("laptop",)
    assert table.question_type == "query" and lamp.question_type == "verify"
    assert man.question_type == "choose"
    assert table.meta["fullAnswer"] == "The laptop is on the table."
    assert table.meta["semantic"] == "rel" and table.meta["detailed"] == "relS"
    assert man.meta["isBalanced"] is False


def test_gqa_balanced_only_and_image_format():
    examples = load_gqa(GQA, balanced_only=True, image_id_format="gqa_{image_id}")
    assert [ex.id for ex in examples] == ["05451384", "201307251"]
    assert examples[0].image_id == "gqa_2354786"


def test_gqa_without_answers(tmp_path):
    def strip(data):
        for q in data.values():
            for k in ("answer", "fullAnswer", "types"):
                q.pop(k)

    path = _write_variant(tmp_path, GQA, "test_balanced_questions.json", strip)
    examples = load_gqa(path)
    assert all(ex.answers == () and ex.question_type is None for ex in examples)


def test_gqa_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'testdev_balanced_questions\.json'.*data/gqa/"):
        load_gqa(tmp_path / "testdev_balanced_questions.json")

    def drop_types(data):
        del data["201307251"]["types"]

    bad = _write_variant(tmp_path, GQA, "val_balanced_questions.json", drop_types)
    with pytest.raises(ValueError, match=r"question '201307251' has no field 'types'"):
        load_gqa(bad)

    def drop_structural(data):
        del data["20968379"]["types"]["structural"]

    bad = _write_variant(tmp_path, GQA, "val_balanced_questions.json", drop_structural)
    with pytest.raises(ValueError, match=r"question '20968379'\.types has no field 'structural'"):
        load_gqa(bad)

    listy = tmp_path / "train_balanced_questions.json"
    listy.write_text("[]")
    with pytest.raises(ValueError, match="keyed by question id"):
        load_gqa(listy)


# ------------------------------------------------------------------------------------ COCO


def test_coco_official_round_trip():
    examples = load_coco_captions(COCO)
    assert [ex.id for ex in examples] == ["391895", "522418"]
    moped, cake = examples
    assert moped.prompt == "caption:"
    assert moped.answers == (
        "A man with a red helmet on a small moped on a dirt road.",
        "Man riding a motor bike on a dirt road on the countryside.",
        "A man riding on the back of a motorcycle.",
    )
    assert len(cake.answers) == 2
    assert moped.question_type is None
    assert moped.meta["format"] == "coco"
    assert moped.meta["file_name"] == "COCO_val2014_000000391895.jpg"
    assert moped.image_ref is None


def test_coco_official_options():
    ex = load_coco_captions(COCO, prompt="describe:", image_root="data/coco/val2014")[0]
    assert ex.prompt == "describe:"
    assert ex.image_ref == str(Path("data/coco/val2014/COCO_val2014_000000391895.jpg"))
    with pytest.raises(ValueError, match="only applies to Karpathy"):
        load_coco_captions(COCO, split="val")


def test_coco_karpathy_round_trip_and_splits():
    every = load_coco_captions(KARPATHY)
    assert [ex.id for ex in every] == ["391895", "522418", "57870", "184613", "403013", "318219"]
    assert every[0].meta["format"] == "karpathy"
    assert every[0].answers == (
        "A man with a red helmet on a small moped on a dirt road.",
        "Man riding a motor bike on a dirt road on the countryside.",
    )
    assert every[2].meta["file_name"] == str(Path("train2014/COCO_train2014_000000057870.jpg"))
    assert [ex.id for ex in load_coco_captions(KARPATHY, split="test")] == ["391895", "184613", "403013"]
    assert [ex.meta["split"] for ex in load_coco_captions(KARPATHY, split=["train", "restval"])] == [
        "restval", "train", "train",
    ]
    assert load_coco_captions(KARPATHY, split="val") == []
    with pytest.raises(ValueError, match="unknown Karpathy split"):
        load_coco_captions(KARPATHY, split="dev")


def test_coco_same_images_in_both_formats():
    official = {ex.id: ex.answers for ex in load_coco_captions(COCO)}
    karpathy = {ex.id: ex.answers for ex in load_coco_captions(KARPATHY)}
    assert set(karpathy["391895"]) <= set(official["391895"])
    assert set(karpathy["522418"]) == set(official["522418"])


def test_coco_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"captions_val2014\.json.*dataset_coco\.json.*data/coco/"):
        load_coco_captions(tmp_path / "captions_val2014.json")

    def orphan(data):
        data["annotations"][1]["image_id"] = 42

    bad = _write_variant(tmp_path, COCO, "captions_val2014.json", orphan)
    with pytest.raises(ValueError, match=r"annotations\[1\]: image_id 42 is not in 'images'"):
        load_coco_captions(bad)

    def no_caption(data):
        del data["annotations"][3]["caption"]

    bad = _write_variant(tmp_path, COCO, "captions_val2014.json", no_caption)
    with pytest.raises(ValueError, match=r"annotations\[3\] has no field 'caption'"):
        load_coco_captions(bad)

    def drop_raw(data):
        del data["images"][1]["sentences"][0]["raw"]

    bad = _write_variant(tmp_path, KARPATHY, "dataset_coco.json", drop_raw)
    with pytest.raises(ValueError, match=r"images\[1\]\.sentences\[0\] has no field 'raw'"):
        load_coco_captions(bad)

    unknown = tmp_path / "captions_train2014.json"
    unknown.write_text(json.dumps({"images": [{"id": 1}]}))
    with pytest.raises(ValueError, match="cannot tell the format"):
        load_coco_captions(unknown)
