"""evaluation.gradients: each loss term's parameter gradient, against a plain one-row-at-a-time reference."""

import copy

import pytest
import torch

from distillm.evaluation.gradients import format_report, gradient_report, term_gradients
from distillm.models import load_model, real_vocab_size

from tolerances import model_atol


@pytest.fixture(scope="module")
def pair():
    teacher, tokenizer = load_model("tiny-random", dtype="float32")
    student = copy.deepcopy(teacher)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a student near the teacher, as a quantized one is
        for p in student.parameters():
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=generator))
    return teacher, student, tokenizer


def rows(seed: int, n: int, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(3, vocab, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
        response = torch.randint(3, vocab, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        out.append({"id": str(i), "prompt_ids": prompt, "response_ids": response})
    out.append({"id": "empty", "prompt_ids": [5, 6], "response_ids": []})  # no response token: left out
    return out


def reference_gradient(teacher, student, rows, term: str, a: float, vocab: int) -> torch.Tensor:
    """One row at a time, no padding: the mean over responses of each response's token mean of the divergence,
    written out from the definitions."""
    params = [p for p in student.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    used = [r for r in rows if r["response_ids"]]
    for r in used:
        ids = torch.tensor([r["prompt_ids"] + r["response_ids"]])
        start, end = len(r["prompt_ids"]) - 1, ids.shape[1] - 1  # logits that predict the response tokens
        with torch.no_grad():
            log_p = torch.log_softmax(teacher(input_ids=ids).logits[0, start:end, :vocab].float(), -1)
        log_q = torch.log_softmax(student(input_ids=ids).logits[0, start:end, :vocab].float(), -1)
        p, q = log_p.exp(), log_q.exp()
        if term == "kl":
            values = (p * (log_p - log_q)).sum(-1)
        elif term == "skl":  # m1 = a p + (1 - a) q
            values = (p * (log_p - torch.log(a * p + (1 - a) * q))).sum(-1)
        else:  # srkl: m2 = (1 - a) p + a q, the q inside detached
            values = (q * (log_q - torch.log((1 - a) * p + a * q.detach()))).sum(-1)
        (values.mean() / len(used)).backward()
    grad = torch.cat([p.grad.reshape(-1) for p in params])
    for p in params:
        p.grad = None
    return grad


def test_each_term_gradient_is_the_plain_per_row_gradient(pair):
    teacher, student, tokenizer = pair
    vocab = real_vocab_size(tokenizer)
    data = {"teacher": rows(1, 5, vocab), "student": rows(2, 4, vocab)}
    grads = term_gradients(teacher, student, data, skew=0.2, vocab_size=vocab, pad_token_id=tokenizer.pad_token_id,
                           max_length=64, batch_size=3)
    assert set(grads) == {"kl", "skl", "srkl"}
    n_tokens = sum(len(r["prompt_ids"]) + len(r["response_ids"]) for r in data["teacher"] + data["student"])
    for term, side in (("kl", "teacher"), ("skl", "teacher"), ("srkl", "student")):
        ref = reference_gradient(teacher, student, data[side], term, 0.2, vocab)
        assert ref.abs().max() > 0
        # batched with left padding against one row at a time: the same sums in another order
        torch.testing.assert_close(grads[term], ref, rtol=0, atol=model_atol(teacher.config, n_tokens, ref))
    assert all(p.grad is None for p in student.parameters())  # the model is left as it was
    assert not student.training


def test_report_norms_cosines_and_the_srkl_share(pair):
    g = {"kl": torch.tensor([1.0, 0.0, 0.0]), "skl": torch.tensor([2.0, 0.0, 0.0]), "srkl": torch.tensor([0.0, 3.0, 0.0])}
    report = gradient_report(g, b_values=(1.0, 1.5, 0.0))
    assert report["norm"] == {"kl": 1.0, "skl": 2.0, "srkl": 3.0}
    assert report["cosine"] == {"kl~skl": 1.0, "kl~srkl": 0.0, "skl~srkl": 0.0}
    # b = 1: |g_srkl| / (|g_skl| + |g_srkl|) = 3 / 5; b = 1.5: 4.5 / (1 + 4.5); b = 0: SKL alone
    assert report["mix"]["b=1"]["srkl_share"] == pytest.approx(3 / 5)
    assert report["mix"]["b=1.5"]["srkl_share"] == pytest.approx(4.5 / 5.5)
    assert report["mix"]["b=0"]["srkl_share"] == 0.0
    # the combined update (2 - b) g_skl + b g_srkl = (2, 3, 0) at b = 1: cosine with g_kl = 2 / sqrt(13)
    assert report["mix"]["b=1"]["cosine_with_kl"] == pytest.approx(2 / 13 ** 0.5)
    assert report["mix"]["b=0"]["cosine_with_kl"] == pytest.approx(1.0)
    zero = gradient_report({"kl": torch.zeros(3), "srkl": torch.ones(3)})
    assert zero["cosine"]["kl~srkl"] is None and "mix" not in zero  # no direction; no SKL term
    assert "SRKL share 0.600" in format_report(report) and "kl~srkl 0.000" in format_report(report)


def test_bad_terms_and_a_frozen_student_are_refused(pair):
    teacher, student, tokenizer = pair
    data = {"teacher": rows(3, 2, 50), "student": rows(4, 2, 50)}
    with pytest.raises(ValueError, match="Unknown term"):
        term_gradients(teacher, student, data, terms=("jsd",), vocab_size=50, pad_token_id=0, max_length=64)
    frozen = copy.deepcopy(student).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        term_gradients(teacher, frozen, data, vocab_size=50, pad_token_id=0, max_length=64)
