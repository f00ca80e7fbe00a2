"""Reading the JSON files of a Hugging Face checkpoint folder, with errors that name the file and what is wrong.

transformers writes the image processor's settings in `preprocessor_config.json` (`image_processor.save_pretrained`,
and every checkpoint published before transformers 5) or nested under `"image_processor"` in
`processor_config.json` (`processor.save_pretrained` in transformers 5); a folder may hold both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file; a missing, empty, unreadable or non-object file is named in the error."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a checkpoint folder holds the {path.name} that transformers' "
                                "save_pretrained writes")
    try:
        text = path.read_text(encoding="utf-8")
        value = json.loads(text)
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}): re-save it") from None
    except json.JSONDecodeError as error:
        where = f"{error.msg} at line {error.lineno}, column {error.colno}"
        what = "empty" if not text.strip() else f"not valid JSON ({where})"
        raise ValueError(f"{path} is {what}: re-save the checkpoint with transformers' save_pretrained") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not the object of a transformers config")
    return value


def read_config(folder: Path) -> dict[str, Any]:
    return read_json(folder / CONFIG_FILE)


def read_image_processor_config(folder: Path) -> dict[str, Any]:
    """The image processor's settings from whichever layout the folder has; two that disagree are refused."""
    found = {}
    if (folder / PREPROCESSOR_FILE).exists():
        found[PREPROCESSOR_FILE] = read_json(folder / PREPROCESSOR_FILE)
    if (folder / PROCESSOR_FILE).exists():
        nested = read_json(folder / PROCESSOR_FILE).get("image_processor")
        if nested is not None:
            if not isinstance(nested, dict):
                raise ValueError(f"{folder / PROCESSOR_FILE}: 'image_processor' is not a JSON object")
            found[PROCESSOR_FILE] = nested
    if not found:
        raise FileNotFoundError(
            f"{folder} has no image processor settings: neither {PREPROCESSOR_FILE} nor an 'image_processor' entry "
            f"in {PROCESSOR_FILE}. Save the checkpoint's processor with transformers "
            "(`AutoProcessor.from_pretrained(source).save_pretrained(folder)`)."
        )
    if len(found) == 2:
        a, b = found[PREPROCESSOR_FILE], found[PROCESSOR_FILE]
        differing = sorted(key for key in set(a) | set(b) if a.get(key) != b.get(key) and key != "processor_class")
        if differing:
            raise ValueError(
                f"{folder}: {PREPROCESSOR_FILE} and the image processor in {PROCESSOR_FILE} disagree on "
                f"{', '.join(differing)}; remove the stale one"
            )
    return next(iter(found.values()))
