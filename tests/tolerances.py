"""Float tolerances derived from the arithmetic, for every float comparison in the suite.

Rounding model (Higham, "Accuracy and Stability of Numerical Algorithms", ch. 2-3): one floating-point operation
has a relative error of at most u = eps / 2. A sum (or dot product) of n terms, in any order, is off by at most
gamma_n * sum|terms| with gamma_n = n*u / (1 - n*u) (worst case); with independent rounding errors the typical
error grows like sqrt(n) * u * sum|terms| instead, and that is the model used here, times a safety factor k.
Two results computed in different orders (a fused kernel vs a plain reference, a merged weight vs base + adapter)
each carry such an error, so a comparison of the two allows the sum of both (k >= 2).

Nothing here was fitted to one machine's output: every bound is eps(dtype) times counts and magnitudes read off the
computation being checked (its sum lengths, its depth, the size of its values). The bounds hold for any order of
summation (SIMD width, thread count, BLAS kernel) on any x86 CPU.
"""

from __future__ import annotations

import math

import torch

#: safety factor over the sqrt(n) (random-walk) rounding model, per compared pair of results
K = 4.0


def eps(dtype: torch.dtype = torch.float32) -> float:
    """Machine epsilon of `dtype` (the gap between 1 and the next representable number)."""
    return torch.finfo(dtype).eps


def sum_atol(n: int, scale: float, dtype: torch.dtype = torch.float32, *, k: float = K) -> float:
    """Absolute bound on the difference of two evaluations of a sum (or dot product) of `n` terms whose
    absolute values sum to at most `scale`: k * eps * sqrt(n) * scale."""
    return k * eps(dtype) * math.sqrt(max(n, 1)) * float(scale)


def sum_rtol(n: int, dtype: torch.dtype = torch.float32, *, k: float = K) -> float:
    """Relative form of `sum_atol` for a result that is its own scale (terms of one sign, e.g. a sum of
    probabilities, KL terms or squared values): k * eps * sqrt(n)."""
    return k * eps(dtype) * math.sqrt(max(n, 1))


def llama_depth(config) -> int:
    """The longest chain of matrix products from the embeddings to the logits of a Llama-style decoder: per layer
    q/k/v projection, scores (q.k), attention (softmax . v), o_proj, gate/up projection, down_proj (6), then the
    head. Each link adds its own rounding error to what reaches the logits (RMSNorm and softmax keep the
    propagated relative error at its size, they do not amplify it)."""
    return 6 * config.num_hidden_layers + 1


def llama_fan_in(config) -> int:
    """The longest dot product inside a Llama-style decoder: the widest input of any projection (the MLP's
    down_proj reads intermediate_size values; q.k reads head_dim; a row of attention weights reads the sequence,
    which is far shorter in these tests)."""
    return max(config.hidden_size, config.intermediate_size)


def forward_atol(config, logits: torch.Tensor, *, dtype: torch.dtype = torch.float32, k: float = K) -> float:
    """Bound on the difference between two evaluations of one Llama-style network's logits in `dtype` that differ
    only in the order of their operations (a merged LoRA weight vs base + adapter, a checkpointed vs a plain
    forward, a batch vs a single row): each of the `llama_depth` chained products contributes eps * sqrt(fan_in)
    relative error, on logits of size max|logits|."""
    scale = float(logits.detach().abs().max())
    return k * eps(dtype) * math.sqrt(llama_fan_in(config)) * llama_depth(config) * scale


def update_atol(config, n_tokens: int, weight: torch.Tensor, step: torch.Tensor, *, dtype: torch.dtype = torch.float32,
                k: float = K) -> float:
    """Bound on the difference between two weights after the same training step(s) computed in another order
    (gradient checkpointing, micro-batching, another number of processes). A weight gradient is a sum over the
    `n_tokens` tokens of the step of products that each went through the network (`forward_atol`'s
    eps * sqrt(fan_in) * depth relative error), so the step (`step` = new - old weight) is off by
    eps * sqrt(fan_in * n_tokens) * depth of its size; the new weight is rounded once more (eps * |weight|)."""
    rel = math.sqrt(llama_fan_in(config) * max(n_tokens, 1)) * llama_depth(config)
    return k * eps(dtype) * (float(weight.detach().abs().max()) + rel * float(step.detach().abs().max()))


