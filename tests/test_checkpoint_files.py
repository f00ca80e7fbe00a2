"""Every file layout transformers writes loads the same model; every damaged file is named with what is wrong."""

from __future__ import annotations

import json
import shutil
import stat

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util

import vicrop_jax
from vicrop_jax.cli import main as cli_main
from vicrop_jax.testing.hf_models import (
    PROCESSOR_LAYOUTS, instructblip_config, llava_config, noise_image, save_instructblip, save_llava,
)
from vicrop_jax.prompts import instructblip_prompt, llava_prompt
from weights_conversion.safetensors_io import open_checkpoint, write_checkpoint

SAVERS = {
    "llava": (lambda folder, layout: save_llava(folder, llava_config(), layout=layout), llava_prompt("What ?")),
    "instructblip": (lambda folder, layout: save_instructblip(folder, instructblip_config(), layout=layout),
                     instructblip_prompt("What ?")),
}


def flat(params):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(params)).items()}


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava")
    save_llava(folder, llava_config())
    return folder


@pytest.mark.parametrize("family", SAVERS)
def test_every_processor_layout_transformers_writes_loads_the_same_model(family, tmp_path):
    save, prompt = SAVERS[family]
    models = {}
    for layout in PROCESSOR_LAYOUTS:
        save(tmp_path / layout, layout)
        models[layout] = vicrop_jax.load(tmp_path / layout)
    assert not (tmp_path / "processor" / "preprocessor_config.json").exists()
    assert (tmp_path / "processor" / "processor_config.json").exists()
    reference = models["image_processor"]
    answer = vicrop_jax.generate(reference, noise_image(), prompt)
    for layout, model in models.items():
        assert model.image_config == reference.image_config, layout
        assert vicrop_jax.generate(model, noise_image(), prompt) == answer, layout


def test_image_processor_files_that_disagree_are_refused(llava_folder, tmp_path):
    shutil.copytree(llava_folder, tmp_path, dirs_exist_ok=True)
    settings = json.loads((tmp_path / "preprocessor_config.json").read_text())
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": {**settings, "do_resize": False}}))
    with pytest.raises(ValueError, match="preprocessor_config.json and the image processor in processor_config.json "
                                         "disagree on do_resize"):
        vicrop_jax.load(tmp_path)


def damage_weights(folder, how: str) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbled header":
        path.write_bytes(data[:8] + b"#" * 16 + data[24:])
    elif how == "huge header length":
        path.write_bytes((2**40).to_bytes(8, "little") + data[8:])


@pytest.mark.parametrize("how, message", [
    ("empty", "it is 0 bytes long"),
    ("truncated", "tensor .* lies at bytes .* of a data section of"),
    ("garbled header", "its header is not JSON"),
    ("huge header length", "its header claims 1099511627776 bytes"),
])
def test_damaged_safetensors_are_named_with_what_is_wrong(llava_folder, tmp_path, how, message):
    shutil.copytree(llava_folder, tmp_path, dirs_exist_ok=True)
    damage_weights(tmp_path, how)
    path = tmp_path / "model.safetensors"
    with pytest.raises(ValueError, match=rf"{path} is not a valid safetensors file: {message}"):
        vicrop_jax.load(tmp_path)
    assert cli_main(["convert", str(tmp_path), str(tmp_path / "out")]) == 2


@pytest.mark.parametrize("text, message", [
    ("", "config.json is empty"),
    ('{"model_type": "llava",', r"config.json is not valid JSON \(Expecting"),
    ("[1, 2]", "config.json holds a JSON list"),
    (b"\xff\xfe{\x00}\x00", "config.json is not UTF-8 text"),
])
def test_a_broken_config_json_is_named(llava_folder, tmp_path, text, message):
    shutil.copytree(llava_folder, tmp_path, dirs_exist_ok=True)
    path = tmp_path / "config.json"
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    with pytest.raises(ValueError, match=rf"{tmp_path}/{message}"):
        vicrop_jax.load(tmp_path)


def test_an_index_naming_a_missing_shard_is_refused(tmp_path):
    save_llava(tmp_path, llava_config(), max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / gone).unlink()
    with pytest.raises(FileNotFoundError, match=f"names shard\\(s\\) that are not in the folder: {gone}"):
        vicrop_jax.load(tmp_path)


def test_non_finite_weights_are_named_when_checked(llava_folder, tmp_path):
    shutil.copytree(llava_folder, tmp_path, dirs_exist_ok=True)
    tensors = {key: np.array(value) for key, value in open_checkpoint(tmp_path).items()}
    key = sorted(k for k in tensors if k.endswith("multi_modal_projector.linear_1.weight"))[0]
    tensors[key][0, 0] = np.nan
    write_checkpoint(tensors, tmp_path)
    vicrop_jax.load(tmp_path)  # unchecked, as before
    with pytest.raises(ValueError, match=r"NaN or infinite weights in 1 tensor\(s\): multi_modal_projector/linear_1/k"):
        vicrop_jax.load(tmp_path, check_finite=True)
    assert cli_main(["convert", str(tmp_path), str(tmp_path / "out")]) == 2  # the CLI always checks


@pytest.mark.parametrize("fmt", ["orbax", "hf"])
def test_a_bfloat16_conversion_records_its_dtype_and_loads_as_bfloat16(llava_folder, tmp_path, fmt):
    out = tmp_path / "bf16"
    assert cli_main(["convert", str(llava_folder), str(out), "--dtype", "bfloat16", "--format", fmt]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = vicrop_jax.load(out)
    leaves = jax.tree_util.tree_leaves(model.params)
    assert {leaf.dtype for leaf in leaves} == {np.dtype(ml_dtypes.bfloat16)}
    assert vicrop_jax.load(out, dtype="float32").module.dtype == np.float32
    original = flat(vicrop_jax.load(llava_folder).params)
    for path, value in flat(model.params).items():
        np.testing.assert_array_equal(value, original[path].astype(ml_dtypes.bfloat16))
    for path in out.rglob("*"):
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044, path  # readable by group and others
