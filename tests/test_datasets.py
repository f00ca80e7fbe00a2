"""Dataset readers: JSON list, JSONL, the official TextVQA json, and errors that name record and field."""

from __future__ import annotations

import json

import pytest

from vicrop_jax.evaluation.datasets import DatasetError, Record, check_options, read_dataset, record_options

RECORDS = [
    {"id": "q1", "question": "What is written on the sign?", "labels": ["stop", "stop"], "image_path": "a.jpg",
     "bbox": [10, 20, 30, 40], "short_question": "the sign", "extra": "ignored"},
    {"id": 7, "question": "Is there a dog?", "labels": "yes", "image_path": "sub/b.png", "dataset": "pope"},
]
EXPECTED = [
    Record("q1", "What is written on the sign?", ("stop", "stop"), "a.jpg", "the sign", (10.0, 20.0, 30.0, 40.0)),
    Record(7, "Is there a dog?", ("yes",), "sub/b.png", dataset="pope"),
]


def test_json_list(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(RECORDS))
    assert read_dataset(path) == EXPECTED
    assert read_dataset(path, "records", dataset="mine")[0].dataset == "mine"


def test_jsonl_with_blank_lines(tmp_path):
    path = tmp_path / "bench.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS[:1]) + "\n\n" + json.dumps(RECORDS[1]) + "\n")
    assert read_dataset(path) == EXPECTED


def test_official_textvqa_json(tmp_path):
    path = tmp_path / "TextVQA_0.5.1_val.json"
    path.write_text(json.dumps({"dataset_name": "textvqa", "dataset_type": "val", "data": [
        {"question": "what is the brand?", "image_id": "003a8ae2ef43b901", "question_id": 34602,
         "answers": ["nokia"] * 9 + ["nokia phone"], "image_classes": ["Mobile phone"], "set_name": "val"},
    ]}))
    [record] = read_dataset(path)
    assert record == Record(34602, "what is the brand?", ("nokia",) * 9 + ("nokia phone",),
                            "003a8ae2ef43b901.jpg", dataset="textvqa")
    assert read_dataset(path, "textvqa", dataset="tv")[0].dataset == "tv"
    with pytest.raises(DatasetError, match="TextVQA-style json.*--dataset-format textvqa"):
        read_dataset(path, "records")


def test_malformed_records_are_all_named_with_field_and_expectation(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([
        RECORDS[0],
        {"id": "q2", "question": "?", "image_path": "a.jpg"},
        {"id": "q3", "question": "?", "labels": [], "image_path": "a.jpg"},
        {"id": "q4", "question": "?", "labels": "x", "image_path": "a.jpg", "bbox": [30, 0, 10, 5]},
        {"id": True, "question": "?", "labels": "x", "image_path": "a.jpg"},
        {"id": "q6", "question": 5, "labels": "x", "image_path": "a.jpg"},
        ["not", "an", "object"],
        {"id": "q1", "question": "?", "labels": "x", "image_path": "a.jpg"},
    ]))
    with pytest.raises(DatasetError) as raised:
        read_dataset(path)
    message = str(raised.value)
    assert "7 malformed record(s)" in message
    assert ("record [1] (id 'q2'): field 'labels': expected a string or a non-empty list of strings, got nothing"
            in message)
    assert "record [2] (id 'q3'): field 'labels'" in message and "got []" in message
    assert "record [3] (id 'q4'): field 'bbox': expected [x1, y1, x2, y2] finite numbers with x1 < x2" in message
    assert "record [4]: field 'id': expected a string or an integer, got true" in message
    assert "record [5] (id 'q6'): field 'question': expected a string, got 5" in message
    assert "record [6]: field '(record)': expected a JSON object" in message
    assert "record [7] (id 'q1'): id repeats that of record [0]" in message


def test_bad_jsonl_line_and_format_mismatches(tmp_path):
    path = tmp_path / "bench.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + '{"id": "q2", "question": \n')
    with pytest.raises(DatasetError, match=r"line 2 is not valid JSON"):
        read_dataset(path)
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({**RECORDS[1], "labels": None}) + "\n")
    with pytest.raises(DatasetError, match=r"line 2 \(id 7\): field 'labels'"):
        read_dataset(path)
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(RECORDS))
    with pytest.raises(DatasetError, match="expected the TextVQA json"):
        read_dataset(listed, "textvqa")
    with pytest.raises(DatasetError, match="not found"):
        read_dataset(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="unknown dataset format 'csv'"):
        read_dataset(listed, "csv")


def test_non_utf8_bytes_are_replaced_with_a_warning(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[{"id": 1, "question": "caf\xe9 sign?", "labels": "open", "image_path": "a.jpg"}]')
    with pytest.warns(UserWarning, match="not UTF-8"):
        [record] = read_dataset(path)
    assert record.question == "caf\ufffd sign?"


def test_multiple_choice_options_from_field_or_question_lines():
    vstar = Record("v", "What color?\n(A) red\n(B) blue\nAnswer with the letter.", ("A",), "a.jpg")
    listed = Record("l", "What color?", ("red",), "a.jpg", options=("red", "blue"))
    assert record_options(vstar) == ("(A) red", "(B) blue")
    assert record_options(listed) == ("red", "blue")
    check_options([vstar, listed])
    with pytest.raises(DatasetError, match=r"metric 'mc' needs at least 2 choices.*'plain'"):
        check_options([vstar, Record("plain", "What color?", ("red",), "a.jpg")])
