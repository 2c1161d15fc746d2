"""The generation backend interface: a backend turns a batch of prompt token ids into response token ids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from ..errors import DistillmError


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings, mapped one to one onto each backend. temperature 0 means greedy decoding."""

    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 64
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise DistillmError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise DistillmError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise DistillmError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Completion:
    token_ids: list[int]  # the response, including the end-of-sequence token when the model stopped by itself
    finish_reason: str  # "stop" or "length"


class GenerationBackend(Protocol):
    """What the pipeline needs from a generator. Batching across prompts is the driver's job
    (`generation.runner.generate_responses`); a backend only has to answer one batch, deterministically for a
    given `seed`, so an interrupted run regenerates exactly what it lost."""

    name: str
    #: How many prompts the driver should hand over at once (vLLM schedules its own batches: it takes many).
    max_batch_size: int
    #: Upper bound on batch_size x (prompt + new tokens) for one call; None for no bound.
    max_batch_tokens: int | None

    def generate_batch(
        self, prompts: Sequence[list[int]], params: SamplingParams, *, seed: int
    ) -> list[Completion]: ...


def left_pad_prompts(prompts: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [B, W] of prompts left-padded to the longest, so every prompt ends in the last
    column (where decoding continues)."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    return input_ids, attention_mask
