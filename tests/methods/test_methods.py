"""Every baseline's defining behaviour: the loss each applies (against plain references written here) and the
data each draws (on-policy fractions, the replay buffer and its threshold, joint decoding, task prefixes)."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
from transformers import TrainingArguments

from tolerances import softmax_atol, sum_atol
from distillm.config import load_config
from distillm.data.replay import ReplayBuffer
from distillm.generation.base import SamplingParams
from distillm.generation.hf import HFBackend
from distillm.methods import METHODS, build_method
from distillm.methods.base import LossInputs
from distillm.methods.step_by_step import split_rationale, with_prefix
from distillm.training.collate import DistillCollator, RowDataset
from distillm.training.sources import OnlineSampler
from distillm.training.trainer import DistillTrainer


def method(name, **options):
    return build_method(load_config(overrides={"method": name, **options}))


def random_batch(n=3, T=5, V=11, seed=0, groups=1):
    g = torch.Generator().manual_seed(seed)
    rows = n * groups
    student = torch.randn(rows, T, V, generator=g, requires_grad=True)
    teacher = torch.randn(rows, T, V, generator=g) * 2
    targets = torch.randint(0, V, (rows, T), generator=g)
    targets[0, :2] = -100  # a shorter response
    mask = targets != -100
    counts = torch.tensor([n, mask[:n].sum().item(), mask[n:].sum().item()], dtype=torch.float64)
    return LossInputs(student, teacher, targets, n, counts)


def plain_probs(logits):
    return [[torch.softmax(logits[i, t].double(), -1) for t in range(logits.shape[1])] for i in range(logits.shape[0])]


def brute(batch, token_value, rows=None, reduction="seq_mean"):
    """Reduce a per-token function of (p, q) by hand: mean per response, then mean over responses."""
    rows = range(batch.n_first) if rows is None else rows
    p, q = plain_probs(batch.teacher_logits.detach()), plain_probs(batch.student_logits.detach())
    per_seq, tokens, total = [], 0, 0.0
    for i in rows:
        values = [token_value(p[i][t], q[i][t]) for t in range(batch.targets.shape[1]) if batch.targets[i, t] != -100]
        per_seq.append(sum(values) / len(values) if values else 0.0)
        tokens += len(values)
        total += sum(values)
    return sum(per_seq) / len(per_seq) if reduction == "seq_mean" else total / tokens


def tol(batch, value):
    """fp32 method loss vs the float64 brute force: each token's value within softmax_atol, and the means over
    the batch's tokens add their own rounding (sum_atol)."""
    logits = [x for x in (batch.student_logits, batch.teacher_logits) if x is not None]
    return dict(rel=0, abs=softmax_atol(*logits) + sum_atol(batch.targets.numel(), abs(value)))


def kl(a, b):
    return float((a * (a / b).log()).sum())


@pytest.mark.parametrize("reduction", ["seq_mean", "token_mean"])
def test_kd_is_forward_kl_on_the_fixed_responses(reduction):
    m, batch = method("kd", reduction=reduction), random_batch()
    loss, sums, _ = m.compute_loss(batch)
    expected = brute(batch, lambda p, q: kl(p, q), reduction=reduction)
    assert loss.item() == pytest.approx(expected, **tol(batch, expected))
    rows = [{"id": "a"}]
    assert m.draw(rows, None, random.Random(0), 0, 10) == (rows, "fixed")  # never anything but the fixed data
    loss.backward()
    assert batch.student_logits.grad.abs().sum() > 0


def test_minillm_is_reverse_kl_on_fresh_student_samples():
    m, batch = method("minillm"), random_batch()
    loss, _, _ = m.compute_loss(batch)
    expected = brute(batch, lambda p, q: kl(q, p))
    assert loss.item() == pytest.approx(expected, **tol(batch, expected))
    sampler = FakeSampler()
    drawn = [m.draw([{"id": str(i)}], sampler, random.Random(i), i, 100)[1] for i in range(50)]
    assert drawn == ["student"] * 50 and sampler.calls == 50
    assert not m.uses_fixed_responses