def softmax_atol(*logits: torch.Tensor, temperature: float = 1.0, dtype: torch.dtype = torch.float32,
                 k: float = K) -> float:
    """Bound on the error of a divergence (or its gradient, per unit of upstream gradient) over a softmax of V
    entries computed in `dtype`, against an exact reference. log-softmax of z/T is off by about
    eps * (max|z|/T + log V) per entry (the shift by the max and the log of the sum of V exponentials); a
    divergence sums V such terms weighted by probabilities (which sum to 1), so the sum's error grows like
    sqrt(V) of that."""
    vocab = logits[0].shape[-1]
    finite = [x.detach()[torch.isfinite(x.detach())] for x in logits]
    top = max((float(x.abs().max()) for x in finite if x.numel()), default=0.0)
    return k * eps(dtype) * math.sqrt(vocab) * (top / temperature + math.log(vocab))


def head_atol(*heads, temperature: float = 1.0, dtype: torch.dtype = torch.float32, k: float = K) -> float:
    """Bound on the error of a divergence between softmaxes of output heads (each a (hidden [.., H], weight [V, H],
    bias [V] or None) triple, or a logits tensor) computed in `dtype` in one order vs another (a fused chunked
    kernel vs full logits). A logit is a dot product of length H: off by eps * sqrt(H) * Z, Z the largest sum of
    |h_i * w_i| (+ |b|); a divergence moves by at most twice that per unit of logit, over T; the softmax adds
    `softmax_atol`'s eps * sqrt(V) * (Z/T + log V)."""
    z, fan_in, vocab = 0.0, 1, 1
    for head in heads:
        if isinstance(head, torch.Tensor):
            finite = head.detach()[torch.isfinite(head.detach())]
            z, vocab = max(z, float(finite.abs().max()) if finite.numel() else 0.0), max(vocab, head.shape[-1])
            continue
        hidden, weight, bias = (None if x is None else x.detach() for x in (tuple(head) + (None,))[:3])
        terms = hidden.abs().to(torch.float64) @ weight.abs().to(torch.float64).T
        if bias is not None:
            b = bias.abs().to(torch.float64)
            terms = terms + torch.where(torch.isfinite(b), b, 0.0)
        z, fan_in, vocab = max(z, float(terms.max())), max(fan_in, hidden.shape[-1]), max(vocab, weight.shape[0])
    return k * eps(dtype) * (2 * math.sqrt(fan_in) + math.sqrt(vocab)) * (z / temperature + math.log(vocab))


def head_loss_atols(*heads, upstream: float, n: int, loss=0.0, temperature: float = 1.0,
                    dtype: torch.dtype = torch.float32, k: float = K) -> tuple[float, float]:
    """(loss, gradient) bounds for a loss that combines per-token divergences or log-probabilities between
    softmaxes of `heads` (as `head_atol`: head triples or logits) over `n` tokens, with coefficients whose absolute
    values add up to at most `upstream`, computed in `dtype` in one order vs another (a fused kernel vs a plain
    reference, a batch with extra rows vs without): each token's value, and its gradient per unit of upstream, is
    within v = `head_atol`, so the loss is within v * upstream plus the rounding of its own sum of `n` terms of one
    sign (`sum_atol(n, |loss|)`); a gradient w.r.t. a head's weight, bias or hidden states, or the logits, sums
    those per-logit errors times a hidden state or a head row (or 1) over the tokens: v * upstream * max(1,
    max|hidden|, max|weight|)."""
    v = head_atol(*heads, temperature=temperature, dtype=dtype, k=k)
    scale = 1.0
    for head in heads:
        if not isinstance(head, torch.Tensor):
            scale = max(scale, *(float(x.detach().abs().max()) for x in tuple(head)[:2]))
    value = abs(float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss))
    return v * upstream + sum_atol(n, value, dtype, k=k), v * upstream * scale


