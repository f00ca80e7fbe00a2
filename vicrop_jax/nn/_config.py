"""Helpers shared by the towers' `from_hf_config` readers: refuse what we do not implement."""

from __future__ import annotations

from typing import Any, Mapping

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# Optional key of a composite model's config.json: the LM layer its ViCrop maps read by default.
MAP_LAYER_KEY = "vicrop_attention_layer"


def check_supported(hf: Mapping[str, Any], where: str, allowed: Mapping[str, tuple]) -> None:
    """Raise if a config attribute that changes the computation has a value we do not implement."""
    for key, values in allowed.items():
        value = hf.get(key)
        if value not in values:
            shown = ", ".join(repr(v) for v in values if v is not None)
            raise ValueError(
                f"{where}.{key} = {value!r} is not supported by vicrop_jax (supported: {shown}). "
                "Convert a checkpoint of a supported architecture, or open an issue with the config."
            )


def get_rope_parameters(hf: Mapping[str, Any]) -> dict[str, Any]:
    """RoPE settings from either transformers 5 `rope_parameters` or the older `rope_theta`/`rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    if not params:
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"text_config rope type {rope_type!r} is not supported by vicrop_jax "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})."
        )
    params["rope_type"] = rope_type
    params.setdefault("rope_theta", 10000.0)
    return params
