"""teacher.remote's request building, against a client that records requests instead of sending them."""

from __future__ import annotations

import pytest

from distillm.errors import DistillmError
from distillm.generation.base import SamplingParams
from distillm.teacher.remote import RemoteBackend, RemoteJointTeacher, RemoteScores


class RecordingClient:
    """Answers /v1/completions with fixed token ids and keeps every request body."""

    concurrency = 1
    urls = ["http://fake"]

    def __init__(self, token_ids=(7, 8, 9)):
        self.bodies, self.token_ids = [], list(token_ids)

    def request(self, path, payload=None, **_):
        assert path == "/v1/completions"
        self.bodies.append(payload)
        n = payload["max_tokens"]
        return {"choices": [{"token_ids": self.token_ids[:n], "finish_reason": "length"}]}

    def map(self, fn, items):
        return [fn(item) for item in items]

    def submit(self, fn, *args):  # pragma: no cover - the tests here score synchronously
        raise AssertionError("not used")


def test_backend_and_joint_teacher_ask_for_the_runs_sampling():
    client = RecordingClient()
    params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=2)
    out = RemoteBackend(client, vocab_size=16).generate_batch([[1, 2], [3]], params, seed=40)
    assert [c.token_ids for c in out] == [[7, 8], [7, 8]]
    assert [b["seed"] for b in client.bodies] == [40, 41]  # one seed per prompt, offset by its index
    assert all(b["max_tokens"] == 2 and b["temperature"] == 0.7 and b["top_p"] == 0.9 for b in client.bodies)

    client = RecordingClient()
    joint = RemoteJointTeacher(client, vocab_size=16)
    assert joint.sample([[1, 2, 3], [4, 5]], params, seeds=[5, 6]) == [7, 7]
    assert [b["max_tokens"] for b in client.bodies] == [1, 1]  # one token per rejected draft
    assert [b["seed"] for b in client.bodies] == [5, 6] and joint.sampled == 2


def test_a_token_outside_the_vocabulary_is_refused():
    client = RecordingClient(token_ids=[3, 99])
    with pytest.raises(DistillmError, match="outside the vocabulary"):
        RemoteBackend(client, vocab_size=16).generate_batch([[1]], SamplingParams(max_new_tokens=2), seed=0)


def test_sequences_without_prompt_tokens_are_refused_before_any_request():
    client = RecordingClient()
    with pytest.raises(DistillmError, match="a draft without prompt tokens cannot be ranked"):
        RemoteJointTeacher(client, vocab_size=16).ranks([([4, 5], 2)])
    with pytest.raises(DistillmError, match="a sequence without prompt tokens cannot be scored"):
        RemoteScores(client, k=2, vocab_size=16)._score_row(([4, 5, 6], 3))
    assert client.bodies == []