def test_gkd_loss_is_the_generalised_jsd_with_its_beta():
    batch = random_batch()
    for beta in (0.1, 0.5, 0.9):
        loss, _, _ = method("gkd", jsd_beta=beta).compute_loss(batch)

        def jsd(p, q, b=beta):
            mix = b * p + (1 - b) * q
            return b * kl(p, mix) + (1 - b) * kl(q, mix)

        expected = brute(batch, jsd)
        assert loss.item() == pytest.approx(expected, **tol(batch, expected))


class FakeSampler:
    """Stands in for the live student: marks rows as freshly sampled."""

    def __init__(self):
        self.calls = 0

    def student(self, rows):
        self.calls += 1
        return [dict(r, response_ids=[7, 7], source="student", call=self.calls) for r in rows]


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5, 1.0])
def test_gkd_samples_on_policy_at_the_configured_fraction(lam):
    m, sampler, n = method("gkd", gkd_lambda=lam), FakeSampler(), 2000
    sources = [m.draw([{"id": "x", "response_ids": [1]}], sampler, random.Random(f"0:{step}"), step, n)[1]
               for step in range(n)]
    fraction = sources.count("student") / n
    assert sampler.calls == sources.count("student")
    # within 3 sigma of lambda (at lambda 0 or 1 every draw goes one way: the fraction is 0.0 or 1.0 exactly)
    assert abs(fraction - lam) <= 3 * math.sqrt(lam * (1 - lam) / n)


@pytest.mark.parametrize("fixed_fraction", [0.0, 0.25])
def test_imitkd_trains_on_student_responses_mixed_with_fixed_ones(fixed_fraction):
    m, sampler, n = method("imitkd", imitkd_fixed_fraction=fixed_fraction), FakeSampler(), 2000
    sources = [m.draw([{"id": "x"}], sampler, random.Random(step), step, n)[1] for step in range(n)]
    fraction = sources.count("fixed") / n
    # within 3 sigma (at 0 no draw is fixed: the fraction is 0.0 exactly)
    assert abs(fraction - fixed_fraction) <= 3 * math.sqrt(fixed_fraction * (1 - fixed_fraction) / n)
    batch = random_batch()
    loss, _, _ = m.compute_loss(batch)
    expected = brute(batch, lambda p, q: kl(p, q))
    assert loss.item() == pytest.approx(expected, **tol(batch, expected))


def test_seqkd_is_the_nll_of_the_teacher_responses_and_needs_no_teacher():
    m, batch = method("seqkd"), random_batch()
    loss, sums, _ = m.compute_loss(LossInputs(batch.student_logits, None, batch.targets, batch.n_first, batch.counts))
    logp = torch.log_softmax(batch.student_logits.detach().double(), -1)
    per_seq = []
    for i in range(batch.n_first):
        values = [-logp[i, t, batch.targets[i, t]].item() for t in range(5) if batch.targets[i, t] != -100]
        per_seq.append(sum(values) / len(values))
    expected = sum(per_seq) / len(per_seq)
    assert loss.item() == pytest.approx(expected, **tol(batch, expected))
    assert not m.needs_teacher


# --------------------------------------------------------------------------------------------- DPKD


