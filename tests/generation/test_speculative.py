"""Joint student-teacher decoding with a teacher reached by request (generation.speculative.
blockwise_speculative_decode): the same rule as the lockstep decoder, a block of student drafts at a time."""

from __future__ import annotations

import pytest
import torch

from distillm.generation.base import SamplingParams
from distillm.generation.hf import HFBackend
from distillm.generation.speculative import blockwise_speculative_decode, speculative_decode


class LocalJointTeacher:
    """A JointTeacher over a model in this process, written plainly: one full forward per sequence (no cache), rank
    = 1 + the number of tokens with a strictly higher logit (vLLM's rule), the sample from HFBackend. Records each
    call so the tests can check what was asked."""

    def __init__(self, model, tokenizer, vocab):
        self.model, self.tokenizer, self.vocab = model, tokenizer, vocab
        self.ranked, self.sampled = [], []

    def ranks(self, sequences):
        out = []
        for ids, n in sequences:
            with torch.no_grad():
                logits = self.model(input_ids=torch.tensor([ids])).logits[0, :, :self.vocab]
            rows = []
            for pos in range(len(ids) - n, len(ids)):
                row = logits[pos - 1]
                rows.append(int((row > row[ids[pos]]).sum()) + 1)
            out.append(rows)
            self.ranked.append((list(ids), n))
        return out

    def sample(self, prefixes, params, seeds):
        backend = HFBackend(self.model, self.tokenizer, max_batch_size=1)
        out = []
        for prefix, seed in zip(prefixes, seeds):
            one = SamplingParams(temperature=params.temperature, top_p=params.top_p, max_new_tokens=1)
            out.append(backend.generate_batch([prefix], one, seed=seed)[0].token_ids[0])
            self.sampled.append(list(prefix))
        return out


@pytest.mark.parametrize("top_k", [1, 3, "V"])
@pytest.mark.parametrize("block", [1, 3, 8])
def test_greedy_blockwise_decoding_equals_the_lockstep_decoder(top_k, block, teacher, student, tokenizer,
                                                              encoded_prompts):
    """At temperature 0 every decision is deterministic: kept drafts, rejections and the teacher's replacements
    must be exactly the lockstep decoder's, whatever the block size."""
    V = len(tokenizer)
    k = V if top_k == "V" else top_k
    prompts = [p.input_ids for p in encoded_prompts[:4]]
    params = SamplingParams(temperature=0, max_new_tokens=10)
    backend = HFBackend(student, tokenizer)
    lockstep = speculative_decode(student, teacher, prompts, params, top_k=k, seed=0, eos_ids=backend.eos_ids,
                                  pad_id=backend.pad_id, vocab_size=V)
    served = blockwise_speculative_decode(backend, LocalJointTeacher(teacher, tokenizer, V), prompts, params,
                                          top_k=k, seed=0, eos_ids=backend.eos_ids, block=block)
    for a, b in zip(lockstep, served):
        assert (b.token_ids, b.proposals, b.replaced, b.finish_reason) == (
            a.token_ids, a.proposals, a.replaced, a.finish_reason)
    if k == V:  # every draft is kept: the teacher never samples
        assert not any(any(c.replaced) for c in served)
    if k == 1:  # the teacher's greedy decoding
        reference = HFBackend(teacher, tokenizer).generate_batch(prompts, params, seed=0)
        assert [c.token_ids for c in served] == [r.token_ids for r in reference]


def test_sampled_blockwise_decoding_keeps_drafts_exactly_where_the_teacher_ranks_them_top_k(
        teacher, student, tokenizer, encoded_prompts):
    V, k, max_new = len(tokenizer), 5, 12
    prompts = [p.input_ids for p in encoded_prompts[:4]]
    backend = HFBackend(student, tokenizer)
    joint = LocalJointTeacher(teacher, tokenizer, V)
    out = blockwise_speculative_decode(backend, joint, prompts, SamplingParams(temperature=1.0, top_p=1.0,
                                       max_new_tokens=max_new), top_k=k, seed=3, eos_ids=backend.eos_ids, block=4)
    kept = replaced = 0
    for prompt, c in zip(prompts, out):
        assert 0 < len(c.token_ids) <= max_new and len(c.proposals) == len(c.replaced) == len(c.token_ids)
        ends = [i for i, t in enumerate(c.token_ids) if t in backend.eos_ids]
        assert ends in ([], [len(c.token_ids) - 1])  # an end token only last
        assert c.finish_reason == ("stop" if ends else "length")
        if not ends:
            assert len(c.token_ids) == max_new
        # the teacher's top-K at each response position, from an independent forward pass over the result
        with torch.no_grad():
            logits = teacher(input_ids=torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1:-1, :V]
        top = logits.topk(k, dim=-1).indices
        for t, (token, proposal, was_replaced) in enumerate(zip(c.token_ids, c.proposals, c.replaced)):
            assert was_replaced == (proposal not in top[t].tolist())
            if was_replaced:
                replaced += 1
            else:
                assert token == proposal
                kept += 1
    assert kept > 0 and replaced > 0
    # one teacher sample per replaced token, each asked at the response so far
    assert len(joint.sampled) == replaced
    # a draft is never longer than the block, and never ranked past a row's end
    assert all(n <= 4 for _, n in joint.ranked)


def test_blockwise_decoding_is_a_function_of_its_seed(teacher, student, tokenizer, encoded_prompts):
    V = len(tokenizer)
    prompts = [p.input_ids for p in encoded_prompts[:3]]
    backend = HFBackend(student, tokenizer)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8)

    def decode(seed):
        out = blockwise_speculative_decode(backend, LocalJointTeacher(teacher, tokenizer, V), prompts, params,
                                           top_k=3, seed=seed, eos_ids=backend.eos_ids, block=3)
        return [(c.token_ids, c.proposals, c.replaced) for c in out]

    assert decode(7) == decode(7)


def test_blockwise_decoding_refuses_bad_settings(teacher, student, tokenizer, encoded_prompts):
    backend = HFBackend(student, tokenizer)
    joint = LocalJointTeacher(teacher, tokenizer, len(tokenizer))
    params = SamplingParams(temperature=0, max_new_tokens=4)
    prompts = [encoded_prompts[0].input_ids]
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        blockwise_speculative_decode(backend, joint, prompts, params, top_k=0, seed=0, eos_ids=backend.eos_ids)
    with pytest.raises(ValueError, match="block must be >= 1"):
        blockwise_speculative_decode(backend, joint, prompts, params, top_k=2, seed=0, eos_ids=backend.eos_ids,
                                     block=0)
    assert joint.ranked == [] and joint.sampled == []  # refused before any request
