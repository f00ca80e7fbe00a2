"""A thin wrapper over a `tokenizers` tokenizer.json, with the BOS policy of the checkpoint."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    backend: _HFTokenizer
    bos_id: int | None
    eos_id: int | None
    add_bos: bool

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        """Read tokenizer.json (+ tokenizer_config.json for the BOS policy) of a HF checkpoint folder."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: vicrop_jax reads fast tokenizers only. Re-save the checkpoint's tokenizer "
                "with transformers (`AutoTokenizer.from_pretrained(folder).save_pretrained(folder)`)."
            )
        backend = _HFTokenizer.from_file(str(path))
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        token_id = lambda t: backend.token_to_id(t["content"] if isinstance(t, dict) else t) if t else None
        return cls(
            backend=backend,
            bos_id=token_id(config.get("bos_token")),
            eos_id=token_id(config.get("eos_token")),
            add_bos=bool(config.get("add_bos_token", False)),
        )

    def encode(self, text: str) -> list[int]:
        """Token ids as the checkpoint's processor makes them (special tokens on, BOS when configured)."""
        ids = self.backend.encode(text, add_special_tokens=True).ids
        if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=True).strip()