def test_dpkd_loss_equals_the_closed_form_on_a_hand_built_batch():
    """Two pairs, responses of 2 and 1 tokens over a 3-token vocabulary, log-probs worked out by hand."""
    V = 3
    student = torch.zeros(4, 2, V)
    teacher = torch.zeros(4, 2, V)
    student[0, 0] = torch.tensor([2.0, 0.0, 0.0])  # chosen 1: tokens (0, 1)
    student[0, 1] = torch.tensor([0.0, 1.0, 0.0])
    student[2, 1] = torch.tensor([0.0, 0.0, 3.0])  # rejected 1: one token (2) in the last column
    teacher[0, 0] = torch.tensor([1.0, 0.0, 0.0])
    teacher[2, 1] = torch.tensor([0.0, 0.0, -1.0])
    student[1, 0] = torch.tensor([0.0, 0.5, 0.0])  # chosen 2: tokens (1, 1)
    teacher[3, 0] = torch.tensor([4.0, 0.0, 0.0])  # rejected 2: tokens (0, 0)
    targets = torch.tensor([[0, 1], [1, 1], [-100, 2], [0, 0]])
    m = method("dpkd", dpkd_beta=0.2)
    batch = LossInputs(student.clone().requires_grad_(), teacher, targets, 2, torch.tensor([2.0, 4.0, 3.0]))
    loss, sums, _ = m.compute_loss(batch)

    def lp(logits, token):  # log softmax by hand
        return logits[token] - math.log(sum(math.exp(x) for x in logits))

    def mean_lp(x, i):
        return sum(lp(x[i, t].tolist(), targets[i, t].item()) for t in range(2) if targets[i, t] != -100) / \
            sum(1 for t in range(2) if targets[i, t] != -100)

    expected = 0.0
    for c, r in ((0, 2), (1, 3)):
        margin = 0.2 * ((mean_lp(student, c) - mean_lp(student, r)) - (mean_lp(teacher, c) - mean_lp(teacher, r)))
        expected += -math.log(1 / (1 + math.exp(-margin)))
    expected = expected / 2
    assert loss.item() == pytest.approx(expected, **tol(batch, expected))
    # the gradient raises the student's chosen responses and lowers its rejected ones
    loss.backward()
    grad = batch.student_logits.grad
    assert grad[0, 0, 0] < 0 and grad[2, 1, 2] > 0
    assert m.paired_rounds and m.needs_teacher


# --------------------------------------------------------------------------------------------- DistiLLM v1


def test_replay_buffer_is_a_ring_that_samples_without_replacement():
    buffer = ReplayBuffer(capacity=3)
    buffer.push([{"id": str(i), "prompt_ids": [i], "response_ids": [i]} for i in range(5)])
    assert len(buffer) == 3 and sorted(int(x["id"]) for x in buffer.items) == [2, 3, 4]  # oldest replaced
    drawn = buffer.sample(3, random.Random(0))
    assert sorted(x["id"] for x in drawn) == ["2", "3", "4"] and all(x["source"] == "replay" for x in drawn)
    with pytest.raises(ValueError):
        buffer.sample(4, random.Random(0))
    restored = ReplayBuffer(1)
    restored.load_state_dict(buffer.state_dict())
    assert restored.items == buffer.items and restored.sample(2, random.Random(5)) == buffer.sample(2, random.Random(5))


def test_v1_threshold_rises_only_when_the_validation_loss_rises():
    m = method("distillm", v1_threshold_init=0.0, v1_threshold_step=0.1)
    for step, loss in enumerate([2.0, 1.5, 1.7, 1.6, 1.65, 1.8], start=1):
        m.observe_validation(loss, step)
    # exact: the method rounds each raised threshold to 10 decimals, i.e. to the double nearest 0.1, 0.2, 0.3
    assert [v[2] for v in m.validations] == [0.0, 0.0, 0.1, 0.1, 0.2, 0.3]
    for step in range(20):
        m.observe_validation(float(step), step)  # always rising
    assert m.threshold == 1.0  # capped


def test_v1_buffer_fills_then_replays_and_fixed_data_keeps_its_share():
    m = method("distillm", v1_threshold_init=0.6, v1_fresh_start=1.0, v1_fresh_end=0.0, v1_buffer_capacity=50)
    sampler, total = FakeSampler(), 400
    sources = []
    for step in range(total):
        rows = [{"id": f"{step}-{i}", "prompt_ids": [1], "response_ids": [2]} for i in range(4)]
        drawn, source = m.draw(rows, sampler, random.Random(step), step, total)
        sources.append(source)
        if source == "fixed":
            assert drawn is rows
        else:
            assert all(r["source"] in ("student", "replay") for r in drawn)
    first, last = sources[:100], sources[-100:]
    assert first.count("fresh") > 3 * first.count("replay")  # early: mostly fresh samples (fresh prob ~1)
    assert last.count("replay") > 3 * last.count("fresh")  # late: mostly replayed (fresh prob ~0)
    assert abs(sources.count("fixed") / total - 0.4) <= 3 * math.sqrt(0.4 * 0.6 / total)  # 1 - tau, 3 sigma
    assert len(m.buffer) == 50 and m.buffer.pushed == 4 * sources.count("fresh") and sampler.calls == sources.count("fresh")


