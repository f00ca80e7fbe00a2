"""The local task's hooks: the record's image and question as vicrop-jax eval reads them, and its metric."""

from pathlib import Path

from PIL import Image

from vicrop_jax.evaluation.metrics import score_answer


def doc_to_visual(doc: dict) -> list[Image.Image]:
    """The record's image, under images/ of the folder lmms-eval runs in (where data.json is)."""
    return [Image.open(Path("images") / doc["image_path"]).convert("RGB")]


def doc_to_text(doc: dict) -> str:
    """The question alone: the model's family wraps it in its paper prompt, as vicrop-jax eval does."""
    return doc["question"]


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """vicrop-jax eval's metric for single-word labels (GQA-style containment), so the two scores compare."""
    return {"gqa": score_answer("gqa", results[0], doc["labels"])}
