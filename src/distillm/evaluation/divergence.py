"""Cheap local evaluation: how close is the student to the teacher?

- `teacher_nll`: the teacher's mean per-token negative log-likelihood of responses the student sampled
  (lower: the student writes what the teacher would write).
- `sequence_log_likelihoods`: the teacher's summed log-likelihood and token count of each response, in the rows'
  order (the preference figure's per-answer scores; `normalised_scores` divides them).
- `teacher_student_divergence`: on held-out teacher responses, the token-level KL(p || q), the total variation
  distance and the expected speculative-decoding acceptance rate 1 - TVD, averaged over response tokens; and
  each model's mean next-token entropy there (a student flatter or sharper than its teacher).
- `served_teacher_nll` / `served_teacher_student_divergence`: the same figures from a teacher that is not in this
  process (--teacher-url), through a callable that gives a batch's top-k scores (`teacher.remote.RemoteScores`):
  the NLL is exact (the server sends each actual token's log-prob), KL / TVD / acceptance rate use the top-k
  teacher with its tail spread as in training (losses.fused.TopKTeacher; the actual token a known entry).
"""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..models import eval_mode
from ..losses.divergences import acceptance_rate, forward_kl, token_log_probs, total_variation
from ..losses.fused import dense_teacher_logprobs, with_actual_token
from ..training.collate import IGNORE, build_sequences, pad_left, response_logits


def scoring_batches(rows: Sequence[dict], batch_size: int, max_length: int, pad_token_id: int, device, image_inputs=None):
    # longest first: padding is shared by similar lengths, and an out-of-memory shows up at once
    order = sorted(range(len(rows)), key=lambda i: -(len(rows[i]["prompt_ids"]) + len(rows[i]["response_ids"])))
    for start in range(0, len(order), batch_size):
        chunk = [rows[i] for i in order[start:start + batch_size]]
        batch = pad_left([build_sequences(r["prompt_ids"], r["response_ids"], max_length) for r in chunk],
                         pad_token_id)
        if image_inputs is not None:  # a vision-language model: each row's image (training.vision.ImageInputs)
            batch.update(image_inputs(chunk))
        yield {key: value.to(device) for key, value in batch.items()}


@torch.inference_mode()
def teacher_nll(teacher, rows: Sequence[dict], *, vocab_size: int, pad_token_id: int, max_length: int,
                batch_size: int = 8, desc: str = "teacher NLL", image_inputs=None) -> float:
    """Mean over all response tokens of -log p_teacher(token | prefix)."""
    total, count = 0.0, 0
    with eval_mode(teacher):
        batches = list(scoring_batches(rows, batch_size, max_length, pad_token_id, teacher.device, image_inputs))
        for batch in tqdm(batches, desc=desc, leave=False):
            logits, targets = response_logits(teacher, batch, vocab_size)
            total += -token_log_probs(logits, targets).sum().item()
            count += int((targets != IGNORE).sum().item())
    return total / max(count, 1)


@torch.inference_mode()
def teacher_student_divergence(teacher, student, rows: Sequence[dict], *, vocab_size: int, pad_token_id: int,
                               max_length: int, batch_size: int = 8, desc: str = "divergence",
                               image_inputs=None) -> dict[str, float]:
    """Token-mean KL(p || q), TVD and acceptance rate (1 - TVD) over the response tokens of `rows`; and each
    model's mean next-token entropy there (`entropy`: is the student sharper or flatter than the teacher?)."""
    sums = {"kl": 0.0, "tvd": 0.0, "acceptance_rate": 0.0, "student_entropy": 0.0, "teacher_entropy": 0.0}
    count = 0
    with eval_mode(teacher, student):
        batches = list(scoring_batches(rows, batch_size, max_length, pad_token_id, teacher.device, image_inputs))
        for batch in tqdm(batches, desc=desc, leave=False):
            p_logits, targets = response_logits(teacher, batch, vocab_size)
            q_logits, _ = response_logits(student, batch, vocab_size)
            p_logits, q_logits, mask = p_logits.float(), q_logits.float().to(p_logits.device), targets != IGNORE
            for key, fn in (("kl", forward_kl), ("tvd", total_variation), ("acceptance_rate", acceptance_rate)):
                sums[key] += fn(q_logits, p_logits)[mask].sum().item()
            sums["student_entropy"] += entropy(q_logits)[mask].sum().item()
            sums["teacher_entropy"] += entropy(p_logits)[mask].sum().item()
            count += int(mask.sum().item())
    return {key: value / max(count, 1) for key, value in sums.items()}


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """The entropy (nats) of softmax(logits) over the last dimension; a token at -inf (probability 0) adds 0."""
    return torch.special.entr(torch.softmax(logits.float(), dim=-1)).sum(-1)


