"""CALD (DistiLLM-2's loss), its b ramp and curriculum skew, and the method's run state."""

import math

import pytest
import torch

from tolerances import rounding_rtol, softmax_atol, sum_atol
from distillm.losses.cald import b_schedule, cald_loss, curriculum_alpha, curriculum_skew, sequence_mean_logprob
from distillm.config import load_config
from distillm.methods.base import LossInputs
from distillm.methods.distillm2 import DistiLLM2


def distillm2(**options):
    return DistiLLM2(load_config(overrides=options))


def _inputs(student, teacher, targets, step, total_steps, normalizer):
    return LossInputs(student, teacher, targets, targets.shape[0] // 2, normalizer, step=step, total_steps=total_steps)


def brute_skl(s, t, a):
    p, q = t.double().softmax(-1), s.double().softmax(-1)
    return (p * (p / (a * p + (1 - a) * q)).log()).sum(-1)


def brute_srkl(s, t, a):
    p, q = t.double().softmax(-1), s.double().softmax(-1)
    return (q * (q / ((1 - a) * p + a * q)).log()).sum(-1)


def test_b_schedule_ramps_linearly_then_holds():
    # exact: progress is 1/2 or 1 (0.2 * 100 rounds to 20 exactly), and 1 + 0.5 * {0.5, 1} are exact binary numbers
    assert b_schedule(0, 100) == 1.0
    assert b_schedule(25, 100) == 1.25
    assert b_schedule(50, 100) == 1.5
    assert b_schedule(99, 100) == 1.5
    assert b_schedule(60, 100, ramp=False) == 1.0
    assert b_schedule(10, 100, b_start=1.0, b_end=2.0, ramp_fraction=0.2) == 1.5


def _alpha_atol(ratio, alpha):
    """float32 a = 1 - ratio: ratio = (1 - a0) * gap_ref / gap went through four roundings (the product in float64,
    its cast and the gap's to float32, the quotient), the subtraction one more (tolerances.rounding_rtol)."""
    return rounding_rtol(4, torch.float32) * abs(ratio) + rounding_rtol(1, torch.float32) * abs(alpha)


def test_curriculum_skew_tracks_difficulty_and_clamps():
    gaps = torch.tensor([0.2, 0.4, 0.1, -0.3, 5.0])
    alpha = curriculum_skew(gaps, 0.2, skew=0.1, skew_min=0.01, skew_max=0.5)
    a_min = torch.tensor(0.01).item()  # a clamped value is the bound itself, in float32: compared exactly
    assert alpha[0].item() == pytest.approx(0.1, rel=0, abs=_alpha_atol(0.9, 0.1))  # gap == reference -> a0
    assert alpha[1].item() == 0.5  # harder -> larger (1 - 0.9 * 0.2 / 0.4 = 0.55, clamped)
    assert alpha[2].item() == a_min  # easier -> smaller (1 - 1.8 < 0 -> a_min)
    assert alpha[3].item() == a_min  # student already ahead -> a_min
    assert alpha[4].item() == 0.5
    mid = curriculum_skew(torch.tensor([0.25]), 0.2, skew=0.1, skew_min=0.01, skew_max=0.5)
    want = 1 - 0.9 * 0.2 / 0.25  # inside the clamp: exactly Eq. 8 (float32 rounding: _alpha_atol)
    assert mid.item() == pytest.approx(want, rel=0, abs=_alpha_atol(0.9 * 0.2 / 0.25, want))
    assert torch.equal(curriculum_skew(gaps, None, skew=0.1), torch.full_like(gaps, 0.1))
    # the earlier name and keywords: the same function
    assert torch.equal(curriculum_alpha(gaps, 0.2, alpha0=0.1, alpha_min=0.01, alpha_max=0.5), alpha)


def test_cald_loss_matches_brute_force_with_mask_and_weights():
    torch.manual_seed(0)
    B, T, V = 3, 4, 11
    s_t, t_t, s_s, t_s = (torch.randn(B, T, V) for _ in range(4))
    mask_t = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    mask_s = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0]], dtype=torch.bool)
    a_t, a_s = torch.tensor([0.1, 0.3, 0.05]), torch.tensor([0.2, 0.01, 0.4])
    got = cald_loss(s_t, t_t, mask_t, a_t, s_s, t_s, mask_s, a_s, b=1.3)
    skl = torch.stack([brute_skl(s_t[i], t_t[i], a_t[i].double())[mask_t[i]].mean() for i in range(B)]).mean()
    srkl = torch.stack([brute_srkl(s_s[i], t_s[i], a_s[i].double())[mask_s[i]].mean() for i in range(B)]).mean()
    # fp32 per-token divergences vs float64 brute force (softmax_atol each), weighted by (2 - b) + b = 2
    atol = 2 * softmax_atol(s_t, t_t, s_s, t_s) + sum_atol(B * T, abs(got.item()))
    assert got.item() == pytest.approx((0.7 * skl + 1.3 * srkl).item(), rel=0, abs=atol)
    tok = cald_loss(s_t, t_t, mask_t, a_t, s_s, t_s, mask_s, a_s, b=1.0, reduction="token_mean")
    skl_tok = torch.cat([brute_skl(s_t[i], t_t[i], a_t[i].double())[mask_t[i]] for i in range(B)]).mean()
    srkl_tok = torch.cat([brute_srkl(s_s[i], t_s[i], a_s[i].double())[mask_s[i]] for i in range(B)]).mean()
    assert tok.item() == pytest.approx((skl_tok + srkl_tok).item(), rel=0, abs=atol)
    with pytest.raises(ValueError, match="reduction"):
        cald_loss(s_t, t_t, mask_t, a_t, s_s, t_s, mask_s, a_s, reduction="mean")


