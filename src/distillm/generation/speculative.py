"""Joint student-teacher decoding (speculative KD's data): the student proposes every token, the teacher keeps
it when it is among the teacher's top-K next tokens and otherwise replaces it with a sample of its own.

Both models decode in lockstep with their KV caches, one token per step, over a left-padded batch. Sampling
uses the same temperature / top-p for both models and a private, seeded generator, so the output is a function
of (models, prompts, settings, seed). Temperature 0 is greedy: with K = 1 the output is then exactly the
teacher's greedy decoding, with K = vocabulary size exactly the student's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..models import eval_mode
from .base import SamplingParams, left_pad_prompts


@dataclass
class JointCompletion:
    token_ids: list[int]  # the response, ending in an end-of-sequence token when it stopped by itself
    finish_reason: str  # "stop" or "length"
    proposals: list[int] = field(default_factory=list)  # the student's proposal at each position
    replaced: list[bool] = field(default_factory=list)  # True where the teacher replaced the proposal


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """One token per row from [B, V] logits: argmax at temperature 0, else nucleus (top-p) sampling."""
    if params.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above each one
        sorted_probs = torch.where(before < params.top_p, sorted_probs, torch.zeros_like(sorted_probs))
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _Decoder:
    """One model's incremental forward over a left-padded batch, with its KV cache."""

    def __init__(self, model, input_ids, attention_mask, vocab_size):
        self.model, self.vocab_size = model, vocab_size
        self.attention_mask = attention_mask
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                    logits_to_keep=1)
        self.past = out.past_key_values
        self.next_position = position_ids[:, -1:] + 1
        self.logits = out.logits[:, -1, :vocab_size]

    def advance(self, tokens: torch.Tensor) -> None:
        self.attention_mask = torch.cat([self.attention_mask, torch.ones_like(tokens[:, None])], dim=-1)
        out = self.model(input_ids=tokens[:, None], attention_mask=self.attention_mask,
                         position_ids=self.next_position, past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        self.next_position = self.next_position + 1
        self.logits = out.logits[:, -1, :self.vocab_size]


@torch.inference_mode()
def speculative_decode(student, teacher, prompts: Sequence[list[int]], params: SamplingParams, *, top_k: int,
                       seed: int, eos_ids: set[int], pad_id: int, vocab_size: int) -> list[JointCompletion]:
    """Decode `prompts` jointly (see the module docstring); returns one JointCompletion per prompt."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    device = next(student.parameters()).device
    input_ids, attention_mask = (t.to(device) for t in left_pad_prompts(prompts, pad_id))
    generator = torch.Generator(device=device).manual_seed(seed)
    eos = torch.tensor(sorted(eos_ids), device=device)
    k = min(top_k, vocab_size)
    tokens, proposals, replaced = [], [], []
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    with eval_mode(student), eval_mode(teacher):
        s, t = (_Decoder(m, input_ids, attention_mask, vocab_size) for m in (student, teacher))
        for _ in range(params.max_new_tokens):
            proposal = sample_next(s.logits, params, generator)
            teacher_choice = sample_next(t.logits, params, generator)
            in_top_k = (t.logits.topk(k, dim=-1).indices == proposal[:, None]).any(-1)
            token = torch.where(in_top_k, proposal, teacher_choice)
            token = torch.where(done, torch.full_like(token, pad_id), token)
            tokens.append(token)
            proposals.append(proposal)
            replaced.append(~in_top_k)
            done = done | torch.isin(token, eos)
            if bool(done.all()):
                break
            s.advance(token)
            t.advance(token)
    completions = []
    columns = [torch.stack(x, dim=1).tolist() for x in (tokens, proposals, replaced)]
    for row_tokens, row_proposals, row_replaced in zip(*columns):
        stop = next((i for i, tok in enumerate(row_tokens) if tok in eos_ids), None)
        end = len(row_tokens) if stop is None else stop + 1
        completions.append(JointCompletion(row_tokens[:end], "length" if stop is None else "stop",
                                           row_proposals[:end], row_replaced[:end]))
    return completions
