"""The built-in prompt set: about 240 short instructions written for this project, shipped with the package.

Each line of `builtin/prompts.jsonl` is one prompt::

    {"id": "arithmetic-004", "prompt": "...", "split": "train" | "eval", "category": "arithmetic", "answer": "9"}

Categories: explain, definition, list, rewrite, summarise, reasoning, conversion, arithmetic, creative, factual.
Every prompt is short and answerable in one to four sentences, so a small student model can produce a useful
response within ~64 new tokens. Arithmetic word problems and unit conversions carry the exact numeric `answer`.
The split is fixed in the file (200 train, 40 eval; no eval prompt repeats a train prompt), so ids and splits are
stable across runs and machines. Within each split the file interleaves the categories, so the first N prompts
(`--num-prompts N`) are a balanced mix.
"""

from __future__ import annotations

import json
from pathlib import Path

BUILTIN_SPLITS = ("train", "eval")


def builtin_prompts_path() -> Path:
    """Path of the packaged JSONL file holding both splits."""
    return Path(__file__).resolve().parent / "builtin" / "prompts.jsonl"


def load_builtin(split: str = "train") -> list[dict]:
    """The built-in prompts of one split ("train" or "eval"), as the raw dicts stored in the file."""
    if split not in BUILTIN_SPLITS:
        raise ValueError(f"unknown built-in split {split!r}; choose one of: {', '.join(BUILTIN_SPLITS)}")
    with builtin_prompts_path().open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [row for row in rows if row["split"] == split]