@torch.inference_mode()
def served_teacher_nll(teacher_scores, rows: Sequence[dict], *, pad_token_id: int, max_length: int,
                       batch_size: int = 8, desc: str = "teacher NLL (server)", **_) -> float:
    """`teacher_nll` from a served teacher: `teacher_scores(batch)` gives the batch's `TopKTeacher` [B, R, k] whose
    `target` holds the exact log-prob of each actual response token (R and its left padding as `response_logits`'
    targets). Exact: no top-k approximation enters."""
    total, count = 0.0, 0
    for batch in tqdm(list(scoring_batches(rows, batch_size, max_length, pad_token_id, "cpu")), desc=desc,
                      leave=False):
        scores = teacher_scores(batch)
        targets = _response_targets(batch)
        mask = targets != IGNORE
        if scores.target is None or scores.target.shape != targets.shape:
            raise ValueError("the served teacher's scores must carry the actual tokens' log-probs, one per response "
                             f"position {tuple(targets.shape)}")
        total += -scores.target.double()[mask.to(scores.target.device)].sum().item()
        count += int(mask.sum().item())
    return total / max(count, 1)


@torch.inference_mode()
def served_teacher_student_divergence(teacher_scores, student, rows: Sequence[dict], *, vocab_size: int,
                                      pad_token_id: int, max_length: int, batch_size: int = 8,
                                      desc: str = "divergence (server)", **_) -> dict[str, float]:
    """`teacher_student_divergence` against a served teacher's top-k (`teacher_scores(batch)`: a `TopKTeacher`),
    its distribution rebuilt as the losses rebuild it: the k log-probs, the actual token's exact log-prob as one
    more known entry, the rest of the mass spread by the scores' tail rule (guided by the student's logits for the
    student / power tails)."""
    sums = {"kl": 0.0, "tvd": 0.0, "acceptance_rate": 0.0, "student_entropy": 0.0}
    count = 0
    device = next(student.parameters()).device
    with eval_mode(student):
        for batch in tqdm(list(scoring_batches(rows, batch_size, max_length, pad_token_id, device)), desc=desc,
                          leave=False):
            scores = teacher_scores(batch)
            q_logits, targets = response_logits(student, batch, vocab_size)
            q_logits, mask = q_logits.float(), targets != IGNORE
            scores = with_actual_token(scores, targets.to(scores.indices.device))
            p_logits = dense_teacher_logprobs(scores, vocab_size, q_logits.to(scores.logprobs.device),
                                              "fkl").to(device)
            for key, fn in (("kl", forward_kl), ("tvd", total_variation), ("acceptance_rate", acceptance_rate)):
                sums[key] += fn(q_logits, p_logits)[mask].sum().item()
            sums["student_entropy"] += entropy(q_logits)[mask].sum().item()  # the teacher's: only its top-k here
            count += int(mask.sum().item())
    return {key: value / max(count, 1) for key, value in sums.items()}


def _response_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The response tokens [N, R] of a batch, as `response_logits` returns them (R: the longest response)."""
    labels = batch["labels"]
    width = max(int((labels != IGNORE).sum(-1).max().item()), 1)
    return labels[:, -width:]


@torch.inference_mode()
def sequence_log_likelihoods(teacher, rows: Sequence[dict], *, vocab_size: int, pad_token_id: int, max_length: int,
                             batch_size: int = 8, desc: str = "teacher log-likelihood") -> list[tuple[float, int]]:
    """Per row, in the rows' order: (sum over its response tokens of log p_teacher(token | prefix), number of
    those tokens). The response is cut to fit max_length as in training (`build_sequences`); batches are formed
    longest first, as in `teacher_nll`, and each result is put back at its row's place."""
    order = sorted(range(len(rows)), key=lambda i: -(len(rows[i]["prompt_ids"]) + len(rows[i]["response_ids"])))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    with eval_mode(teacher):
        for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
            chunk = order[start:start + batch_size]
            batch = pad_left([build_sequences(rows[i]["prompt_ids"], rows[i]["response_ids"], max_length)
                              for i in chunk], pad_token_id)
            logits, targets = response_logits(teacher, {k: v.to(teacher.device) for k, v in batch.items()},
                                              vocab_size)
            sums = token_log_probs(logits, targets).double().sum(-1).tolist()
            counts = (targets != IGNORE).sum(-1).tolist()
            for i, total, count in zip(chunk, sums, counts):
                out[i] = (total, int(count))
    return out


def normalised_scores(likelihoods: Sequence[tuple[float, int]]) -> list[float]:
    """Length-normalised log-likelihoods: sum / tokens; -inf for a response with no token (never preferred)."""
    return [total / count if count else float("-inf") for total, count in likelihoods]
