"""Fused chunked losses against the plain functions on full logits: values and gradients (student hidden states,
head weight, bias) for every divergence, chunk sizes, masks, per-token skews, extreme logits, temperature and a
padded vocabulary; and a bound on the largest tensor they create or save (O(chunk x V), never O(N x V))."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from distillm.losses import divergences as D
from distillm.losses.fused import (
    HeadInputs, fused_divergence, fused_forward_kl, fused_generalized_jsd, fused_skew_forward_kl,
    fused_skew_reverse_kl, fused_token_log_probs, fused_weighted_divergence, mixture_weight,
)
from distillm.training.collate import pad_left, response_logits
from distillm.training.fused_inputs import fused_inputs
from tolerances import forward_atol, head_atol

B, T, H, HT, V, PAD = 3, 5, 8, 6, 37, 4  # N = 15 tokens; heads padded by PAD rows beyond the vocabulary
N = B * T

PLAIN = {
    "fkl": lambda s, t, w, **k: D.forward_kl(s, t, **k),
    "rkl": lambda s, t, w, **k: D.reverse_kl(s, t, **k),
    "skl": lambda s, t, w, detach=False, **k: D.skew_forward_kl(s, t, w, detach_student_in_mixture=detach, **k),
    "srkl": lambda s, t, w, detach=True, **k: D.skew_reverse_kl(s, t, w, detach_student_in_mixture=detach, **k),
    "jsd": lambda s, t, w, **k: D.generalized_jsd(s, t, w, **k),
    "tvd": lambda s, t, w, **k: D.total_variation(s, t, **k),
    "acceptance": lambda s, t, w, **k: D.acceptance_rate(s, t, **k),
}
WEIGHTS = {"fkl": None, "rkl": None, "skl": 0.1, "srkl": 0.1, "jsd": 0.5, "tvd": None, "acceptance": None}


def make(seed=0, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    student = HeadInputs(scale * r(B, T, H), r(V + PAD, H), r(V + PAD))
    teacher = HeadInputs(scale * r(B, T, HT), r(V + PAD, HT), r(V + PAD))
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 0] = True
    upstream = torch.rand(B, T, generator=g, dtype=dtype) + 0.5
    return student, teacher, mask, upstream


def leaves(student):
    return HeadInputs(*(x.detach().clone().requires_grad_(True) for x in student))


def grads(head):
    return [x.grad for x in head]


def plain_values(name, student, teacher, weight, mask, tau=1.0, detach=None, vocab=V):
    """The reference: full logits [N, V], the plain function, masked tokens set to 0."""
    s = F.linear(student.hidden, student.weight[:vocab], student.bias[:vocab]).reshape(N, vocab)
    if isinstance(teacher, HeadInputs):
        t = F.linear(teacher.hidden, teacher.weight[:vocab], teacher.bias[:vocab]).reshape(N, vocab)
    else:
        t = teacher.reshape(N, -1)[:, :vocab]
    if isinstance(weight, torch.Tensor):
        weight = weight.reshape(N) if weight.shape == (B, T) else weight.repeat_interleave(T)
    kw = {} if detach is None else {"detach": detach}
    out = PLAIN[name](s, t, weight, temperature=tau, **kw).reshape(B, T)
    return torch.where(mask, out, 0.0)


def tolerances(student, teacher_in, up, tau, dtype):
    """(per-token value, loss, gradient) bounds for fused vs plain in `dtype` (tolerances.head_atol): the loss sums
    the up-weighted values of N tokens; a gradient sums per-logit errors (the same size as the values') times a
    hidden state or a head row over the tokens."""
    value = head_atol(student, teacher_in, temperature=tau, dtype=dtype)
    total = float(up.sum())
    scale = max(1.0, *(float(x.detach().abs().max()) for x in (student.hidden, student.weight)))
    return value, value * total, value * total * scale


def check(name, weight=None, chunk=4, tau=1.0, detach=None, seed=0, dtype=torch.float64, scale=1.0,
          teacher_as_logits=False):
    student, teacher, mask, up = make(seed, dtype, scale)
    weight = WEIGHTS[name] if weight is None else weight
    teacher_in = teacher
    if teacher_as_logits:
        teacher_in = F.linear(teacher.hidden, teacher.weight, teacher.bias)
    atol, loss_atol, grad_atol = tolerances(student, teacher_in, up, tau, dtype)
    rtol = 0

    ref_s = leaves(student)
    ref = plain_values(name, ref_s, teacher_in, weight, mask, tau, detach)
    if ref.requires_grad:
        (ref * up).sum().backward()
    kw = dict(mask=mask, temperature=tau, vocab_size=V, chunk_size=chunk)
    if detach is not None:
        kw["detach_student_in_mixture"] = detach

    fused_s = leaves(student)
    out = fused_divergence(name, fused_s, teacher_in, **mixture_weight(name, weight), **kw)
    assert out.shape == (B, T) and out.dtype == dtype
    torch.testing.assert_close(out, ref.detach(), atol=atol, rtol=rtol)
    (out * up).sum().backward()

    weighted_s = leaves(student)
    loss, values = fused_weighted_divergence(name, weighted_s, teacher_in, up, **mixture_weight(name, weight), **kw)
    assert not values.requires_grad
    torch.testing.assert_close(values, ref.detach(), atol=atol, rtol=rtol)
    torch.testing.assert_close(loss, (ref.detach() * up).sum(), atol=loss_atol, rtol=rtol)
    loss.backward()

    for r, f, w in zip(grads(ref_s), grads(fused_s), grads(weighted_s)):
        if r is None:  # no dependence on the student (SKL with the student detached in the mixture)
            assert f is None or not f.any()
            assert w is None or not w.any()
            continue
        torch.testing.assert_close(f, r, atol=grad_atol, rtol=rtol)
        torch.testing.assert_close(w, r, atol=grad_atol, rtol=rtol)
    return out, grads(fused_s)


# ------------------------------------------------------------------------------------ values and gradients
@pytest.mark.parametrize("chunk", [1, 4, 7, 15, 1000])
@pytest.mark.parametrize("name", list(PLAIN))
def test_matches_plain_every_divergence_and_chunk(name, chunk):
    _, (gh, gw, gb) = check(name, chunk=chunk)
    assert not gw[V:].any() and not gb[V:].any()  # padded vocabulary rows get no gradient


@pytest.mark.parametrize("tau", [0.5, 2.0])
@pytest.mark.parametrize("name", list(PLAIN))
def test_temperature(name, tau):
    check(name, tau=tau, chunk=6)


@pytest.mark.parametrize("name", ["skl", "srkl", "jsd"])
def test_per_token_and_per_row_weights_and_end_points(name):
    g = torch.Generator().manual_seed(3)
    hi = 1.0 if name == "jsd" else 0.9
    per_token = torch.rand(B, T, generator=g, dtype=torch.float64) * hi
    per_token[0, :2] = 0.0  # a = 0 (FKL / RKL), b = 0 (FKL)
    if name == "jsd":
        per_token[1, :2] = 1.0  # b = 1 (RKL)
    check(name, weight=per_token, chunk=4)
    check(name, weight=torch.tensor([0.0, 0.3, 0.7], dtype=torch.float64), chunk=7)
    for w in (0.0, 0.9) + ((1.0,) if name == "jsd" else ()):
        check(name, weight=w, chunk=5)


@pytest.mark.parametrize("name,detach", [("skl", True), ("skl", False), ("srkl", False), ("srkl", True)])
def test_detach_student_in_mixture(name, detach):
    check(name, detach=detach, chunk=4, weight=0.3)


def test_skew_zero_is_plain_kl_and_wrappers_agree():
    student, teacher, mask, _ = make(5)
    kw = dict(mask=mask, vocab_size=V, chunk_size=4)
    tol = dict(rtol=0, atol=2 * head_atol(student, teacher, dtype=torch.float64))  # two formulas, each within it
    torch.testing.assert_close(fused_skew_forward_kl(student, teacher, 0.0, **kw),
                               fused_forward_kl(student, teacher, **kw), **tol)
    torch.testing.assert_close(fused_skew_reverse_kl(student, teacher, 0.0, **kw),
                               fused_divergence("rkl", student, teacher, **kw), **tol)
    torch.testing.assert_close(fused_generalized_jsd(student, teacher, 0.0, **kw),
                               fused_forward_kl(student, teacher, **kw), **tol)


@pytest.mark.parametrize("name", list(PLAIN))
def test_float32_and_teacher_logits(name):
    check(name, dtype=torch.float32, teacher_as_logits=True, chunk=6)


@pytest.mark.parametrize("name", list(PLAIN))
def test_extreme_logits_and_masked_vocabulary(name):
    """|logit| ~ 1e4 and -inf entries shared by both models (a bias of -inf): finite values and gradients."""
    student, teacher, mask, up = make(7, scale=1.0)
    s_logits = F.linear(student.hidden, student.weight[:V], student.bias[:V])
    big = 1e4 / s_logits.abs().amax()
    bias = student.bias.clone() * big
    bias[[2, 11, 30]] = -math.inf
    student = HeadInputs(student.hidden * big, student.weight, bias)
    t_logits = 1e4 * torch.randn(B, T, V + PAD, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    t_logits[..., [2, 11, 30]] = -math.inf
    weight = WEIGHTS[name]

    ref_s = leaves(student)
    ref = plain_values(name, ref_s, t_logits, weight, mask)
    (ref * up).sum().backward()
    fused_s = leaves(student)
    out = fused_divergence(name, fused_s, t_logits, **mixture_weight(name, weight), mask=mask, vocab_size=V,
                           chunk_size=4)
    (out * up).sum().backward()
    assert torch.isfinite(out).all()
    far = 1 - out if name == "acceptance" else out
    assert far[mask].max() > 0.5  # really extreme: p and q far apart
    atol, _, grad_atol = tolerances(student, t_logits[..., :V], up, 1.0, torch.float64)
    torch.testing.assert_close(out, ref.detach(), atol=atol, rtol=0)
    for r, f in zip(grads(ref_s), grads(fused_s)):
        assert torch.isfinite(f).all()
        torch.testing.assert_close(f, r, atol=grad_atol, rtol=0)


def test_teacher_log_probs_equal_teacher_logits():
    student, teacher, mask, _ = make(9)
    t_logits = F.linear(teacher.hidden, teacher.weight[:V], teacher.bias[:V])
    for tau in (1.0, 0.7):
        a = fused_divergence("jsd", student, t_logits, beta=0.3, mask=mask, temperature=tau, chunk_size=4, vocab_size=V)
        b = fused_divergence("jsd", student, t_logits.log_softmax(-1), beta=0.3, mask=mask, temperature=tau,
                             chunk_size=4, vocab_size=V)
        # log_softmax(z) = z - logsumexp(z): the same softmax up to one rounding of each logit's size
        torch.testing.assert_close(a, b, rtol=0, atol=2 * head_atol(student, t_logits, temperature=tau,
                                                                     dtype=torch.float64))


def test_positions_equal_mask():
    student, teacher, mask, _ = make(10)
    a = fused_divergence("skl", student, teacher, alpha=0.2, mask=mask, vocab_size=V, chunk_size=3)
    b = fused_divergence("skl", student, teacher, alpha=0.2, positions=mask.reshape(-1).nonzero().squeeze(1),
                         vocab_size=V, chunk_size=3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same tokens through the same chunks


@pytest.mark.parametrize("chunk", [1, 4, 1000])
@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_token_log_probs(chunk, tau):
    student, _, mask, up = make(11)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(12))
    labels[~mask] = -100
    ref_s = leaves(student)
    ref = D.token_log_probs(F.linear(ref_s.hidden, ref_s.weight[:V], ref_s.bias[:V]), labels, temperature=tau)
    (ref * up).sum().backward()
    fused_s = leaves(student)
    out = fused_token_log_probs(fused_s, labels, temperature=tau, vocab_size=V, chunk_size=chunk)
    (out * up).sum().backward()
    atol, _, grad_atol = tolerances(student, student, up, tau, torch.float64)
    torch.testing.assert_close(out, ref.detach(), rtol=0, atol=atol)
    for r, f in zip(grads(ref_s), grads(fused_s)):
        torch.testing.assert_close(f, r, rtol=0, atol=grad_atol)
    with pytest.raises(ValueError, match="labels"):
        fused_token_log_probs(student, torch.full((B, T), V), vocab_size=V)


def test_frozen_weight_and_no_grad():
    student, teacher, mask, up = make(13)
    h = student.hidden.clone().requires_grad_(True)
    frozen = HeadInputs(h, student.weight, student.bias)
    loss, values = fused_weighted_divergence("fkl", frozen, teacher, up, mask=mask, vocab_size=V)
    loss.backward()
    assert h.grad is not None and h.grad[~mask].abs().max() == 0
    with torch.no_grad():
        out = fused_forward_kl(leaves(student), teacher, mask=mask, vocab_size=V)
    assert not out.requires_grad
    torch.testing.assert_close(out, values, rtol=0, atol=2 * head_atol(student, teacher, dtype=torch.float64))


def test_invalid_arguments():
    student, teacher, mask, _ = make(14)
    with pytest.raises(ValueError, match="unknown divergence"):
        fused_divergence("kl", student, teacher, vocab_size=V)
    with pytest.raises(ValueError, match="needs its mixture weight alpha="):
        fused_divergence("skl", student, teacher, vocab_size=V)
    with pytest.raises(ValueError, match="needs its mixture weight beta="):
        fused_divergence("jsd", student, teacher, vocab_size=V)
    with pytest.raises(ValueError, match="alpha"):
        fused_divergence("skl", student, teacher, alpha=1.0, vocab_size=V)
    with pytest.raises(ValueError, match="pass vocab_size"):  # heads of different sizes need the cut
        fused_forward_kl(student, HeadInputs(teacher.hidden, torch.cat([teacher.weight, teacher.weight[:2]])))
    with pytest.raises(ValueError, match="must be"):  # a teacher head smaller than the vocabulary
        fused_forward_kl(student, HeadInputs(teacher.hidden, teacher.weight[:V - 1]), vocab_size=V)
    with pytest.raises(ValueError, match="not both"):
        fused_forward_kl(student, teacher, mask=mask, positions=torch.tensor([0]), vocab_size=V)
    with pytest.raises(ValueError, match="temperature"):
        fused_forward_kl(student, teacher, temperature=0.0, vocab_size=V)


@pytest.mark.parametrize("name", ["skl", "srkl", "jsd"])
def test_mixture_weight_has_its_own_name_and_the_old_keyword_still_works(name):
    student, teacher, mask, up = make(16)
    kw = dict(mask=mask, vocab_size=V, chunk_size=4)
    new = fused_divergence(name, student, teacher, **mixture_weight(name, 0.3), **kw)
    assert mixture_weight(name, 0.3) == ({"beta": 0.3} if name == "jsd" else {"alpha": 0.3})
    with pytest.warns(DeprecationWarning, match="alpha= .* or beta="):
        old = fused_divergence(name, student, teacher, weight=0.3, **kw)
    with pytest.warns(DeprecationWarning):
        positional = fused_divergence(name, student, teacher, 0.3, **kw)
    torch.testing.assert_close(old, new, rtol=0, atol=0)  # the same value through the same kernel
    torch.testing.assert_close(positional, new, rtol=0, atol=0)
    with pytest.warns(DeprecationWarning):
        old_loss, _ = fused_weighted_divergence(name, student, teacher, up, weight=0.3, **kw)
    new_loss, _ = fused_weighted_divergence(name, student, teacher, up, **mixture_weight(name, 0.3), **kw)
    torch.testing.assert_close(old_loss, new_loss, rtol=0, atol=0)
    other = "alpha" if name == "jsd" else "beta"  # the other divergence family's weight is refused, by name
    with pytest.raises(ValueError, match=f"{name} takes {'beta' if name == 'jsd' else 'alpha'}=, got {other}="):
        fused_divergence(name, student, teacher, **{other: 0.3}, **kw)
    with pytest.raises(TypeError, match="not also weight="):
        fused_divergence(name, student, teacher, weight=0.3, **mixture_weight(name, 0.3), **kw)


def test_divergences_without_a_mixture_weight_refuse_one():
    student, teacher, mask, _ = make(17)
    assert mixture_weight("fkl", 0.3) == {}
    with pytest.raises(ValueError, match="fkl takes no mixture weight, got alpha="):
        fused_divergence("fkl", student, teacher, alpha=0.3, mask=mask, vocab_size=V)
    with pytest.warns(DeprecationWarning):  # the old keyword was ignored there: it still is
        old = fused_divergence("fkl", student, teacher, weight=0.3, mask=mask, vocab_size=V)
    torch.testing.assert_close(old, fused_divergence("fkl", student, teacher, mask=mask, vocab_size=V), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- memory bound
class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an aten op creates (forward and backward, on this thread)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("name", ["jsd", "srkl", "tvd"])
def test_memory_bounded_by_the_chunk(name):
    """Nothing the fused loss creates or saves for the backward is O(N x V): the largest is O(chunk x V)."""
    n, h, v, chunk = 1024, 16, 1024, 32
    g = torch.Generator().manual_seed(0)
    student = HeadInputs(torch.randn(n, h, generator=g, requires_grad=True),
                         torch.randn(v, h, generator=g, requires_grad=True), torch.zeros(v, requires_grad=True))
    teacher = HeadInputs(torch.randn(n, h, generator=g), torch.randn(v, h, generator=g))
    up = torch.rand(n, generator=g)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    for fn in ("per_token", "weighted"):
        created = LargestTensor()
        with created, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if fn == "per_token":
                out = fused_divergence(name, student, teacher, **mixture_weight(name, WEIGHTS[name]), chunk_size=chunk)
                (out * up).sum().backward()
            else:
                loss, _ = fused_weighted_divergence(name, student, teacher, up, **mixture_weight(name, WEIGHTS[name]),
                                                    chunk_size=chunk)
                loss.backward()
        # saved: the inputs (or their gradients) by the fused function, one chunk's logits inside a chunk
        assert max(saved) <= max(n * h, v * h, 2 * chunk * v)
        assert created.largest <= 4 * chunk * v < n * v // 4
    # the probe sees the plain path's full logits
    plain = LargestTensor()
    with plain:
        s = F.linear(student.hidden, student.weight, student.bias)
        PLAIN[name](s, F.linear(teacher.hidden, teacher.weight), WEIGHTS[name]).sum().backward()
    assert plain.largest >= n * v


# ------------------------------------------------------------------------------------ transformers models
def test_fused_inputs_match_response_logits(teacher, student, encoded_prompts, tokenizer):
    sequences = [(p.input_ids + [5, 6, 7][: 1 + i % 3], 1 + i % 3) for i, p in enumerate(encoded_prompts[:4])]
    batch = pad_left(sequences, tokenizer.pad_token_id)
    vocab = len(tokenizer) - 3  # a cut below the head's rows, as with a padded head
    s_logits, targets = response_logits(student, batch, vocab)
    with torch.no_grad():
        t_logits, _ = response_logits(teacher, batch, vocab)
    fs = fused_inputs(student, batch)
    with torch.no_grad():
        ft = fused_inputs(teacher, batch)
    assert torch.equal(fs.labels, targets) and torch.equal(fs.mask, targets != -100)
    ref = torch.where(fs.mask, D.skew_forward_kl(s_logits, t_logits, 0.1), 0.0)
    out = fused_skew_forward_kl(fs.head, ft.head, 0.1, mask=fs.mask, vocab_size=vocab, chunk_size=3)
    # float32 heads of the tiny models: the same logits by another route (tolerances.head_atol)
    atol = head_atol(tuple(fs.head), tuple(ft.head))
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)
    ref_lp = D.token_log_probs(s_logits, targets)
    torch.testing.assert_close(fused_token_log_probs(fs.head, fs.labels, vocab_size=vocab), ref_lp,
                               atol=atol, rtol=0)
    # gradients reach the student's parameters through the hidden states and the head
    params = [p for p in student.parameters() if p.requires_grad]
    g_ref = torch.autograd.grad(ref.sum(), params, allow_unused=True)
    g_fused = torch.autograd.grad(out.sum(), params, allow_unused=True)
    for r, f in zip(g_ref, g_fused):
        if r is not None:
            # a parameter's gradient sums per-logit errors over every response token, through the network
            # (tolerances.forward_atol's relative error, here on gradients of size max|r|)
            grad_atol = atol * int(fs.mask.sum()) + forward_atol(student.config, r)
            torch.testing.assert_close(f, r, atol=grad_atol, rtol=0)


@pytest.mark.parametrize("name", ["fkl", "srkl", "jsd", "acceptance"])
def test_frozen_head_per_token(name):
    """Only the hidden states need a gradient: the forward keeps dd/dh, the backward does not recompute."""
    student, teacher, mask, up = make(15)
    ref_h = student.hidden.clone().requires_grad_(True)
    ref = plain_values(name, HeadInputs(ref_h, student.weight, student.bias), teacher, WEIGHTS[name], mask)
    (ref * up).sum().backward()
    h = student.hidden.clone().requires_grad_(True)
    out = fused_divergence(name, HeadInputs(h, student.weight, student.bias), teacher,
                           **mixture_weight(name, WEIGHTS[name]), mask=mask, vocab_size=V, chunk_size=4)
    (out * up).sum().backward()
    atol, _, grad_atol = tolerances(student, teacher, up, 1.0, torch.float64)
    torch.testing.assert_close(out, ref.detach(), rtol=0, atol=atol)
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=0, atol=grad_atol)
