"""`vicrop-jax eval` and `score` end to end on a tiny random LLaVA: a run killed with SIGKILL resumes to
the results of an uninterrupted one, 8 simulated devices give the results of one, bad inputs fail alone,
processes split the records and `score` merges their files."""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vicrop_jax
from vicrop_jax.cli import main
from vicrop_jax.evaluation.datasets import Record
from vicrop_jax.evaluation import progress
from vicrop_jax.evaluation.progress import progress_bar
from vicrop_jax.evaluation.runner import Prepared, answer_or_error
from vicrop_jax.evaluation.scoring import score
from vicrop_jax.testing.hf_models import llava_config, save_llava

QUESTION = "What is the color of the small shape ?"
RECORDS = 12
COMPARED = ("question", "labels", "original_answer", "crop_answer", "bbox", "original_correct", "crop_correct",
            "area_fraction", "error")
POSITIONS = 512  # the tiny model's max_position_embeddings: a 5,000-character question does not fit


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llava")
    config = llava_config(image_size=56, text_layers=3)
    config.text_config.max_position_embeddings = POSITIONS
    save_llava(folder, config)
    return folder


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory) -> tuple[Path, Path]:
    """12 photos of 2000x1500 noise: decoding and cropping them makes a batch slow enough to kill mid-run."""
    folder = tmp_path_factory.mktemp("bench")
    (folder / "images").mkdir()
    records = []
    for i in range(RECORDS):
        pixels = np.random.RandomState(i).randint(0, 255, (1500, 2000, 3), np.uint8)
        Image.fromarray(pixels).save(folder / "images" / f"{i}.jpg", quality=90)
        records.append({"id": f"q{i}", "question": QUESTION, "labels": ["red"] * 10, "image_path": f"{i}.jpg",
                        "bbox": [100, 100, 100 + 40 * (i + 1), 300]})
    (folder / "bench.json").write_text(json.dumps(records))
    return folder / "bench.json", folder / "images"


def eval_args(checkpoint: Path, data: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "--data", str(data), "--images", str(images), "--model", str(checkpoint),
            "--method", "rel_att", "--batch-size", "2", "--out", str(out), *extra]


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_id(lines: list[dict]) -> dict:
    return {line["id"]: {key: line.get(key) for key in COMPARED} for line in lines}


@pytest.fixture(scope="module")
def reference(checkpoint, benchmark, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("reference") / "results.jsonl"
    assert main(eval_args(checkpoint, *benchmark, out)) == 0
    lines = read_lines(out)
    assert [line["id"] for line in lines] == [f"q{i}" for i in range(RECORDS)]
    return lines


def test_result_lines_hold_the_spec_fields(reference):
    line = reference[3]
    assert line["dataset"] == "bench" and line["method"] == "rel_att" and line["metric"] == "vqa"
    assert line["error"] is None and isinstance(line["crop_answer"], str) and len(line["bbox"]) == 4
    assert line["original_correct"] in (0.0, 0.3, 0.6, 0.9, 1.0) and line["timing"]["total"] > 0
    timing = line["timing"]
    assert timing["batch_records"] == 2 and timing["batch"] == pytest.approx(2 * timing["total"])
    assert line["run"]["metric"] == "vqa" and line["run"]["layer"] is None and len(line["run"]["model_id"]) == 16
    assert line["area_fraction"] == pytest.approx(160 * 200 / (2000 * 1500))


def test_the_runner_answers_as_answer_batch_does(checkpoint, benchmark, reference):
    data, images = benchmark
    model = vicrop_jax.load(checkpoint)
    answers = vicrop_jax.answer_batch(model, [images / f"{i}.jpg" for i in range(4)], [QUESTION] * 4, "rel_att",
                                      batch_size=2)
    assert [(a.original_answer, a.answer, list(a.bbox)) for a in answers] == [
        (line["original_answer"], line["crop_answer"], line["bbox"]) for line in reference[:4]]


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_uninterrupted_results(checkpoint, benchmark, reference, tmp_path):
    out = tmp_path / "results.jsonl"
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "wb") as errors:
        process = subprocess.Popen([sys.executable, "-m", "vicrop_jax.cli", *eval_args(checkpoint, *benchmark, out)],
                                   stdout=subprocess.DEVNULL, stderr=errors)
    deadline = time.monotonic() + 240
    while not (out.exists() and out.read_bytes().count(b"\n") >= 1):
        assert process.poll() is None, stderr.read_text()
        assert time.monotonic() < deadline, "the run wrote no result in time"
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = out.read_bytes().count(b"\n")
    assert 1 <= written < RECORDS, "the kill came too late to interrupt the run"
    with open(out, "ab") as results:  # as if the kill had landed in the middle of a write
        results.write(b'{"id": "q11", "question": "What is')
    assert main(eval_args(checkpoint, *benchmark, out)) == 0
    lines = read_lines(out)
    assert len(lines) == RECORDS and len({line["id"] for line in lines}) == RECORDS
    assert by_id(lines) == by_id(reference)
    assert main(eval_args(checkpoint, *benchmark, out)) == 0  # nothing left to do: nothing appended
    assert len(read_lines(out)) == RECORDS


