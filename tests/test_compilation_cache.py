"""The persistent compilation cache: a second process reads the programs the first one compiled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from vicrop_jax.compilation_cache import default_cache_folder, enable_compilation_cache

# One ViCrop answer on the embedded model; prints how many compilations came from the cache and how many missed.
ANSWER_ONCE = """
import json, sys
import jax.monitoring
counts = {"hits": 0, "misses": 0}
names = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "misses"}
jax.monitoring.register_event_listener(lambda event, **_: names.get(event) and counts.__setitem__(
    names[event], counts[names[event]] + 1))
import vicrop_jax
from vicrop_jax.testing.synthetic import make_record
model = vicrop_jax.load("vicrop-tiny", compilation_cache=sys.argv[1] == "on")
record = make_record(2, 25)
result = vicrop_jax.answer(model, record.image, record.question, "rel_att")
print(json.dumps({**counts, "answer": result.answer}))
"""


def answer_in_a_new_process(cache_home: Path, cache: str = "on") -> dict:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home)}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    done = subprocess.run([sys.executable, "-c", ANSWER_ONCE, cache], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_cache_folder_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_folder() == tmp_path / "vicrop_jax" / "jax-compilation-cache"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_folder() == Path.home() / ".cache" / "vicrop_jax" / "jax-compilation-cache"


def test_a_folder_the_user_chose_is_kept(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
    try:
        assert enable_compilation_cache(tmp_path / "other") == tmp_path / "mine"
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
    assert not (tmp_path / "other").exists()


@pytest.mark.slow
def test_a_second_process_compiles_nothing_the_first_compiled(tmp_path):
    first = answer_in_a_new_process(tmp_path)
    assert first["misses"] > 0 and first["hits"] == 0
    assert any((tmp_path / "vicrop_jax" / "jax-compilation-cache").iterdir())
    second = answer_in_a_new_process(tmp_path)
    assert second["misses"] == 0 and second["hits"] == first["misses"]
    assert second["answer"] == first["answer"]
    opted_out = answer_in_a_new_process(tmp_path / "elsewhere", cache="off")
    assert opted_out["hits"] == opted_out["misses"] == 0
    assert not (tmp_path / "elsewhere").exists()
