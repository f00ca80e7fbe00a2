"""Orbax checkpoints from `vicrop-jax convert`: the model of the HF folder, restored per device slice when sharded.

The sharded restore runs in a subprocess: the 8 simulated CPU devices come from an XLA flag that must be set
before jax initialises, and this test session has already initialised it with one device.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util

import vicrop_jax
from vicrop_jax._generation import pixel_values, prompt_inputs
from vicrop_jax._loading import checkpoint_identity
from vicrop_jax.cli import main as cli_main
from vicrop_jax.testing.devices import run_on_simulated_devices
from vicrop_jax.testing.hf_models import llava_config, noise_image, save_llava
from weights_conversion.core import CheckpointMismatchError

QUESTION = "What is the color of the small shape ?"
# When one of Orbax's concurrent reads of a damaged checkpoint fails, the others report to a closed event loop
# later, during whichever test runs next: that is all these warnings say.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def flat(params):
    return traverse_util.flatten_dict(jax.device_get(params))


def assert_same_params(a, b):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        assert fa[key].dtype == fb[key].dtype, key
        np.testing.assert_array_equal(fa[key], fb[key], err_msg="/".join(key))


def forward_logits(model, *param_trees):
    """The model's logits on one question about one image, with each parameter tree (compiled once)."""
    ids, image_text = prompt_inputs(model, model.family.prompt(QUESTION), 1)
    inputs = (np.array([ids], np.int32), pixel_values(model, [noise_image()])[None], *image_text)
    forward = jax.jit(lambda params, *x: model.module.apply({"params": params}, *x))
    return [np.asarray(forward(params, *inputs)) for params in param_trees]