@pytest.mark.slow
def test_eight_devices_give_the_results_of_one(checkpoint, benchmark, reference, tmp_path):
    out = tmp_path / "results.jsonl"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    done = subprocess.run([sys.executable, "-m", "vicrop_jax.cli", *eval_args(checkpoint, *benchmark, out),
                           "--limit", "8"], env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr
    assert "batch size 2 -> 8: a multiple of the 8 local devices" in done.stderr
    assert by_id(read_lines(out)) == by_id(reference[:8])


def bad_inputs(folder: Path) -> Path:
    """One record per way an input can be bad, plus good ones; the JSON holds a byte that is not UTF-8."""
    images = folder / "images"
    images.mkdir()
    noise = lambda h, w, seed=0: np.random.RandomState(seed).randint(0, 255, (h, w, 3), np.uint8)
    Image.fromarray(noise(90, 120)).save(images / "good.png")
    (images / "empty.jpg").write_bytes(b"")
    Image.fromarray(noise(300, 400)).save(images / "full.jpg")
    (images / "truncated.jpg").write_bytes((images / "full.jpg").read_bytes()[:2000])
    Image.fromarray(noise(1, 1)).save(images / "tiny.png")
    Image.fromarray(noise(50, 10000)).save(images / "wide.png")
    Image.fromarray(np.random.RandomState(1).randint(0, 65535, (80, 100), np.uint16)).save(images / "deep.png")
    Image.fromarray(noise(80, 100)).convert("CMYK").save(images / "cmyk.jpg")
    assert Image.open(images / "deep.png").mode.startswith("I") and Image.open(images / "cmyk.jpg").mode == "CMYK"
    cases = [("missing", QUESTION, "missing.jpg"), ("zero_bytes", QUESTION, "empty.jpg"),
             ("truncated", QUESTION, "truncated.jpg"), ("one_pixel", QUESTION, "tiny.png"),
             ("wide", QUESTION, "wide.png"), ("sixteen_bit", QUESTION, "deep.png"),
             ("cmyk", QUESTION, "cmyk.jpg"), ("empty_question", "  ", "good.png"),
             ("long_question", ("red " * 1250).strip(), "good.png"), ("not_utf8", "What is NOTUTF8 ?", "good.png"),
             ("good", QUESTION, "good.png")]
    records = [{"id": name, "question": q, "labels": "red", "image_path": path} for name, q, path in cases]
    data = folder / "bad.json"
    data.write_bytes(json.dumps(records).encode().replace(b"NOTUTF8", b"\xff"))
    return data


@pytest.mark.slow
def test_bad_inputs_fail_alone_and_the_exit_status_says_so(checkpoint, tmp_path, capsys):
    data = bad_inputs(tmp_path)
    out = tmp_path / "results.jsonl"
    with pytest.warns(UserWarning, match="not UTF-8"):
        status = main(eval_args(checkpoint, data, tmp_path / "images", out, "--metric", "gqa"))
    assert status == 1
    lines = {line["id"]: line for line in read_lines(out)}
    assert len(lines) == 11
    errors = {name: line["error"] for name, line in lines.items() if line["error"] is not None}
    assert set(errors) == {"missing", "zero_bytes", "truncated", "empty_question", "long_question"}
    assert errors["missing"].startswith("image not found:") and "missing.jpg" in errors["missing"]
    assert "empty.jpg" in errors["zero_bytes"] and "truncated.jpg" in errors["truncated"]
    assert errors["empty_question"] == "empty question"
    assert re.fullmatch(rf"question too long: \d+ tokens, model allows {POSITIONS} .*", errors["long_question"])
    for name in ("one_pixel", "wide", "sixteen_bit", "cmyk", "not_utf8", "good"):
        assert isinstance(lines[name]["crop_answer"], str) and lines[name]["crop_correct"] in (0.0, 1.0)
    assert lines["not_utf8"]["question"] == "What is \ufffd ?"
    summary = capsys.readouterr().out
    assert "11 records" in summary and "6 answered, 5 failed" in summary
    assert "failed id 'missing': image not found" in summary
    kinds = {name: line["error_kind"] for name, line in lines.items() if line["error"] is not None}
    assert kinds == {"missing": "image_missing", "zero_bytes": "image_unreadable", "truncated": "image_unreadable",
                     "empty_question": "question", "long_question": "question"}
    assert "2 failed: image_unreadable (the image file cannot be decoded)" in summary
    assert "2 failed: question (" in summary and "1 failed: image_missing (" in summary


def test_a_raising_batch_is_retried_record_by_record():
    prepared = [Prepared(i, Record(name, "q", ("a",), "x.jpg")) for i, name in enumerate(["ok", "bad", "fine"])]

    def answer_fn(batch):
        if any(p.record.id == "bad" for p in batch):
            raise RuntimeError("device failure")
        return [f"answer {p.record.id}" for p in batch]

    assert answer_or_error(answer_fn, prepared) == ["answer ok", "RuntimeError: device failure", "answer fine"]


def test_usage_and_input_errors_exit_with_2(checkpoint, benchmark, tmp_path, capsys):
    data, images = benchmark
    assert main(eval_args(checkpoint, tmp_path / "none.json", images, tmp_path / "r.jsonl")) == 2
    assert main(eval_args(checkpoint, data, tmp_path / "no_images", tmp_path / "r.jsonl")) == 2
    assert main(eval_args(checkpoint, data, images, tmp_path / "r.jsonl", "--process-index", "1")) == 2
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "q0", "method": "grad_att", "model": str(checkpoint), "metric": "vqa"}) + "\n")
    assert main(eval_args(checkpoint, data, images, other)) == 2
    errors = capsys.readouterr().err
    assert "none.json not found" in errors and "no_images not found" in errors
    assert "pass both --process-index and --process-count" in errors
    assert "is not a result line that records its run's settings" in errors


