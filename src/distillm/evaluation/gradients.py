"""Where each loss term pushes the student: per-term parameter gradients, their norms and cosines.

DistiLLM-2's loss is (2 - b) SKL_a on the teacher's responses + b SRKL_a on the student's own. Whether the SRKL
term helps the held-out figure (the KL on teacher responses) is a question about directions: at a given
student, `term_gradients` computes the gradient of each term separately (one backward pass per term, summed over
batches), and `gradient_report` gives their norms, their pairwise cosines and the share of the combined
update that the SRKL term carries for given b. To first order, a term whose gradient has a positive cosine with
the KL term's lowers the held-out KL when followed; a cosine near 0 means its share of the step does not.

Each term is reduced as the methods reduce it by default (`seq_mean`: mean over each response's tokens, then
over responses), over all the given rows. The student's weights are used as they are: for a quantization-aware
student (`--student-quant`) that is the fake-quantized model, whose straight-through gradient with respect to the
latent weights is this gradient. A diagnostic (benchmarks/gradient_share.py runs it on a comparison's students),
not a training path.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..losses.divergences import forward_kl, per_sequence_mean, skew_forward_kl, skew_reverse_kl
from ..training.collate import IGNORE, response_logits
from .divergence import scoring_batches

#: term name -> (which rows it reads, per-token divergence of (student logits, teacher logits, skew a))
TERMS: dict[str, tuple[str, Callable]] = {
    "kl": ("teacher", lambda q, p, a: forward_kl(q, p)),  # KD's loss and the held-out KL's direction
    "skl": ("teacher", lambda q, p, a: skew_forward_kl(q, p, a)),  # DistiLLM-2 on the teacher's responses
    "srkl": ("student", lambda q, p, a: skew_reverse_kl(q, p, a)),  # ... on the student's own (q in m2 detached)
}


def term_gradients(teacher, student, rows: dict[str, Sequence[dict]], *, terms: Sequence[str] = tuple(TERMS),
                   skew: float = 0.1, vocab_size: int, pad_token_id: int, max_length: int, batch_size: int = 8,
                   desc: str = "term gradients") -> dict[str, torch.Tensor]:
    """Term -> the gradient of that term's loss with respect to the student's trainable parameters, flattened
    (float32). `rows`: {"teacher": rows, "student": rows} (prompt_ids, response_ids), the sequences each term
    reads (`TERMS`). The loss of a term is the mean over its rows of the per-response token mean of its
    divergence; rows with an empty response are left out (as `reduce_tokens`'s seq_mean leaves them out)."""
    unknown = [t for t in terms if t not in TERMS]
    if unknown:
        raise ValueError(f"Unknown term(s) {unknown}: use {', '.join(TERMS)}.")
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The student has no trainable parameters: nothing to take a gradient of.")
    was_training = student.training
    student.eval()  # no dropout: the gradient of the model as it is evaluated
    teacher.eval()
    out: dict[str, torch.Tensor] = {}
    try:
        for side in ("teacher", "student"):  # each side's models run once per batch, whatever its terms
            names = [t for t in terms if TERMS[t][0] == side]
            if not names:
                continue
            chosen = [r for r in rows[side] if len(r["response_ids"])]
            sums = {t: torch.zeros(sum(p.numel() for p in params)) for t in names}
            batches = list(scoring_batches(chosen, batch_size, max_length, pad_token_id, student.device))
            for batch in tqdm(batches, desc=f"{desc}: {', '.join(names)}", leave=False):
                with torch.no_grad():
                    p_logits, targets = response_logits(teacher, batch, vocab_size)
                q_logits, _ = response_logits(student, batch, vocab_size)
                q_logits, p_logits, mask = q_logits.float(), p_logits.float().to(q_logits.device), targets != IGNORE
                for i, term in enumerate(names):  # one backward per term, through the same forward
                    for p in params:
                        p.grad = None
                    loss = per_sequence_mean(TERMS[term][1](q_logits, p_logits, skew), mask).sum() / len(chosen)
                    loss.backward(retain_graph=i < len(names) - 1)
                    sums[term] += torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach()
                                             .float().reshape(-1).cpu() for p in params])
            out.update(sums)
    finally:
        for p in params:
            p.grad = None
        student.train(was_training)
    return {t: out[t] for t in terms}


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    na, nb = a.norm().item(), b.norm().item()
    if na == 0 or nb == 0:
        return None  # no direction
    return float(torch.dot(a, b).item() / (na * nb))


def gradient_report(grads: dict[str, torch.Tensor], *, b_values: Sequence[float] = (1.0, 1.5)) -> dict:
    """Norms and pairwise cosines of `grads` (`term_gradients`); with "skl" and "srkl", per b in `b_values`:
    the SRKL term's share of the combined update's norm, |b g_srkl| / (|(2 - b) g_skl| + |b g_srkl|), and the
    cosine of the combined update (2 - b) g_skl + b g_srkl with the KL term's gradient (when "kl" is given).
    A cosine is None where a gradient is 0. Computed in float64: a float32 dot product over the ~10^8 entries of a
    model's gradient can be off in the third digit, and by how much depends on the thread count."""
    grads = {name: g.double() for name, g in grads.items()}
    names = list(grads)
    report: dict = {"norm": {n: float(grads[n].norm().item()) for n in names},
                    "cosine": {f"{a}~{b}": _cosine(grads[a], grads[b])
                               for i, a in enumerate(names) for b in names[i + 1:]}}
    if "skl" in grads and "srkl" in grads:
        mix = {}
        for b in b_values:
            t, s = (2.0 - b) * grads["skl"], b * grads["srkl"]
            nt, ns = t.norm().item(), s.norm().item()
            row = {"srkl_share": ns / (nt + ns) if nt + ns > 0 else None}
            if "kl" in grads:
                row["cosine_with_kl"] = _cosine(t + s, grads["kl"])
            mix[f"b={b:g}"] = row
        report["mix"] = mix
    return report


def format_report(report: dict, label: str = "") -> str:
    """The report as a few plain lines."""
    f = lambda x: "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"  # noqa: E731
    lines = [f"{label}norms: " + ", ".join(f"{k} {v:.4g}" for k, v in report["norm"].items()),
             f"{label}cosines: " + ", ".join(f"{k} {f(v)}" for k, v in report["cosine"].items())]
    for b, row in report.get("mix", {}).items():
        lines.append(f"{label}{b}: SRKL share {f(row['srkl_share'])}"
                     + (f", cosine of the combined update with the KL gradient {f(row['cosine_with_kl'])}"
                        if "cosine_with_kl" in row else ""))
    return "\n".join(lines)
