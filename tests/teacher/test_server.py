"""The client and the remote scores against a real loopback teacher server process: the scores it sends, the
vocabulary check, and the faults (down, hang, 429/5xx, malformed and short replies, API key, TLS settings)."""

from __future__ import annotations

import socket
import ssl

import pytest
import torch

from teacher_helpers import set_faults, start_server, stop_server
from distillm.errors import DistillmError
from distillm.models import load_model, load_tokenizer, real_vocab_size
from distillm.teacher.client import TeacherClient, TeacherServerError
from distillm.teacher.loopback import topk_scores
from distillm.teacher.protocol import TeacherReplyError, score_request
from distillm.teacher.remote import RemoteBackend, RemoteScores, check_vocabulary
from distillm.generation.base import SamplingParams
from distillm.training.collate import build_sequences, pad_left

K = 7


@pytest.fixture(scope="module")
def local():
    model, tokenizer = load_model("tiny-random", dtype="float32")
    return model.eval(), tokenizer, real_vocab_size(tokenizer)


def batch_of(tokenizer, texts, responses):
    rows = [build_sequences(tokenizer.encode(t), r, 128) for t, r in zip(texts, responses)]
    return pad_left(rows, tokenizer.pad_token_id)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_remote_scores_are_the_teachers_top_k_at_the_response_positions(clean_server, local):
    """Every row's TopKTeacher entries are the local teacher's top-k at its response positions (the same
    single-sequence forward as the server; float32 log-probs cross JSON exactly: compared with atol 0), placed
    in the last columns like the batch's responses; an empty response gives nothing."""
    model, tokenizer, vocab = local
    client = TeacherClient(clean_server, concurrency=2, max_wait=5)
    batch = batch_of(tokenizer, ["hello there", "why?", "x"], [[70, 71, 72, 73], [80], []])
    scores = RemoteScores(client, K, vocab).scores(None, batch)
    assert scores.logprobs.shape == (3, 4, K) and scores.indices.shape == (3, 4, K)
    for row, length in enumerate([4, 1, 0]):
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        logp = topk_scores(model, ids, K, vocab)[len(ids) - 1 - length:]
        top = logp.topk(K)
        if length:
            torch.testing.assert_close(scores.logprobs[row, 4 - length:], top.values, rtol=0, atol=0)
            assert scores.indices[row, 4 - length:].sort(-1).values.tolist() == top.indices.sort(-1).values.tolist()
        assert bool((scores.logprobs[row, :4 - length] == 0).all())
    assert scores.tail == "uniform" and RemoteScores(client, K, vocab, tail="student").scores(None, batch).tail == "student"
    client.close()


def test_responses_come_from_the_server_deterministically(clean_server, local):
    _, tokenizer, vocab = local
    client = TeacherClient(clean_server, concurrency=2, max_wait=5)
    backend = RemoteBackend(client, vocab)
    prompts = [tokenizer.encode("hello"), tokenizer.encode("a longer prompt here")]
    params = SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=6)
    first, again = (backend.generate_batch(prompts, params, seed=3) for _ in range(2))
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert all(1 <= len(c.token_ids) <= 6 and all(0 <= t < vocab for t in c.token_ids) for c in first)
    client.close()


def test_a_server_with_another_tokenizer_is_refused(clean_server, local):
    _, tokenizer, vocab = local
    client = TeacherClient(clean_server, max_wait=5)
    check_vocabulary(client, tokenizer, vocab)  # the same tokenizer passes
    other = load_tokenizer("smollm2-135m-instruct")
    with pytest.raises(DistillmError, match=f"teacher server {clean_server} tokenizes differently"):
        check_vocabulary(client, other, real_vocab_size(other))
    client.close()


def test_a_server_that_is_down_is_named():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TeacherServerError, match=f"teacher server {url} is not reachable"):
        TeacherClient(url).check_reachable()
    waits = []
    client = TeacherClient(url, max_wait=3.0, sleep=waits.append)
    with pytest.raises(TeacherServerError, match=f"teacher server {url} .* did not answer.*gave up after 3 attempts"):
        client.request("/v1/completions", score_request([1, 2], 2))
    assert waits == [0.5, 1.0]  # bounded exponential back-off: the next wait (2 s) would pass max_wait


def test_429_and_5xx_are_retried_then_the_reply_is_used(clean_server, local):
    _, tokenizer, vocab = local
    set_faults(clean_server, {"status": {"1": 429, "2": 503, "3": 500}})
    waits = []
    client = TeacherClient(clean_server, max_wait=60, sleep=waits.append)
    reply = client.request("/v1/completions", score_request([5, 6, 7], 3))
    assert len(reply["choices"][0]["prompt_logprobs"]) == 3
    assert client.retries == 3 and waits == [0.5, 1.0, 2.0]
    set_faults(clean_server, {"status": {"1": 400}})
    with pytest.raises(TeacherServerError, match="answered HTTP 400: injected fault"):  # a 4xx is not retried
        client.request("/v1/completions", score_request([5, 6, 7], 3))