def test_a_resume_with_other_settings_is_refused(checkpoint, benchmark, reference, tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    out.write_text(json.dumps(reference[0]) + "\n")
    for extra, differing in ((["--layer", "0"], "layer None there, 0 now"),
                             (["--max-new-tokens", "5"], "max_new_tokens 20 there, 5 now"),
                             (["--dtype", "bfloat16"], "dtype 'auto' there, 'bfloat16' now"),
                             (["--metric", "gqa"], "metric 'vqa' there, 'gqa' now")):
        assert main(eval_args(checkpoint, *benchmark, out, *extra)) == 2
        assert differing in capsys.readouterr().err
    assert len(read_lines(out)) == 1  # nothing appended
    assert main(eval_args(checkpoint, *benchmark, out, "--limit", "2")) == 0  # the same settings resume
    assert [line["id"] for line in read_lines(out)] == ["q0", "q1"]


def test_a_second_writer_is_refused(checkpoint, benchmark, tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from vicrop_jax.evaluation.results import exclusive_writer\n"
         "with exclusive_writer(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(eval_args(checkpoint, *benchmark, out, "--limit", "2")) == 2
        assert f"another process is writing {out}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert out.read_text() == ""


def test_boxes_paths_and_outputs_that_cannot_be_used(checkpoint, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(images / "a.png")
    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(tmp_path / "outside.png")
    (images / "link.png").symlink_to(tmp_path / "outside.png")
    base = {"question": QUESTION, "labels": "red"}
    records = [{**base, "id": "inside", "image_path": "a.png", "bbox": [70, 50, 500, 500]},
               {**base, "id": "beyond", "image_path": "a.png", "bbox": [100, 100, 200, 200]},
               {**base, "id": "parent", "image_path": "../outside.png"},
               {**base, "id": "absolute", "image_path": str(tmp_path / "outside.png")},
               {**base, "id": "link", "image_path": "link.png"}]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "r.jsonl"
    assert main(eval_args(checkpoint, data, images, out)) == 1
    lines = {line["id"]: line for line in read_lines(out)}
    assert lines["inside"]["error"] is None and lines["inside"]["gt_bbox"] == [70, 50, 80, 60]  # clipped
    assert lines["inside"]["metric"] == "gqa"  # single labels: containment
    assert lines["beyond"]["error"] == "bbox [100.0, 100.0, 200.0, 200.0] lies outside the 80x60 image"
    for name in ("parent", "absolute", "link"):
        assert "leaves the image folder" in lines[name]["error"] and "--allow-outside-images" in lines[name]["error"]
    assert "accuracy (label contained, once per record)" in capsys.readouterr().out
    allowed = tmp_path / "allowed.jsonl"
    assert main(eval_args(checkpoint, data, images, allowed, "--allow-outside-images")) == 1
    assert all(line["error"] is None for line in read_lines(allowed) if line["id"] != "beyond")
    (tmp_path / "infinite.json").write_text(json.dumps([{**records[0], "bbox": [0, 0, float("inf"), 10]}]))
    assert main(eval_args(checkpoint, tmp_path / "infinite.json", images, tmp_path / "i.jsonl")) == 2
    assert "record [0] (id 'inside'): field 'bbox': expected [x1, y1, x2, y2] finite numbers" in capsys.readouterr().err
    (tmp_path / "utf16.json").write_bytes(json.dumps(records).encode("utf-16"))
    assert main(eval_args(checkpoint, tmp_path / "utf16.json", images, tmp_path / "u.jsonl")) == 2
    assert "is UTF-16 or UTF-32 text; expected UTF-8" in capsys.readouterr().err
    assert main(eval_args(checkpoint, data, images, tmp_path)) == 2
    assert f"--out {tmp_path} is a folder" in capsys.readouterr().err


def test_processes_split_the_records_and_score_merges_their_files(checkpoint, benchmark, reference, tmp_path,
                                                                  capsys):
    out = tmp_path / "results.jsonl"
    for index in (0, 1):
        assert main(eval_args(checkpoint, *benchmark, out, "--limit", "6", "--process-index", str(index),
                              "--process-count", "2")) == 0
    parts = [read_lines(tmp_path / f"results.process{i}-of-2.jsonl") for i in (0, 1)]
    assert [line["id"] for line in parts[0]] == ["q0", "q2", "q4"]
    assert [line["id"] for line in parts[1]] == ["q1", "q3", "q5"]
    assert by_id(parts[0] + parts[1]) == by_id(reference[:6])
    capsys.readouterr()
    assert main(["score", str(out), "--format", "csv"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "model,method,bench (vqa)"
    crop = 100 * np.mean([line["crop_correct"] for line in reference[:6]])
    assert table[1].startswith(f"{checkpoint.name},no crop,") and table[2] == f"{checkpoint.name},rel_att,{crop:.2f}"


def result(model, method, dataset, id_, original, crop, area=None, error=None) -> dict:
    line = {"id": id_, "dataset": dataset, "method": method, "model": model, "original_correct": original,
            "crop_correct": crop, "error": error}
    return line if area is None else {**line, "area_fraction": area}


def test_score_tables_merge_files_and_split_by_size(tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "textvqa.process1-of-2.jsonl"
    lines = [result("org/llava", "rel_att", "vstar", f"v{i}", int(i >= 3), 1, area=a)
             for i, a in enumerate([0.001, 0.002, 0.01, 0.02, 0.1, 0.2])]
    lines += [result("org/llava", "grad_att", "vstar", "v0", 0, 0, area=0.001)]
    first.write_text("".join(json.dumps(line) + "\n" for line in lines))
    second.write_text("".join(json.dumps({**line, "dataset": None}) + "\n" for line in [
        result("org/llava", "rel_att", "", "t0", 0.3, 0.6), result("org/llava", "rel_att", "", "t1", 0.0, 1.0),
        result("org/llava", "rel_att", "", "t1", 0.0, 0.0), result("org/llava", "rel_att", "", "t2", None, None,
                                                                    error="image not found: x.jpg"),
    ]) + '{"id": "t3", "partial')
    stdout, stderr = io.StringIO(), io.StringIO()
    assert score([first, second], "markdown", stdout, stderr) == 0
    text = stdout.getvalue()
    assert "| model | method | vstar | textvqa |" in text
    assert "| llava | no crop | 50.00 | 15.00 |" in text
    assert "| llava | rel_att | 100.00 | 80.00 |" in text
    assert "| llava | grad_att | 0.00 | - |" in text
    assert "small (n=2)" in text and "medium (n=2)" in text and "tercile 1 <0.01 (n=2)" in text
    assert "| llava | no crop | 0.00 | 50.00 | 100.00 | 0.00 | 50.00 | 100.00 |" in text
    assert "note: 1 failed record(s) left out: llava rel_att textvqa" in text
    assert "note: llava grad_att vstar covers 1 of 6 records" in text
    assert "note: 1 duplicate line(s) dropped" in text
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text(json.dumps({"id": 1, "answer": "x"}) + "\n")
    with pytest.raises(ValueError, match="line 1 is not an eval result: it has no model, method, original_correct"):
        score([foreign])
    foreign.write_text(json.dumps(result("org/llava", "rel_att", "vstar", "v0", "yes", 1)) + "\n")
    with pytest.raises(ValueError, match="line 1 is not an eval result: wrongly typed original_correct 'yes'"):
        score([foreign])


def test_score_keeps_two_checkpoints_of_one_name_apart(tmp_path):
    lines = [result("runs/a/llava", "rel_att", "vstar", "v0", 0, 1),
             result("runs/b/llava", "rel_att", "vstar", "v0", 1, 0),
             {**result("llava", "rel_att", "vstar", "v0", 1, 1), "run": {"model_id": "0123456789abcdef"}},
             {**result("llava", "rel_att", "vstar", "v0", 0, 0), "run": {"model_id": "fedcba9876543210"}}]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    stdout = io.StringIO()
    assert score([path], "markdown", stdout, io.StringIO()) == 0
    text = stdout.getvalue()
    assert "| a/llava | rel_att | 100.00 |" in text and "| b/llava | rel_att | 0.00 |" in text
    assert "| llava (01234567) | rel_att | 100.00 |" in text and "| llava (fedcba98) | rel_att | 0.00 |" in text


def test_the_progress_bar_writes_whole_lines_to_a_log(monkeypatch):
    """Without a terminal: no carriage returns, the resumed start and the end, refreshes no more often than
    LOG_INTERVAL_S (here every update, by setting it to 0)."""
    log = io.StringIO()
    bar = progress_bar("eval", 120, done=30, stream=log)
    bar.set_postfix_str("3 failed, accuracy 50.0%", refresh=False)
    bar.update(90)
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and lines
    assert lines[0].startswith("eval:  25%") and "30/120" in lines[0]
    assert lines[-1].startswith("eval: 100%") and "120/120" in lines[-1] and "3 failed, accuracy 50.0%" in lines[-1]
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    log = io.StringIO()
    bar = progress_bar("eval", 3, stream=log)
    for _ in range(3):
        bar.update(1)
    bar.close()
    shown = [line.split("|")[0] for line in log.getvalue().splitlines()]
    assert [percent for percent, _ in itertools.groupby(shown)] == [  # closing shows the end once more
        "eval:   0%", "eval:  33%", "eval:  67%", "eval: 100%"]


def test_an_unwritable_output_or_a_full_disk_exits_with_2_and_keeps_what_was_written(checkpoint, benchmark,
                                                                                      tmp_path, monkeypatch, capsys):
    from vicrop_jax.evaluation import results, runner

    out = tmp_path / "r.jsonl"

    def read_only(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(results, "open", read_only, raising=False)
    assert main(eval_args(checkpoint, *benchmark, out, "--limit", "2")) == 2
    assert f"cannot write {out}: permission denied" in capsys.readouterr().err
    monkeypatch.undo()
    appended = []

    def fill_up(handle, lines):
        if appended:
            raise OSError(28, "No space left on device")
        appended.append(lines)
        results.append_results(handle, lines)

    monkeypatch.setattr(runner, "append_results", fill_up)
    assert main(eval_args(checkpoint, *benchmark, out, "--limit", "4")) == 2
    assert "No space left on device; free space and rerun to resume" in capsys.readouterr().err
    assert [line["id"] for line in read_lines(out)] == ["q0", "q1"]  # the first batch stays
    monkeypatch.undo()
    assert main(eval_args(checkpoint, *benchmark, out, "--limit", "4")) == 0
    assert [line["id"] for line in read_lines(out)] == ["q0", "q1", "q2", "q3"]
