"""Fused, chunked distillation losses: the divergences of `divergences.py` computed from last hidden states and
output-head weights, a chunk of tokens at a time, so that no more than one chunk's logits per model is alive.

With h_n the student's last hidden state of response token n, W [V, H] its output head (b its bias) and the
teacher's logits z^T_n either given or computed the same way from the teacher's hidden state and head:

    z^S_n = W h_n + b,   q_n = softmax(z^S_n / tau),   p_n = softmax(z^T_n / tau)
    d_n   = D(p_n, q_n)                       (D: FKL, RKL, SKL_a, SRKL_a, JSD_b, TVD, acceptance; see divergences)

The full [N, V] logits are never built. The tokens are split into chunks of C rows; for each chunk the C x V
student and teacher logits are formed, the chunk's values and their gradient w.r.t. the student logits are
computed in closed form (the kernels below; one pass of a few elementwise ops instead of autograd through the
plain functions, which is several times slower on CPU), and the chunk's logits are freed. With g_n the upstream
gradient of d_n and G_n = g_n dd_n/dz^S_n (a [V] row):

    dL/dh_n = G_n W,    dL/dW = sum_n G_n^T h_n,    dL/db = sum_n G_n

The conventions are those of `divergences.py` (true KLs with the entropy term, 0 log 0 = 0, -inf logits as exact
zeros, a = 0 / b = 0 / b = 1 end points, a and b constants for the gradient), and the tests check every value
and gradient against the plain functions on full logits.

Two entry points share this machinery:

- `fused_divergence` (and the named wrappers `fused_forward_kl`, ...) returns the per-token values [...] with a
  backward that is exact for *any* upstream gradient (per-token weights, per-sequence means, anything). Its
  backward recomputes each chunk's logits (one more head matmul per model than the plain path); with a frozen
  head (only the hidden states need a gradient) the forward keeps dd_n/dh_n [N, H] instead.
- `fused_weighted_divergence` takes the per-token weights w_n up front and returns L = sum_n w_n d_n (plus the
  per-token values, detached). It computes the gradient during the forward pass, chunk by chunk, and keeps only
  dL/dh [N, H], dL/dW [V, H], dL/db [V]; the backward scales them. No recomputation: use it for training,
  where the weights (1 / tokens of the sequence / sequences, loss coefficients) are known before the backward.

`fused_token_log_probs` gives log q(y_n) of given target ids the same way (NLL/SFT, the curriculum gaps of
DistiLLM-2, DPO-style sequence log-probs). `training.fused_inputs` turns a transformers causal LM and a batch into the
hidden states of the response positions and the head.

Memory: the forward and the backward hold at most one chunk's student and teacher logits and the kernel's
temporaries on them (a small multiple of C x V); what is saved for the backward is the inputs
themselves (hidden states, head weights, teacher logits if those were given), or, for the weighted form, the
gradients [N, H] and [V, H]. Nothing of size N x V is saved or created.

Precision: the head matmul runs in the inputs' dtype (like the model's lm_head); the divergence upcasts to
float32 as the plain functions do. Head-weight gradients are accumulated over chunks in float32 (float64 for
float64 inputs) and cast to the weight's dtype at the end. The teacher side never gets a gradient (its inputs
are used as constants), nor do a and b.

Modules: `kernels` (the per-chunk closed forms), `autograd` (chunking and the two autograd Functions), `api`
(the functions below, with their argument checks).
"""

from __future__ import annotations

from .api import (MIXTURE_WEIGHTS, default_chunk_size, fused_acceptance_rate, fused_divergence, fused_forward_kl,
                  fused_generalized_jsd, fused_reverse_kl, fused_skew_forward_kl, fused_skew_reverse_kl,
                  fused_token_log_probs, fused_total_variation, fused_weighted_divergence, mixture_weight)
from .autograd import (TOPK_TAILS, HeadInputs, TopKTeacher, dense_teacher_logprobs, power_exponents, resolve_tail,
                       topk_logprobs, with_actual_token)
from .kernels import CHUNK_BYTES, DIVERGENCES

__all__ = [
    "CHUNK_BYTES", "DIVERGENCES", "HeadInputs", "TopKTeacher", "default_chunk_size", "fused_divergence",
    "fused_weighted_divergence", "fused_forward_kl", "fused_reverse_kl", "fused_skew_forward_kl",
    "fused_skew_reverse_kl", "fused_generalized_jsd", "fused_total_variation", "fused_acceptance_rate",
    "fused_token_log_probs", "topk_logprobs", "TOPK_TAILS", "resolve_tail", "MIXTURE_WEIGHTS", "mixture_weight",
    "with_actual_token", "power_exponents", "dense_teacher_logprobs",
]