def test_v1_loss_is_skew_kl_or_skew_reverse_kl_at_its_alpha():
    """As the released v1 code: the token mean over the batch (whatever --reduction says), no detach."""
    batch = random_batch()
    a = 0.1
    expected_skl = brute(batch, lambda p, q: kl(p, a * p + (1 - a) * q), reduction="token_mean")
    expected_srkl = brute(batch, lambda p, q: kl(q, (1 - a) * p + a * q), reduction="token_mean")
    for reduction in ("seq_mean", "token_mean"):
        loss, _, _ = method("distillm", v1_loss="skl", v1_skew=a, reduction=reduction).compute_loss(batch)
        assert loss.item() == pytest.approx(expected_skl, **tol(batch, expected_skl))
        loss, _, _ = method("distillm", v1_loss="srkl", v1_skew=a, reduction=reduction).compute_loss(batch)
        assert loss.item() == pytest.approx(expected_srkl, **tol(batch, expected_srkl))


@pytest.mark.parametrize("loss_name", ["skl", "srkl"])
def test_v1_gradient_does_not_detach_the_student_in_the_mixture(loss_name):
    """The gradient is that of the token-mean SKL / SRKL with the student's q inside the mixture differentiated
    (released v1 code), not DistiLLM-2's detached SRKL: checked against autograd on a float64 brute force."""
    batch = random_batch()
    a = 0.1
    loss, _, _ = method("distillm", v1_loss=loss_name, v1_skew=a).compute_loss(batch)
    loss.backward()
    s = batch.student_logits.detach().double().requires_grad_(True)
    p, q = torch.softmax(batch.teacher_logits.double(), -1), torch.softmax(s, -1)
    if loss_name == "skl":
        m = a * p + (1 - a) * q
        per_token = (p * (p / m).log()).sum(-1)
    else:
        m = (1 - a) * p + a * q
        per_token = (q * (q / m).log()).sum(-1)
    mask = batch.mask & (torch.arange(s.shape[0]) < batch.n_first).unsqueeze(-1)
    (per_token[mask].sum() / mask.sum()).backward()
    # each token's gradient is a softmax-sized fp32 computation (softmax_atol per unit of upstream gradient),
    # and the token mean scales it by 1 / (number of tokens)
    atol = softmax_atol(batch.student_logits, batch.teacher_logits) / int(mask.sum())
    torch.testing.assert_close(batch.student_logits.grad.double(), s.grad, atol=atol, rtol=0)
    if loss_name == "srkl":  # the detached variant (DistiLLM-2's) has a different gradient
        s.grad = None
        q = torch.softmax(s, -1)
        detached = (q * (q / ((1 - a) * p + a * q.detach())).log()).sum(-1)
        (detached[mask].sum() / mask.sum()).backward()
        assert (batch.student_logits.grad.double() - s.grad).abs().max() > 10 * atol


# --------------------------------------------------------------------------------------------- trainer-level


def rows_for(tokenizer, encoded_prompts, n=8):
    return [{"id": p.id, "prompt_ids": p.input_ids, "response_ids": [65, 66, 67, tokenizer.eos_token_id]}
            for p in encoded_prompts[:n]]


def trainer_for(tmp_path, m, teacher, student, tokenizer, rows, *, steps, validation_rows=None, temperature=1.0):
    args = TrainingArguments(
        output_dir=str(tmp_path / "ckpt"), per_device_train_batch_size=2, gradient_accumulation_steps=1,
        max_steps=steps, learning_rate=1e-3, lr_scheduler_type="constant", seed=0, report_to=[],
        save_strategy="no", logging_steps=1, remove_unused_columns=False, use_cpu=True, disable_tqdm=True,
    )
    sampler = OnlineSampler(student, teacher, tokenizer,
                            SamplingParams(temperature=temperature, top_p=1.0, max_new_tokens=6), len(tokenizer))
    return DistillTrainer(model=student, teacher=teacher, method=m, vocab_size=len(tokenizer), sampler=sampler,
                          validation_rows=validation_rows, args=args, train_dataset=RowDataset(rows),
                          data_collator=DistillCollator(tokenizer.pad_token_id, 128, m.sequences))