def rounding_rtol(roundings: int, dtype: torch.dtype = torch.float32) -> float:
    """Worst-case relative error of a value that went through `roundings` multiplications or divisions in `dtype`
    (Higham Lemma 3.1: gamma_n = n*u / (1 - n*u), u = eps / 2); a sum of such values, all of one sign, keeps it."""
    u = eps(dtype) / 2
    return roundings * u / (1 - roundings * u)


def product_atol(n: int, dtype: torch.dtype = torch.float64, *, k: float = K) -> float:
    """Bound on the error of 1 - prod_i (1 - a_i) over at most `n` factors in [0, 1] (pass@k's product form): each
    factor is rounded twice (a_i, then 1 - a_i), the product n - 1 times, the complement once more, so the worst
    case is 3n * u = 1.5n * eps of 1; k * (n + 1) * eps covers it, and the reference rounded once."""
    return k * (n + 1) * eps(dtype)


def model_atol(config, n_tokens: int, value, *, dtype: torch.dtype = torch.float32, k: float = K) -> float:
    """Bound on the difference between two evaluations of a loss over a Llama-style network (or of its gradient)
    that differ only in the order of their operations (fused vs plain loss, micro-batching, a cached teacher):
    every token's contribution went through `llama_depth` chained products of length up to `llama_fan_in`, and the
    loss or gradient sums `n_tokens` of them, so the relative error is eps * sqrt(fan_in * n_tokens) * depth, of
    the size max|value|."""
    scale = float(value.detach().abs().max()) if isinstance(value, torch.Tensor) else abs(float(value))
    return k * eps(dtype) * math.sqrt(llama_fan_in(config) * max(n_tokens, 1)) * llama_depth(config) * scale


def batch_tokens(batch) -> int:
    """The real (unpadded) tokens of a collated batch."""
    return int(batch["attention_mask"].sum())


#: AdamW's normalised step |m_hat| / sqrt(v_hat) is at most (1 - b1) / sqrt((1 - b2) (1 - b1^2 / b2)) (Cauchy-Schwarz
#: over the exponential averages), about 7.3 for transformers' default betas (0.9, 0.999)
ADAM_MAX_STEP = (1 - 0.9) / math.sqrt((1 - 0.999) * (1 - 0.9 ** 2 / 0.999))


def adam_atol(config, n_tokens: int, steps: int, lr: float, weight: torch.Tensor, *,
              dtype: torch.dtype = torch.float32, k: float = K) -> float:
    """Bound on the difference between two weights after `steps` AdamW steps at learning rate `lr` whose gradients
    differ only by summation order (another number of processes) or not at all (a run resumed from a checkpoint):
    each gradient is off by `model_atol`'s relative rho = eps * sqrt(fan_in * n_tokens) * depth, which moves
    m_hat and sqrt(v_hat) by rho each, so the normalised step (at most ADAM_MAX_STEP * lr) by 2 * rho of itself;
    the steps add up, and the weight is rounded once more."""
    rho = k * eps(dtype) * math.sqrt(llama_fan_in(config) * max(n_tokens, 1)) * llama_depth(config)
    return steps * lr * ADAM_MAX_STEP * 2 * rho + k * eps(dtype) * float(weight.detach().abs().max())


def tiny_student_config(num_layers: int = 2):
    """The config of the tiny preset's student (the tiny teacher pruned to `num_layers` layers)."""
    from distillm.testing.tiny import build_tiny_tokenizer, tiny_llama_config

    return tiny_llama_config(len(build_tiny_tokenizer()), num_layers=num_layers)