def test_srkl_pushes_down_student_mass_where_teacher_disagrees():
    """The SRKL term's gradient lowers the student's logit of a token the teacher considers unlikely."""
    teacher = torch.tensor([[[4.0, 0.0, -4.0]]])
    student = torch.tensor([[[0.0, 0.0, 3.0]]], requires_grad=True)
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss = cald_loss(student, teacher, torch.zeros_like(mask), 0.1, student, teacher, mask, 0.1, b=1.0)
    loss.backward()
    assert student.grad[0, 0, 2] > 0  # gradient descent lowers the wrong token's logit
    assert student.grad[0, 0, 0] < 0  # and raises the teacher's favourite


def test_sequence_mean_logprob_is_mean_of_label_logprobs():
    logits = torch.randn(2, 3, 5)
    labels = torch.tensor([[1, 2, -100], [4, 0, 3]])
    mask = labels != -100
    got = sequence_mean_logprob(logits, labels, mask)
    logp = logits.log_softmax(-1)
    tol = dict(rel=0, abs=2 * softmax_atol(logits))  # fp32 log-softmax by two routes, means of <= 3 of them
    assert got[0].item() == pytest.approx(((logp[0, 0, 1] + logp[0, 1, 2]) / 2).item(), **tol)
    assert got[1].item() == pytest.approx(((logp[1, 0, 4] + logp[1, 1, 0] + logp[1, 2, 3]) / 3).item(), **tol)


def _method_batch(seed=0, n=2, T=3, V=7):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(2 * n, T, V, generator=g)
    teacher = torch.randn(2 * n, T, V, generator=g) * 2
    targets = torch.randint(0, V, (2 * n, T), generator=g)
    targets[0, 0] = -100
    return student, teacher, targets


def test_method_normalises_by_global_counts_and_reports_metrics():
    student, teacher, targets = _method_batch()
    method = distillm2(curriculum=False, b_ramp=False)
    loss, sums, gauges = method.compute_loss(
        _inputs(student, teacher, targets, step=0, total_steps=10, normalizer=torch.tensor([2.0, 5.0, 6.0])))
    loss_half, _, _ = method.compute_loss(
        _inputs(student, teacher, targets, step=0, total_steps=10, normalizer=torch.tensor([4.0, 10.0, 12.0])))
    # divided by the optimizer-step batch, not this one: every weight 1 / (2 x counts) is exactly half of
    # 1 / counts (a division by a power of two more), so the loss is exactly half
    assert loss_half.item() == loss.item() / 2
    mask = targets != -100
    expected = cald_loss(student[:2], teacher[:2], mask[:2], 0.1, student[2:], teacher[2:], mask[2:], 0.1, b=1.0)
    tol = dict(rel=0, abs=2 * (2 * softmax_atol(student, teacher)))  # two fp32 evaluations, weights (2 - b) + b
    assert loss.item() == pytest.approx(expected.item(), **tol)
    # skew_t: a0 = 0.1 in float32 for each of two pairs, summed exactly (a doubling)
    assert sums["units"] == 2 and sums["skew_t"] == 2 * torch.tensor(0.1).item() and gauges["b"] == 1.0
    assert (sums["skl"] + sums["srkl"]) / 2 == pytest.approx(expected.item(), **tol)


def test_curriculum_reference_updates_once_per_optimizer_step():
    student, teacher, targets = _method_batch()
    method = distillm2(curriculum=True, gap_momentum=0.5)
    norm = torch.tensor([2.0, 5.0, 6.0])
    _, sums, _ = method.compute_loss(_inputs(student, teacher, targets, step=0, total_steps=4, normalizer=norm))
    assert sums["skew_t"] == 2 * torch.tensor(0.1).item()  # no reference yet: a0 (float32) for both samples
    assert method.gap_ref == {"t": None, "s": None}  # nothing folded before the step ends
    method.on_step_end()
    first = dict(method.gap_ref)
    assert first["t"] is not None and first["s"] is not None
    method.compute_loss(_inputs(student, teacher, targets, step=1, total_steps=4, normalizer=norm))
    method.on_step_end()
    # same batch again: the momentum average of two equal batch gaps is unchanged
    # (exactly: 0.5 * g + 0.5 * g = g, and the same batch gives the same g)
    assert method.gap_ref["t"] == first["t"]
    restored = distillm2()
    restored.load_state_dict(method.state_dict())
    assert restored.gap_ref == method.gap_ref
    assert not math.isnan(first["t"])
