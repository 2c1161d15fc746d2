"""CALD, the contrastive loss of DistiLLM-2, as pure functions of logits and masks.

For one pair (prompt x, teacher response y_t, student response y_s):

    L = w_t * SKL_{a_t}(y_t) + w_s * SRKL_{a_s}(y_s),   w_t = 2 - b, w_s = b

SKL on the teacher's response pulls the student up where the teacher is confident; SRKL on the student's own
response pushes it down where it is wrong. b ramps from `b_start` to `b_end` over the first `ramp_fraction`
of training (moving weight from SKL to SRKL); the skews a_t, a_s are chosen per sample by the curriculum
(`curriculum_skew`). See docs/methods.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .divergences import per_sequence_mean, skew_forward_kl, skew_reverse_kl, token_log_probs


def b_schedule(step: int, total_steps: int, *, b_start: float = 1.0, b_end: float = 1.5,
               ramp_fraction: float = 0.5, ramp: bool = True) -> float:
    """The SRKL weight b at an optimizer step: linear from b_start to b_end over the first `ramp_fraction` of
    training, then flat. With `ramp=False` it stays at b_start (b = 1: a plain sum of SKL and SRKL)."""
    if not ramp or total_steps <= 0:
        return b_start
    progress = 1.0 if ramp_fraction <= 0 else min(1.0, step / (ramp_fraction * total_steps))
    return b_start + (b_end - b_start) * progress


def sequence_mean_logprob(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                          *, temperature: float = 1.0) -> torch.Tensor:
    """[B] mean log-probability of each sequence's response tokens (log of the geometric-mean probability)."""
    return per_sequence_mean(token_log_probs(logits, labels, temperature=temperature), mask)


def curriculum_skew(gap: torch.Tensor, gap_ref: float | None, *, skew: float = 0.1, skew_min: float = 0.01,
                    skew_max: float = 0.5, eps: float = 1e-6) -> torch.Tensor:
    """Per-sample skew a (paper Eq. 8, where it is alpha): keep (1 - a) * gap constant across samples.

    a_i = clamp(1 - (1 - skew) * gap_ref / gap_i, skew_min, skew_max). A sample whose gap equals the reference
    gets the base skew; a harder one (bigger gap) a bigger skew, an easier one a smaller skew; a gap <= 0 (the
    student already ahead) gets skew_min. Without a reference yet (the first step) every sample gets the base skew.
    The result is a constant for the gradient.
    """
    gap = gap.detach().float()
    if gap_ref is None:
        return torch.full_like(gap, skew)
    a = 1.0 - (1.0 - skew) * max(gap_ref, eps) / gap.clamp_min(eps)
    return a.clamp(skew_min, skew_max)


def curriculum_alpha(gap: torch.Tensor, gap_ref: float | None, *, alpha0: float = 0.1, alpha_min: float = 0.01,
                     alpha_max: float = 0.5, eps: float = 1e-6) -> torch.Tensor:
    """The earlier name of `curriculum_skew` (alpha0, alpha_min, alpha_max: skew, skew_min, skew_max)."""
    return curriculum_skew(gap, gap_ref, skew=alpha0, skew_min=alpha_min, skew_max=alpha_max, eps=eps)


@dataclass
class CALDTerms:
    """Per-pair pieces of the loss ([B] each); the caller weights, sums and normalises them."""

    skl: torch.Tensor  # SKL_{a_t} on the teacher response, mean over its tokens
    srkl: torch.Tensor  # SRKL_{a_s} on the student response, mean over its tokens
    skl_tokens: torch.Tensor  # per-token SKL values [B, T] (masked positions 0), for token-level reductions
    srkl_tokens: torch.Tensor


def cald_terms(
    student_logits_t: torch.Tensor, teacher_logits_t: torch.Tensor, mask_t: torch.Tensor, alpha_t: torch.Tensor,
    student_logits_s: torch.Tensor, teacher_logits_s: torch.Tensor, mask_s: torch.Tensor, alpha_s: torch.Tensor,
    *, temperature: float = 1.0, detach_student_in_skl: bool = False, detach_student_in_srkl: bool = True,
) -> CALDTerms:
    """SKL on the teacher responses (`*_t`) and SRKL on the student responses (`*_s`): logits [B, T, V],
    masks [B, T] marking response tokens, alphas [B]."""
    skl_tok = skew_forward_kl(student_logits_t, teacher_logits_t, alpha_t, temperature=temperature,
                              detach_student_in_mixture=detach_student_in_skl)
    srkl_tok = skew_reverse_kl(student_logits_s, teacher_logits_s, alpha_s, temperature=temperature,
                               detach_student_in_mixture=detach_student_in_srkl)
    skl_tok = torch.where(mask_t.bool(), skl_tok, torch.zeros_like(skl_tok))
    srkl_tok = torch.where(mask_s.bool(), srkl_tok, torch.zeros_like(srkl_tok))
    return CALDTerms(per_sequence_mean(skl_tok, mask_t), per_sequence_mean(srkl_tok, mask_s), skl_tok, srkl_tok)


def combine_cald(terms: CALDTerms, mask_t: torch.Tensor, mask_s: torch.Tensor, *, b: float = 1.0,
                 reduction: str = "seq_mean", counts=None) -> torch.Tensor:
    """(2 - b) * SKL + b * SRKL, reduced as `reduction` says ('seq_mean': mean per response, then over the
    non-empty responses of each side; 'token_mean': over all response tokens of each side). An empty response
    carries no tokens and is left out of the means (as in `reduce_tokens`). The sums are divided by `counts` =
    (pairs, teacher-response tokens, student-response tokens, non-empty teacher responses, non-empty student
    responses), by default this batch's (a 3-entry tuple: no response is empty, the pairs); the trainer passes the
    whole optimizer step's, so the micro-batches of a gradient-accumulation step add up to exactly the loss of the
    whole batch."""
    if counts is None:
        counts = (terms.skl.shape[0], mask_t.sum(), mask_s.sum(), mask_t.bool().any(-1).sum(),
                  mask_s.bool().any(-1).sum())
    counts = [max(float(c), 1.0) for c in counts]
    tokens_t, tokens_s = counts[1], counts[2]
    responses_t, responses_s = (counts[3], counts[4]) if len(counts) > 4 else (counts[0], counts[0])
    if reduction == "seq_mean":
        return (2.0 - b) * terms.skl.sum() / responses_t + b * terms.srkl.sum() / responses_s
    if reduction == "token_mean":
        return (2.0 - b) * terms.skl_tokens.sum() / tokens_t + b * terms.srkl_tokens.sum() / tokens_s
    raise ValueError(f"Unknown reduction '{reduction}': use seq_mean or token_mean.")


def cald_loss(
    student_logits_t: torch.Tensor, teacher_logits_t: torch.Tensor, mask_t: torch.Tensor, alpha_t,
    student_logits_s: torch.Tensor, teacher_logits_s: torch.Tensor, mask_s: torch.Tensor, alpha_s,
    *, b: float = 1.0, reduction: str = "seq_mean", temperature: float = 1.0,
) -> torch.Tensor:
    """The batch-mean CALD loss of one batch of pairs: `cald_terms`, then `combine_cald`."""
    terms = cald_terms(student_logits_t, teacher_logits_t, mask_t, alpha_t,
                       student_logits_s, teacher_logits_s, mask_s, alpha_s, temperature=temperature)
    return combine_cald(terms, mask_t, mask_s, b=b, reduction=reduction)
