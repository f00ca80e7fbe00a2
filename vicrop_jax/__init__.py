"""vicrop_jax: LLaVA-1.5, InstructBLIP and Qwen2.5-VL in JAX/Flax, for ViCrop (training-free visual cropping).

Public API:
- `load(path_or_repo_id, dtype="auto") -> Model`: a Hugging Face LLaVA-1.5 or InstructBLIP-Vicuna
  checkpoint folder (or a repo id in the local HF cache), converted through explicit key tables.
- `generate(model, images, prompt, max_new_tokens=20) -> str`: the greedy answer, prompt excluded.
- `importance_map(model, image, question, method, **options) -> np.ndarray`: rel_att, grad_att, pure_grad.
- Methods as values: `RelAtt(layer=..., heads=...)`, `GradAtt(clip_negative=...)`, `PureGrad()`, `ByConfidence()`
  (method "auto": rel-att's or grad-att's crop, whichever answer is surer), and the baselines `NoCrop()`,
  `GroundTruth()`, `RandomCrop()`, `CenterCrop()`; `method=` takes a value or its name. Map methods take
  `regions=K` or "auto", `gate=` and `geometry=` (`Geometry.PAPER` or `EXACT`). The competing zoom strategies
  on the same backbone: `Focus()` (FOCUS, "focus") and `ZoomSearch()` (ZoomEye's search, "zoom_search"), which
  look for `answer(..., target=)`.
- `select_bbox(importance, image_size, base_size, frame=None) -> (x1, y1, x2, y2)`: the paper's box selection;
  `select_boxes(..., regions=K)`: K boxes, each with the earlier boxes' cells suppressed.
- `answer(model, image, question, method="rel_att", ...) -> Answer`: ViCrop end to end, one jitted program;
  `Answer.cost` counts the model passes it took.
- `answer_batch(model, images, questions, method="rel_att", ...) -> list[Answer]`: the same, vmapped; records
  that cannot run raise `BatchError` after the others are answered.
- `viz.overlay(image, importance, bbox, path)`: the map over the image, the box drawn.
- `sharding.load_sharded` / `sharding.shard_model`: tensor-parallel placement over a device mesh.
- `evaluation`: dataset readers, metrics and the resumable runner behind `vicrop-jax eval` / `score`.

Everything else is importable for research use but private by convention.
"""

from vicrop_jax import viz
from vicrop_jax._generation import generate
from vicrop_jax._loading import Model, load
from vicrop_jax.vicrop._api import BatchError, answer, answer_batch, importance_map
from vicrop_jax.vicrop.boxes import select_bbox, select_boxes
from vicrop_jax.vicrop.methods import (
    ByConfidence, CenterCrop, Geometry, GradAtt, GroundTruth, MapMethod, NoCrop, PureGrad, RandomCrop, RelAtt,
    Strategy,
)
from vicrop_jax.vicrop.strategy import Answer, Cost
from vicrop_jax.vicrop.zoom import AnswerViews, Focus, ZoomSearch

__all__ = [
    "Answer", "AnswerViews", "BatchError", "ByConfidence", "CenterCrop", "Cost", "Focus", "Geometry", "GradAtt",
    "GroundTruth", "MapMethod", "Model", "NoCrop", "PureGrad", "RandomCrop", "RelAtt", "Strategy", "ZoomSearch",
    "answer", "answer_batch", "generate", "importance_map", "load", "select_bbox", "select_boxes", "viz",
]
__version__ = "0.1.0"