def test_gkd_in_the_trainer_trains_on_the_live_students_samples(tmp_path, teacher, student, tokenizer,
                                                               encoded_prompts):
    """Greedy sampling makes the on-policy responses checkable: they are what the student generates."""
    m = method("gkd", gkd_lambda=1.0)
    rows = rows_for(tokenizer, encoded_prompts)
    trainer = trainer_for(tmp_path, m, teacher, student, tokenizer, rows, steps=1, temperature=0.0)
    fixed = trainer.data_collator([{**r, "_index": i} for i, r in enumerate(rows[:2])])
    batch = trainer.get_batch_samples(iter([fixed]), 1, torch.device("cpu"))[0][0]
    expected = HFBackend(student, tokenizer).generate_batch([r["prompt_ids"] for r in rows[:2]],
                                                           SamplingParams(temperature=0, max_new_tokens=6), seed=0)
    for i, completion in enumerate(expected):
        labels = batch["labels"][i]
        assert labels[labels != -100].tolist() == completion.token_ids
    trainer.train()
    log = [e for e in trainer.state.log_history if "loss" in e][0]
    assert log["source_student"] == 1.0 and log["source_fixed"] == 0.0 and "jsd" in log


def test_v1_in_the_trainer_measures_validation_and_checkpoints_its_buffer(tmp_path, teacher, student, tokenizer,
                                                                        encoded_prompts):
    m = method("distillm", v1_threshold_init=1.0, v1_fresh_start=1.0, v1_fresh_end=0.0, v1_val_interval=2)
    rows = rows_for(tokenizer, encoded_prompts)
    trainer = trainer_for(tmp_path, m, teacher, student, tokenizer, rows, steps=8, validation_rows=rows[:4])
    trainer.train()
    logs = trainer.state.log_history
    assert [e["step"] for e in logs if "validation_loss" in e] == [2, 4, 6, 8]
    assert [e["step"] for e in logs if "loss" in e] == list(range(1, 9))  # one entry per step, none lost
    assert len(m.validations) == 4
    assert m.buffer.pushed > 0 and m.buffer.replayed > 0  # it filled and it replayed
    sources = [(e["source_fresh"], e["source_replay"]) for e in logs if "loss" in e]
    assert sources[0] == (1.0, 0.0) and (0.0, 1.0) in sources
    state = m.state_dict()
    restored = method("distillm")
    restored.load_state_dict(state)
    assert restored.buffer.items == m.buffer.items and restored.threshold == m.threshold


def test_seqkd_training_never_runs_the_teacher(tmp_path, teacher, student, tokenizer, encoded_prompts):
    calls = []
    handle = teacher.register_forward_hook(lambda *args: calls.append(1))
    trainer = trainer_for(tmp_path, method("seqkd"), teacher, student, tokenizer,
                          rows_for(tokenizer, encoded_prompts), steps=2)
    trainer.train()
    handle.remove()
    assert calls == [] and trainer.state.global_step == 2


# --------------------------------------------------------------------------------------------- speculative KD


def test_speculative_decoder_keeps_student_tokens_exactly_where_the_teacher_ranks_them_top_k(
        teacher, student, tokenizer, encoded_prompts):
    from distillm.generation.speculative import speculative_decode

    prompts = [p.input_ids for p in encoded_prompts[:4]]
    backend = HFBackend(student, tokenizer)
    k, V = 5, len(tokenizer)
    out = speculative_decode(student, teacher, prompts, SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=12),
                             top_k=k, seed=3, eos_ids=backend.eos_ids, pad_id=backend.pad_id, vocab_size=V)
    kept = replaced = 0
    for prompt, c in zip(prompts, out):
        # the teacher's top-K at each response position, from an independent forward pass over the result
        ids = torch.tensor([prompt + c.token_ids])
        with torch.no_grad():
            logits = teacher(input_ids=ids).logits[0, len(prompt) - 1:-1, :V]
        top = logits.topk(k, dim=-1).indices
        for t, (token, proposal, was_replaced) in enumerate(zip(c.token_ids, c.proposals, c.replaced)):
            in_top = proposal in top[t].tolist()
            assert was_replaced == (not in_top)
            if in_top:
                assert token == proposal  # a student token in the teacher's top-K is kept, exactly
                kept += 1
            else:  # replaced by the teacher's own sample (which may, rarely, be the same token)
                replaced += 1
    assert kept > 0 and replaced > 0  # both cases occurred


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_greedy_joint_decoding_reduces_to_each_models_own_greedy_decoding(which, teacher, student, tokenizer,
                                                                         encoded_prompts):
    """K = 1: every kept token is the teacher's argmax, so the output is the teacher's greedy decoding; K = V:
    every proposal is kept, so it is the student's."""
    from distillm.generation.speculative import speculative_decode

    prompts = [p.input_ids for p in encoded_prompts[:4]]
    V = len(tokenizer)
    params = SamplingParams(temperature=0, max_new_tokens=10)
    backend = HFBackend(student, tokenizer)
    out = speculative_decode(student, teacher, prompts, params, top_k=1 if which == "teacher" else V, seed=0,
                             eos_ids=backend.eos_ids, pad_id=backend.pad_id, vocab_size=V)
    reference = HFBackend(teacher if which == "teacher" else student, tokenizer).generate_batch(prompts, params, seed=0)
    assert [c.token_ids for c in out] == [r.token_ids for r in reference]


