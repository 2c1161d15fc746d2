"""Pairwise preference of one model's held-out answers over a reference model's, judged by the teacher.

For each held-out prompt both models answer greedily; each answer gets its **length-normalised teacher
log-likelihood**, the mean over its response tokens of log p_teacher(token | prompt, earlier tokens)
(`divergence.sequence_log_likelihoods`). The variant *wins* a prompt when its answer scores higher, *ties* when
both answers are the same tokens (or score exactly the same) and loses otherwise. The preference figure is

    (wins + ties / 2) / prompts

with a percentile bootstrap interval over prompts (a variant trained with several seeds: each prompt's outcome
is first averaged over the seeds, `preference_over_seeds`): `resamples` times, draw as many prompts as there are with
replacement (numpy's PCG64 generator seeded with `seed`, so the interval is the same on every machine), take
the figure of the draw; the interval is the (1 - confidence) / 2 and (1 + confidence) / 2 quantiles of those
figures (numpy's default, linear interpolation). The interval shows how much the figure depends on which prompts
were held out; it does not cover seed-to-seed variation of training (the comparison's ± std does).

Caveat (the reason the report pairs it with the degeneracy flag): the teacher's likelihood, normalised or not,
favours repetitive answers, so a looping variant can "win" against a coherent reference. Read the preference
column together with `degeneracy`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .divergence import normalised_scores, sequence_log_likelihoods

#: bootstrap defaults
RESAMPLES = 10_000
CONFIDENCE = 0.95


def outcomes(variant: Sequence[float], reference: Sequence[float], same: Sequence[bool] | None = None) -> list[float]:
    """Per prompt: 1.0 when the variant's score is higher, 0.5 for a tie (the same answer, or equal scores), 0.0
    when lower. `same[i]`: both answers to prompt i are the same tokens (a tie whatever floating-point noise the
    two scores carry)."""
    if len(variant) != len(reference):
        raise ValueError(f"{len(variant)} variant scores for {len(reference)} reference scores: score the same "
                         "prompts")
    same = [False] * len(variant) if same is None else list(same)
    if len(same) != len(variant):
        raise ValueError(f"`same` has {len(same)} entries for {len(variant)} prompts")
    return [0.5 if tie or v == r else float(v > r) for v, r, tie in zip(variant, reference, same)]


@dataclass(frozen=True)
class Preference:
    rate: float  # (wins + ties / 2) / comparisons
    low: float  # bootstrap interval
    high: float
    wins: int  # over every (prompt, seed) comparison
    ties: int
    losses: int
    prompts: int
    seeds: int
    resamples: int
    confidence: float
    seed: int  # the bootstrap's

    def as_dict(self) -> dict:
        return {"rate": self.rate, "low": self.low, "high": self.high, "wins": self.wins, "ties": self.ties,
                "losses": self.losses, "prompts": self.prompts, "seeds": self.seeds, "resamples": self.resamples,
                "confidence": self.confidence, "bootstrap_seed": self.seed}


def bootstrap_interval(values: Sequence[float], *, resamples: int = RESAMPLES, confidence: float = CONFIDENCE,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampled with replacement, seeded)."""
    if not values:
        raise ValueError("a bootstrap interval needs at least one value")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    data = np.asarray(values, dtype=np.float64)
    rng = np.random.Generator(np.random.PCG64(seed))
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def preference(variant: Sequence[float], reference: Sequence[float], same: Sequence[bool] | None = None, *,
               resamples: int = RESAMPLES, confidence: float = CONFIDENCE, seed: int = 0) -> Preference:
    """The preference figure of the module's docstring from per-prompt scores (the same prompts, in the same
    order, for both models)."""
    return preference_over_seeds([outcomes(variant, reference, same)], resamples=resamples,
                                 confidence=confidence, seed=seed)


def preference_over_seeds(per_seed: Sequence[Sequence[float]], *, resamples: int = RESAMPLES,
                          confidence: float = CONFIDENCE, seed: int = 0) -> Preference:
    """One variant trained with several seeds against the reference: `per_seed[s][i]` is seed s's `outcomes` on
    prompt i (the same prompts, in the same order, for every seed). Each prompt's outcome is averaged over the
    seeds, and the bootstrap resamples prompts (a prompt's seeds stay together: they share the prompt)."""
    if not per_seed or not per_seed[0]:
        raise ValueError("no prompts to compare")
    if len({len(row) for row in per_seed}) != 1:
        raise ValueError(f"every seed must score the same prompts; got {[len(row) for row in per_seed]} prompts")
    per_prompt = [sum(column) / len(column) for column in zip(*per_seed)]
    low, high = bootstrap_interval(per_prompt, resamples=resamples, confidence=confidence, seed=seed)
    flat = [o for row in per_seed for o in row]
    return Preference(sum(per_prompt) / len(per_prompt), low, high, wins=flat.count(1.0), ties=flat.count(0.5),
                      losses=flat.count(0.0), prompts=len(per_prompt), seeds=len(per_seed), resamples=resamples,
                      confidence=confidence, seed=seed)


def paired_scores(variant_rows: Sequence[dict], reference_rows: Sequence[dict], variant_scores: Sequence[float],
                  reference_scores: Sequence[float]) -> tuple[list[float], list[float], list[bool]]:
    """Line up two models' per-answer scores by prompt id (rows as in a generation's responses.jsonl: id and
    response_ids); refuses two answer sets that do not cover the same prompts."""
    v = {str(r["id"]): (s, list(r["response_ids"])) for r, s in zip(variant_rows, variant_scores, strict=True)}
    ref = {str(r["id"]): (s, list(r["response_ids"])) for r, s in zip(reference_rows, reference_scores, strict=True)}
    if set(v) != set(ref):
        missing = sorted(set(v) ^ set(ref))
        raise ValueError(f"the two models answered different prompts ({len(missing)} ids in only one of them, "
                         f"e.g. {missing[:3]})")
    ids = sorted(v)
    return ([v[i][0] for i in ids], [ref[i][0] for i in ids], [v[i][1] == ref[i][1] for i in ids])


def score_answers(teacher, rows: Sequence[dict], *, vocab_size: int, pad_token_id: int, max_length: int,
                  batch_size: int = 8, desc: str = "teacher log-likelihood") -> list[float]:
    """Each answer's length-normalised teacher log-likelihood (rows: prompt_ids, response_ids), in the rows'
    order; -inf for an answer with no token."""
    return normalised_scores(sequence_log_likelihoods(teacher, rows, vocab_size=vocab_size, pad_token_id=pad_token_id,
                                                      max_length=max_length, batch_size=batch_size, desc=desc))