def convert(source, out):
    assert cli_main(["convert", str(source), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def converted(tiny_model, tmp_path_factory):
    """(the model loaded from its HF folder, that folder converted to Orbax by the CLI), for each family."""
    return tiny_model, convert(tiny_model.path, tmp_path_factory.mktemp("orbax"))


@pytest.fixture(scope="module")
def llava_orbax(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava")
    save_llava(folder / "hf", llava_config())
    return convert(folder / "hf", folder / "orbax")


def test_an_orbax_conversion_loads_the_same_parameters_and_logits(converted):
    original, folder = converted
    assert (folder / "orbax_params").is_dir() and not list(folder.glob("*.safetensors"))
    model = vicrop_jax.load(folder)
    assert (model.family, model.config, model.module) == (original.family, original.config, original.module)
    assert_same_params(model.params, original.params)
    np.testing.assert_array_equal(*forward_logits(original, model.params, original.params))


@pytest.mark.slow
def test_an_orbax_conversion_gives_the_same_greedy_answer(converted):
    original, folder = converted
    prompt = original.family.prompt(QUESTION)
    answer = vicrop_jax.generate(original, noise_image(), prompt)
    assert answer and vicrop_jax.generate(vicrop_jax.load(folder), noise_image(), prompt) == answer


def test_a_float32_checkpoint_restores_as_bfloat16_like_the_hf_folder(converted):
    original, folder = converted
    assert_same_params(vicrop_jax.load(folder, dtype="bfloat16").params,
                       vicrop_jax.load(original.path, dtype="bfloat16").params)


def damage(folder: Path, how: str) -> None:
    params = folder / "orbax_params"
    data = sorted((path for path in params.rglob("*") if path.is_file() and path.parent.name == "d"),
                  key=lambda path: path.stat().st_size)
    assert data, "Orbax keeps its tensors in d/ folders"
    if how == "metadata deleted":
        (params / "_METADATA").unlink()
    elif how == "cut short before any file":
        shutil.rmtree(params)
        params.mkdir()
    elif how == "data deleted":
        for path in data:
            path.unlink()
    else:  # the largest file holds tensor chunks only: the metadata reads, the restore fails
        data[-1].write_bytes(b"\0" * data[-1].stat().st_size)


def damaged_message(folder: Path) -> str:
    return (rf"{re.escape(str(folder / 'orbax_params'))} is not a complete Orbax checkpoint \(.+\); it was probably "
            rf"cut short or damaged, so convert the checkpoint again \(`vicrop-jax convert SOURCE "
            rf"{re.escape(str(folder))}`\)")


@pytest.mark.parametrize("how", ["metadata deleted", "cut short before any file", "data deleted"])
def test_a_damaged_orbax_checkpoint_is_named_with_what_to_do(llava_orbax, tmp_path, how):
    folder = tmp_path / "damaged"
    shutil.copytree(llava_orbax, folder)
    damage(folder, how)
    with pytest.raises(ValueError) as error:
        vicrop_jax.load(folder)
    assert re.fullmatch(damaged_message(folder), str(error.value))
    assert cli_main(["convert", str(folder), str(tmp_path / "out")]) == 2


def test_damaged_tensor_chunks_are_named_by_the_cli(llava_orbax, tmp_path):
    """A process of its own: Orbax's other reads, failing with the first, may log their errors from their own
    threads (before or after the CLI's message); the message stays one whole line."""
    folder = tmp_path / "damaged"
    shutil.copytree(llava_orbax, folder)
    damage(folder, "chunks zeroed")
    run = subprocess.run([sys.executable, "-m", "vicrop_jax.cli", "convert", str(folder), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 2
    [message] = [line for line in run.stderr.splitlines() if "vicrop-jax convert: error:" in line]
    assert re.fullmatch(rf"vicrop-jax convert: error: {damaged_message(folder)}", message)


def test_an_orbax_checkpoint_of_another_model_is_refused_naming_each_tensor(llava_orbax, tmp_path):
    folder = tmp_path / "deeper"
    shutil.copytree(llava_orbax, folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] += 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError) as error:
        vicrop_jax.load(folder)
    message = str(error.value)
    assert "orbax_params does not match the model its config describes (9 problem(s))" in message
    assert "- missing    language_model/layers_2/self_attn/q_proj/kernel (expected shape (32, 32))" in message


def test_checkpoint_identity_tells_orbax_conversions_of_other_weights_apart(llava_orbax, tmp_path):
    save_llava(tmp_path / "hf", llava_config(), seed=1)
    other = convert(tmp_path / "hf", tmp_path / "orbax")
    assert (other / "config.json").read_text() == (llava_orbax / "config.json").read_text()
    assert checkpoint_identity(other) != checkpoint_identity(llava_orbax)
    assert checkpoint_identity(llava_orbax) == checkpoint_identity(llava_orbax)


SHARDED_SCRIPT = r"""
import json, sys, tempfile
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import jax, numpy as np
from jax.sharding import NamedSharding
import vicrop_jax
from vicrop_jax import sharding
from vicrop_jax._generation import pixel_values, prompt_inputs
from vicrop_jax.cli import main
from vicrop_jax.testing.hf_models import instructblip_config, llava_config, noise_image, save_instructblip, save_llava

kind = sys.argv[2]
folder = Path(tempfile.mkdtemp())
if kind == "llava":
    save_llava(folder / "hf", llava_config(width=64, vision_width=64, num_heads=8, num_kv_heads=8, image_size=56))
else:
    save_instructblip(folder / "hf", instructblip_config(image_size=56))
assert main(["convert", str(folder / "hf"), str(folder / "orbax")]) == 0
mesh = sharding.make_mesh()
plain = vicrop_jax.load(folder / "hf")
wanted = jax.tree.map(lambda spec: NamedSharding(mesh, spec), sharding.parameter_specs(plain.params, axis_size=8))
ids, image_text = prompt_inputs(plain, plain.family.prompt("What is the color of the small shape ?"), 1)
inputs = (np.array([ids], np.int32), pixel_values(plain, [noise_image()])[None], *image_text)
forward = jax.jit(lambda params, *x: plain.module.apply({"params": params}, *x))
logits = np.asarray(forward(plain.params, *inputs))
out = {"devices": len(jax.devices()), "logits_scale": float(np.abs(logits).max())}
for dtype in ("float32", "bfloat16"):
    restored = sharding.load_sharded(folder / "orbax", mesh, dtype).params
    leaves, shardings = jax.tree.leaves(restored), jax.tree.leaves(wanted)
    out[dtype] = {
        "as_specified": all(a.sharding.is_equivalent_to(s, a.ndim) for a, s in zip(leaves, shardings)),
        "split": sum(not a.sharding.is_fully_replicated for a in leaves),
        "dtypes": sorted({str(a.dtype) for a in leaves}),
        "values_equal": all(jax.tree.leaves(jax.tree.map(
            lambda a, b: np.array_equal(np.asarray(a), np.asarray(b).astype(a.dtype)), restored, plain.params))),
    }
    if dtype == "float32":
        out["logits_max_diff"] = float(np.abs(np.asarray(forward(restored, *inputs)) - logits).max())
print("RESULT " + json.dumps(out))
"""
KINDS = ("llava", "instructblip")


@pytest.fixture(scope="module")
def sharded_restores():
    root = str(Path(__file__).parent.parent)
    return run_on_simulated_devices(SHARDED_SCRIPT, {kind: [root, kind] for kind in KINDS})


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_a_sharded_restore_places_each_slice_as_specified_and_computes_the_same_logits(sharded_restores, kind):
    out = sharded_restores[kind]
    assert out["devices"] == 8
    for dtype in ("float32", "bfloat16"):
        assert out[dtype]["as_specified"], dtype
        assert out[dtype]["split"] > 0, "parameter_specs split nothing: the test model is too small to show a slice"
        assert out[dtype]["dtypes"] == [dtype]
        assert out[dtype]["values_equal"], dtype
    assert out["logits_max_diff"] < 1e-5 * max(1.0, out["logits_scale"])
