"""Shared fixtures: a tiny byte-level tokenizer, a 4-layer random teacher, a 2-layer pruned student and a
small set of chat-templated prompts of varied lengths. Everything is built offline in well under a second."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from distillm.data.prompts import EncodedPrompt, PromptRecord, encode_prompts
from distillm.models import prune_layers
from distillm.testing.tiny import build_tiny_model, build_tiny_tokenizer

# The models here are tiny: one CPU thread is fastest, and avoids the multi-second stalls that intra-op thread
# pools suffer when another process keeps the CPU busy.
torch.set_num_threads(1)

# The tests live in folders mirroring src/distillm (docs/testing.md), without __init__.py: pytest imports each file
# by its basename (so basenames are unique across tests/) and puts this folder on sys.path (`from tolerances import
# ...`). Some test modules reuse another's helpers (training/test_teacher_cache.py imports from
# methods/test_fused_methods.py): every area folder is importable too, whichever folders a run collects.
for _area in sorted(p for p in Path(__file__).resolve().parent.iterdir() if p.is_dir() and p.name[0] not in "._"):
    if str(_area) not in sys.path:
        sys.path.append(str(_area))

PROMPT_TEXTS = [
    "Hi",
    "What is two plus two?",
    "Name a colour.",
    "Write a haiku about the sea and the wind over the cliffs.",
    "Why?",
    "Explain in one sentence what a neural network is.",
    "List three fruits",
    "ok",
    "Translate 'good morning' into French, please.",
    "Tell me a very short story about a cat who learns to fly a small red plane.",
]


@pytest.fixture
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def teacher(tokenizer):
    return build_tiny_model(tokenizer, num_layers=4, seed=0)


@pytest.fixture
def student(teacher):
    return prune_layers(teacher, [0, 3])


@pytest.fixture
def encoded_prompts(tokenizer) -> list[EncodedPrompt]:
    records = [
        PromptRecord(id=f"p{i:02d}", messages=[{"role": "user", "content": text}], source=f"conftest:{i}")
        for i, text in enumerate(PROMPT_TEXTS)
    ]
    encoded, n_truncated = encode_prompts(records, tokenizer, max_prompt_length=512)
    assert n_truncated == 0
    return encoded
