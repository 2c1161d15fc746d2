"""Distillation losses as pure functions of logits and masks.

- `divergences`: token-level FKL, RKL, skew KL, skew reverse KL, generalised JSD, TVD, acceptance rate, and the
  token reductions.
- `cald`: DistiLLM-2's contrastive loss, its b ramp and curriculum skew.
"""

from .cald import b_schedule, cald_loss, curriculum_alpha, curriculum_skew
from .divergences import (
    acceptance_rate, forward_kl, generalized_jsd, per_sequence_mean, reduce_tokens, reverse_kl, skew_forward_kl,
    skew_reverse_kl, token_log_probs, total_variation,
)

__all__ = [
    "acceptance_rate", "b_schedule", "cald_loss", "curriculum_alpha", "curriculum_skew", "forward_kl", "generalized_jsd",
    "per_sequence_mean", "reduce_tokens", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "token_log_probs",
    "total_variation",
]
