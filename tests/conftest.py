"""Shared fixtures: a tiny byte-level tokenizer, a 4-layer random teacher, a 2-layer pruned student and a
small set of chat-templated prompts of varied lengths. Everything is built offline in well under a second."""

from __future__ import annotations

import pytest
import torch

from distillm.data.prompts import EncodedPrompt, PromptRecord, encode_prompts
from distillm.models import prune_layers
from distillm.testing.tiny import build_tiny_model, build_tiny_tokenizer

# The models here are tiny: one CPU thread is fastest, and avoids the multi-second stalls that intra-op thread
# pools suffer when another process keeps the CPU busy.
torch.set_num_threads(1)

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
