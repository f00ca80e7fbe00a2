"""vicrop_jax: LLaVA-1.5 and InstructBLIP in JAX/Flax, for ViCrop (training-free visual cropping).

Public API:
- `load(path_or_repo_id, dtype="float32") -> Model`: a Hugging Face checkpoint folder (or a repo id in
  the local HF cache), converted through explicit key tables.
- `generate(model, images, prompt, max_new_tokens=20) -> str`: the greedy answer, prompt excluded.

Everything else is importable for research use but private by convention.
"""

from vicrop_jax._generation import generate
from vicrop_jax._loading import Model, load

__all__ = ["Model", "generate", "load"]
__version__ = "0.1.0"