def test_a_hanging_server_hits_the_timeout_and_is_retried(clean_server):
    set_faults(clean_server, {"hang": [1]})
    client = TeacherClient(clean_server, timeout=1.0, max_wait=60, sleep=lambda s: None)
    reply = client.request("/v1/completions", score_request([5, 6, 7], 3))
    assert client.retries == 1 and len(reply["choices"][0]["prompt_logprobs"]) == 3
    set_faults(clean_server, {"hang": [1, 2, 3, 4, 5]})
    client = TeacherClient(clean_server, timeout=0.5, max_wait=1.0, sleep=lambda s: None)
    with pytest.raises(TeacherServerError, match="did not answer: .*timed out"):
        client.request("/v1/completions", score_request([5, 6, 7], 3))


def test_malformed_and_short_replies_are_refused(clean_server, local):
    _, tokenizer, vocab = local
    batch = batch_of(tokenizer, ["hello there"], [[70, 71, 72]])
    client = TeacherClient(clean_server, max_wait=5)
    set_faults(clean_server, {"malformed": [1]})
    with pytest.raises(TeacherReplyError, match="the reply is not JSON"):
        RemoteScores(client, K, vocab).scores(None, batch)
    set_faults(clean_server, {"short": [1]})
    with pytest.raises(TeacherReplyError, match="positions for the .* tokens sent: a short or mismatched reply"):
        RemoteScores(client, K, vocab).scores(None, batch)
    client.close()


def test_api_key_is_sent_from_the_environment_and_never_shown(monkeypatch):
    proc, url = start_server(api_key="s3cret-KEY")
    try:
        with pytest.raises(TeacherServerError, match="refused the API key"):
            TeacherClient(url).check_reachable()
        with pytest.raises(TeacherServerError, match="TEACHER_KEY is not set"):
            TeacherClient(url, api_key_env="TEACHER_KEY")
        monkeypatch.setenv("TEACHER_KEY", "s3cret-KEY")
        client = TeacherClient(url, api_key_env="TEACHER_KEY")
        client.check_reachable()
        assert client.request("/v1/models")["data"]
        assert "s3cret" not in repr(client) and "s3cret" not in str(vars(client).get("urls"))
        monkeypatch.setenv("TEACHER_KEY", "wrong")
        with pytest.raises(TeacherServerError) as err:
            TeacherClient(url, api_key_env="TEACHER_KEY").request("/v1/models")
        assert "401" in str(err.value) and "wrong" not in str(err.value)
    finally:
        stop_server(proc)


def test_tls_verification_is_on_unless_turned_off():
    secure = TeacherClient("https://teacher.example:8000")
    assert secure._context.verify_mode == ssl.CERT_REQUIRED and secure._context.check_hostname
    insecure = TeacherClient("https://teacher.example:8000", insecure=True)
    assert insecure._context.verify_mode == ssl.CERT_NONE and not insecure._context.check_hostname


def test_teacher_token_log_probs_are_exact_outside_the_top_k(clean_server, local):
    """vLLM sends the actual token's log-prob with the top-k: the teacher's log-probs of the response tokens
    (DistiLLM-2's curriculum gaps, DPKD) are then the exact ones, also for tokens outside the top k (which the
    tail alone would put at log(T / (V - k)))."""
    from distillm.losses.fused import HeadInputs
    from distillm.methods.base import LossInputs, token_log_probs

    model, tokenizer, vocab = local
    client = TeacherClient(clean_server, max_wait=5)
    batch = batch_of(tokenizer, ["hello there", "why?"], [[200, 201, 202], [70, 7]])
    scores = RemoteScores(client, 2, vocab).scores(None, batch)
    targets = batch["labels"][:, -3:]
    lossin = LossInputs(HeadInputs(torch.zeros(2, 3, 4), torch.zeros(vocab, 4)), scores, targets, 2, (2, 5, 0),
                        vocab_size=vocab)
    got = token_log_probs(lossin, "teacher", slice(0, 2))
    outside = 0
    for row, length in enumerate([3, 2]):
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        logp = topk_scores(model, ids, 2, vocab)[len(ids) - 1 - length:]
        exact = logp.gather(-1, torch.tensor(ids[len(ids) - length:]).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(got[row, 3 - length:], exact, rtol=0, atol=0)  # float32 read back exactly
        outside += int((~(scores.indices[row, 3 - length:] == torch.tensor(ids[len(ids) - length:]).unsqueeze(-1)).any(-1)).sum())
    assert outside > 0  # the check did cover tokens outside the top k
    without = token_log_probs(LossInputs(lossin.student, scores._replace(target=None), targets, 2, (2, 5, 0),
                                         vocab_size=vocab), "teacher", slice(0, 2))
    assert not torch.equal(without, got)
    client.close()
