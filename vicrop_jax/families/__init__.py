"""Model families as values. Adding a family: one module defining a `Family` subclass and its instance, and one
entry in `FAMILIES`; or, without touching the library, `vicrop_jax.load(folder, family=MyFamily(...))`."""

from __future__ import annotations

from typing import Any, Mapping

from vicrop_jax.families._base import Family, PromptArrays
from vicrop_jax.families.instructblip import INSTRUCTBLIP, InstructBlipFamily
from vicrop_jax.families.llava import LLAVA, LlavaFamily

FAMILIES: Mapping[str, Family] = {"llava": LLAVA, "instructblip": INSTRUCTBLIP}  # config.json model_type -> family


def family_for(hf_config: Mapping[str, Any]) -> Family:
    """The family of a checkpoint's config.json, refusing a model_type no family handles."""
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} is not supported: vicrop_jax loads {', '.join(map(repr, FAMILIES))} "
            "checkpoints (LLaVA-1.5, InstructBLIP-Vicuna), or any other through load(..., family=...)"
        )
    return FAMILIES[model_type]


__all__ = ["FAMILIES", "Family", "INSTRUCTBLIP", "InstructBlipFamily", "LLAVA", "LlavaFamily", "PromptArrays",
           "family_for"]
