"""Benchmark evaluation: dataset readers, the paper's scores, `vicrop-jax eval` and `vicrop-jax score`.

- `datasets.read_dataset(path, dataset_format="auto")`: docs/method.md (Data) records (JSON list or JSONL) or the
  official TextVQA json, with every malformed record named.
- `metrics`: VQA accuracy with the official normalisation, GQA containment, multiple choice and POPE by
  string similarity, the paper's size bands.
- `runner.evaluate(EvalSettings(...))`: batched, resumable, data-parallel runs (see its docstring for
  multi-GPU and multi-host use); `scoring.score(paths)`: the paper's tables from result files.
"""

from vicrop_jax.evaluation.datasets import DatasetError, Record, read_dataset
from vicrop_jax.evaluation.metrics import normalize_answer, score_answer, vqa_accuracy
from vicrop_jax.evaluation.runner import EvalSettings, evaluate
from vicrop_jax.evaluation.scoring import score

__all__ = [
    "DatasetError", "EvalSettings", "Record", "evaluate", "normalize_answer", "read_dataset", "score",
    "score_answer", "vqa_accuracy",
]
