"""benchmarks/gpu_check.sh --dry-run on the CPU, so that the GPU check cannot rot between GPU runs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_dry_run_writes_every_figure(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    figures = {(f["shape"], f["method"], f["batch"], f["kernel"]): f for f in report["figures"]}
    shapes = ("tiny", "qwen-tiny")  # a LLaVA-1.5 and a Qwen2.5-VL shape
    assert set(figures) == {(s, m, b, k) for s in shapes for m in ("none", "rel_att") for b in (1, 2)
                            for k in ("explicit", "fused")}
    assert report["skipped"] == [] and all(report["models"][shape]["parameters"] > 0 for shape in shapes)
    for figure in figures.values():
        assert figure["seconds_per_question"]["median"] > 0
        assert figure["flops_per_question"] > 0
    # a ViCrop answer does at least the work of two plain answers (a map pass, then the crop as a second image)
    for shape in shapes:
        assert figures[shape, "rel_att", 1, "explicit"]["flops_per_question"] > 2 * figures[
            shape, "none", 1, "explicit"]["flops_per_question"]
    assert not (tmp_path / "gpu_check.json.partial").exists()
