"""Joint student-teacher decoding (speculative KD's data): the student proposes every token, the teacher keeps
it when it is among the teacher's top-K next tokens and otherwise replaces it with a sample of its own.

Both models decode in lockstep with their KV caches, one token per step, over a left-padded batch. Sampling
uses the same temperature / top-p for both models and a private, seeded generator, so the output is a function
of (models, prompts, settings, seed). Temperature 0 is greedy: with K = 1 the output is then exactly the
teacher's greedy decoding, with K = vocabulary size exactly the student's.

A teacher behind a server (--teacher-url) has no KV cache here: `blockwise_speculative_decode` applies the same
rule a block of student drafts at a time, with one ranking request per row and block and one sampling request per
rejected token.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from typing import Protocol, Sequence

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


def _cache_arg(model) -> str:
    """The forward's name for the KV cache: `cache` from transformers 5.x on, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


class _Decoder:
    """One model's incremental forward over a left-padded batch, with its KV cache."""

    def __init__(self, model, input_ids, attention_mask, vocab_size):
        self.model, self.vocab_size = model, vocab_size
        self.attention_mask = attention_mask
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                    logits_to_keep=1)
        self.past = _cache_of(out)
        self.next_position = position_ids[:, -1:] + 1
        self.logits = out.logits[:, -1, :vocab_size]

    def advance(self, tokens: torch.Tensor) -> None:
        self.attention_mask = torch.cat([self.attention_mask, torch.ones_like(tokens[:, None])], dim=-1)
        out = self.model(input_ids=tokens[:, None], attention_mask=self.attention_mask,
                         position_ids=self.next_position, use_cache=True, **{_cache_arg(self.model): self.past})
        self.past = _cache_of(out)
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


class JointTeacher(Protocol):
    """A teacher reached by request (teacher.remote.RemoteJointTeacher): no KV cache in this process, so joint
    decoding goes block by block (`blockwise_speculative_decode`)."""

    def ranks(self, sequences: Sequence[tuple[list[int], int]]) -> list[list[int]]:
        """Per (token ids, n): the teacher's rank (1 = its most likely) of each of the last n tokens given the
        tokens before it."""

    def sample(self, prefixes: Sequence[list[int]], params: SamplingParams, seeds: Sequence[int]) -> list[int]:
        """One token per prefix, sampled by the teacher with `params` (temperature, top-p) and a seed each."""


def blockwise_speculative_decode(student_backend, teacher: JointTeacher, prompts: Sequence[list[int]],
                                 params: SamplingParams, *, top_k: int, seed: int, eos_ids: set[int],
                                 block: int = 8) -> list[JointCompletion]:
    """Joint decoding with a teacher reached by request, the same rule as `speculative_decode` block by block.

    The student (`student_backend.generate_batch`, e.g. generation.hf.HFBackend) drafts up to `block` tokens per
    unfinished row; the teacher ranks every drafted token given the tokens before it (one request per row: vLLM's
    prompt_logprobs give the actual token's rank); the draft is kept up to its first token of rank > `top_k`, and
    that position gets the teacher's own sample (one more request). The rest of the draft is dropped and the next
    block is drafted from there. Each kept or replaced token is thus decided exactly as in the lockstep
    `speculative_decode`: the student's proposal given the response so far, kept if in the teacher's top-K, else
    the teacher's sample; only the random streams differ. At temperature 0 both give the same tokens.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    n = len(prompts)
    tokens: list[list[int]] = [[] for _ in range(n)]
    proposals: list[list[int]] = [[] for _ in range(n)]
    replaced: list[list[bool]] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n  # SamplingParams asks for max_new_tokens >= 1
    round_index = 0
    while any(reason is None for reason in finish):
        active = [i for i in range(n) if finish[i] is None]
        room = {i: params.max_new_tokens - len(tokens[i]) for i in active}
        width = min(block, max(room.values()))
        drafts = student_backend.generate_batch([list(prompts[i]) + tokens[i] for i in active],
                                                replace(params, max_new_tokens=width), seed=seed + round_index)
        drafts = {i: list(d.token_ids[:room[i]]) for i, d in zip(active, drafts)}
        ranked = [i for i in active if drafts[i]]
        ranks = dict(zip(ranked, teacher.ranks(
            [(list(prompts[i]) + tokens[i] + drafts[i], len(drafts[i])) for i in ranked])))
        rejected = []  # (row, the student's rejected proposal)
        for i in active:
            draft = drafts[i]
            if not draft:  # a backend that returned nothing: the row is over
                finish[i] = "stop"
                continue
            if len(ranks[i]) != len(draft):
                raise RuntimeError(f"the teacher ranked {len(ranks[i])} of {len(draft)} drafted tokens")
            keep = next((j for j, r in enumerate(ranks[i]) if r > top_k), len(draft))
            for token in draft[:keep]:
                tokens[i].append(token)
                proposals[i].append(token)
                replaced[i].append(False)
                if token in eos_ids:
                    finish[i] = "stop"
                    break
            if finish[i] is None and keep < len(draft):
                rejected.append((i, draft[keep]))
            elif finish[i] is None and len(tokens[i]) >= params.max_new_tokens:
                finish[i] = "length"
        if rejected:
            choices = teacher.sample([list(prompts[i]) + tokens[i] for i, _ in rejected], params,
                                     [(seed * 1_000_003 + round_index * n + i) % 2**31 for i, _ in rejected])
            for (i, proposal), token in zip(rejected, choices):
                tokens[i].append(int(token))
                proposals[i].append(proposal)
                replaced[i].append(True)
                if token in eos_ids:
                    finish[i] = "stop"
                elif len(tokens[i]) >= params.max_new_tokens:
                    finish[i] = "length"
        round_index += 1
    return [JointCompletion(tokens[i], finish[i], proposals[i], replaced[i]) for i in range(n)]