def test_speculative_kd_trains_on_jointly_decoded_responses(tmp_path, teacher, student, tokenizer, encoded_prompts):
    m = method("speculative-kd", skd_top_k=40)
    rows = [{"id": p.id, "prompt_ids": p.input_ids, "response_ids": []} for p in encoded_prompts[:4]]
    trainer = trainer_for(tmp_path, m, teacher, student, tokenizer, rows, steps=2)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert all(e["source_speculative"] == 1.0 for e in logs)
    assert 0 < logs[-1]["replaced_fraction"] < 1 and m.decoded_tokens > 0


# --------------------------------------------------------------------------------------------- step-by-step


@pytest.mark.parametrize("text, rationale, answer", [
    ("Two apples plus three apples make five.\nAnswer: 5", "Two apples plus three apples make five.", "5"),
    ("First 3*4 = 12.\nThen 12 + 1 = 13.\n**Final answer:** 13", None, None),
    ("Because 2 + 2 = 4.\n\nanswer: four\n", "Because 2 + 2 = 4.", "four"),
    ("Step one.\nStep two.\n42", "Step one.\nStep two.", "42"),
    ("Just one line without an answer marker", "Just one line without an answer marker", None),
])
def test_rationale_and_answer_are_split_from_the_teacher_response(text, rationale, answer):
    got = split_rationale(text)
    if rationale is None:  # markdown-decorated marker: the last line is still the answer line
        assert got[1] is not None and "13" in got[1]
    else:
        assert got == (rationale, answer)


class FakeContext:
    """The parts of pipeline.DataContext that step-by-step uses, with canned teacher rationales."""

    def __init__(self, tokenizer, prompts, teacher_texts):
        self.tokenizer, self.prompts, self.teacher_texts = tokenizer, prompts, teacher_texts
        self.asked = None

    def encode(self, transform):
        from distillm.data.prompts import PromptRecord, encode_prompts

        records = [PromptRecord(p.id, transform([{"role": "user", "content": p.text}]), p.response) for p in self.prompts]
        return encode_prompts(records, self.tokenizer, max_prompt_length=256)[0]

    def teacher_generate(self, prompts, filename, desc):
        self.asked = prompts
        return [{"id": p.id, "response": t} for p, t in zip(prompts, self.teacher_texts)]

    def encode_response(self, text):
        return self.tokenizer(text, add_special_tokens=False).input_ids + [self.tokenizer.eos_token_id]


