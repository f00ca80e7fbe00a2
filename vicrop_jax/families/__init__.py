"""Model families as values. Adding a family: one module defining a `Family` subclass and its instance, and one
entry in `FAMILIES`; or, without touching the library, `vicrop_jax.load(folder, family=MyFamily(...))`."""

from __future__ import annotations

from typing import Any, Mapping

from vicrop_jax.families._base import Family, PromptArrays, stack_arrays
from vicrop_jax.families.instructblip import INSTRUCTBLIP, InstructBlipFamily
from vicrop_jax.families.llava import LLAVA, LlavaFamily
from vicrop_jax.families.qwen2_5_vl import QWEN2_5_VL, QwenFamily

# config.json's model_type -> family
FAMILIES: Mapping[str, Family] = {"llava": LLAVA, "instructblip": INSTRUCTBLIP, "qwen2_5_vl": QWEN2_5_VL}


def family_for(hf_config: Mapping[str, Any]) -> Family:
    """The family of a checkpoint's config.json, refusing a model_type no family handles."""
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} is not supported: vicrop_jax loads {', '.join(map(repr, FAMILIES))} "
            "checkpoints (LLaVA-1.5, InstructBLIP-Vicuna, Qwen2.5-VL), or any other through load(..., family=...)"
        )
    return FAMILIES[model_type]


__all__ = ["FAMILIES", "Family", "INSTRUCTBLIP", "InstructBlipFamily", "LLAVA", "LlavaFamily", "PromptArrays",
           "QWEN2_5_VL", "QwenFamily", "family_for", "stack_arrays"]