def test_step_by_step_prefixes_its_two_tasks_and_weights_them(tokenizer):
    from distillm.data.prompts import EncodedPrompt

    prompts = [EncodedPrompt("a", "What is 2+3?", [], None), EncodedPrompt("b", "What is 4+4?", [], "8")]
    ctx = FakeContext(tokenizer, prompts, ["2 and 3 make 5.\nAnswer: 5", "Four and four.\nAnswer: 9"])
    m = method("step-by-step", sbs_rationale_weight=0.5)
    rows = m.build_rows(ctx)
    assert all("Answer: <answer>" in tokenizer.decode(p.input_ids) for p in ctx.asked)  # the teacher was asked
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
    for row, prompt in zip(rows, prompts):
        assert "[answer] " + prompt.text in decode(row["answer_prompt_ids"])
        assert "[rationale] " + prompt.text in decode(row["rationale_prompt_ids"])
        assert "Answer:" not in decode(row["rationale_ids"])
    assert decode(rows[0]["answer_ids"][:-1]) == "5"  # the teacher's answer
    assert decode(rows[1]["answer_ids"][:-1]) == "8"  # the data set's ground truth wins over the teacher's 9
    assert decode(rows[0]["rationale_ids"][:-1]) == "2 and 3 make 5."
    # loss = NLL(answer) + 0.5 NLL(rationale), both from the student alone
    batch = random_batch(n=2, groups=2)
    loss, sums, _ = m.compute_loss(LossInputs(batch.student_logits, None, batch.targets, 2, batch.counts))
    logp = torch.log_softmax(batch.student_logits.detach().double(), -1)

    def nll(i):
        values = [-logp[i, t, batch.targets[i, t]].item() for t in range(5) if batch.targets[i, t] != -100]
        return sum(values) / len(values)

    expected = (nll(0) + nll(1)) / 2 + 0.5 * (nll(2) + nll(3)) / 2
    assert loss.item() == pytest.approx(expected, **tol(batch, expected))


def test_every_method_is_registered_with_a_summary():
    from distillm.config import METHOD_NAMES

    assert sorted(METHODS) == sorted(METHOD_NAMES)
    assert all(cls.summary for cls in METHODS.values())
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "y"}]
    assert with_prefix("x ", chat) == [{"role": "system", "content": "s"}, {"role": "user", "content": "x y"}]
    assert chat[1]["content"] == "y"  # the input is not modified


# ------------------------------------------------------------------------------------ the registry, derived


def test_the_registry_config_flags_vision_list_and_compare_derive_from_the_method_modules():
    from distillm import compare, config, vision

    assert config.METHOD_NAMES == tuple(METHODS) and list(METHODS)[0] == "distillm2"
    section = {f.name for f in __import__("dataclasses").fields(config.MethodSection)}
    for cls in METHODS.values():
        for f in __import__("dataclasses").fields(cls.Options):
            assert f.name in section and config.option_fields()[f.name][0] == "method"
    assert vision.VISION_METHODS == tuple(name for name, cls in METHODS.items() if cls.vision)
    assert set(compare.VARIANTS) == set(METHODS) | set(METHODS["distillm2"].ablations)
    # compare's token accounting: which methods train on the shared teacher responses
    teacher = load_config(overrides={"fixed_responses": "teacher"})
    dataset = load_config(overrides={"fixed_responses": "dataset", "imitkd_fixed_fraction": 0.5})
    uses = {name: (cls.uses_teacher_rows(teacher), cls.uses_teacher_rows(dataset)) for name, cls in METHODS.items()}
    assert uses == {"distillm2": (True, True), "distillm": (True, False), "kd": (True, False),
                    "seqkd": (True, True), "imitkd": (False, True), "gkd": (True, False), "minillm": (False, False),
                    "dpkd": (True, True), "speculative-kd": (False, False), "step-by-step": (False, False)}


def test_a_new_method_module_is_registered_with_its_options(tmp_path, monkeypatch):
    """Adding a method is adding its module: the registry finds it, its options join section `method`."""
    import sys

    import distillm.methods as registry

    (tmp_path / "my_method.py").write_text(
        "from dataclasses import dataclass\n"
        "from distillm.options import opt\n"
        "from distillm.methods.base import DivergenceMethod\n\n\n"
        "class MyMethod(DivergenceMethod):\n"
        "    name = 'my-method'\n"
        "    divergence_name = 'tvd'\n\n"
        "    @dataclass\n"
        "    class Options:\n"
        "        my_strength: float = opt(0.5, 'my-method: strength.', ge=0)\n")
    monkeypatch.setattr(registry, "__path__", [*registry.__path__, str(tmp_path)])
    try:
        found = registry._discover()
        assert list(found)[-1] == "my-method" and list(found)[:len(METHODS)] == list(METHODS)
        monkeypatch.setattr(registry, "METHODS", found)
        assert "my_strength" in [f.name for f in registry.option_fields()]
    finally:
        sys.modules.pop("distillm.methods.my_method", None)
