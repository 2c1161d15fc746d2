"""distillm.export.llama_cpp against a stand-in for llama_cpp.Llama (the real runtime: the slow test in
test_gguf.py). The stand-in follows the part of Llama's interface the helpers use: reset() empties the context,
eval(tokens) appends tokens and one row of logits per token to `scores`, n_tokens counts them."""

from __future__ import annotations

import numpy as np

from distillm.export.llama_cpp import chat_ids, first_divergence, greedy
from distillm.testing.tiny import build_tiny_tokenizer


class FakeLlama:
    """Next-token logits from a table: after token t the argmax is table[t]."""

    def __init__(self, table: dict[int, int], vocab: int = 8):
        self.table, self.vocab = table, vocab
        self.evaluated: list[list[int]] = []
        self.reset()

    def reset(self):
        self.scores = np.zeros((0, self.vocab), dtype=np.float32)
        self.n_tokens = 0

    def eval(self, tokens):
        self.evaluated.append(list(tokens))
        rows = np.zeros((len(tokens), self.vocab), dtype=np.float32)
        for r, t in enumerate(tokens):
            rows[r, self.table.get(t, 0)] = 1.0
        self.scores = np.concatenate([self.scores, rows])
        self.n_tokens += len(tokens)


def test_greedy_follows_the_argmax_of_the_last_row_and_stops_after_n():
    llm = FakeLlama({1: 2, 2: 3, 3: 4, 4: 5, 5: 6})
    assert greedy(llm, [1], 3, eos=7) == [2, 3, 4]
    assert llm.evaluated == [[1], [2], [3]]  # the last token is not evaluated: nothing follows it


def test_greedy_keeps_eos_and_stops_there():
    llm = FakeLlama({1: 2, 2: 7})
    assert greedy(llm, [1], 10, eos=7) == [2, 7]
    assert llm.evaluated == [[1], [2]]


def test_greedy_starts_from_an_empty_context_each_time():
    llm = FakeLlama({1: 2, 2: 3, 5: 6})
    greedy(llm, [1], 2, eos=7)
    assert greedy(llm, [5], 1, eos=7) == [6]
    assert llm.n_tokens == 1


def test_greedy_of_zero_tokens_is_empty():
    assert greedy(FakeLlama({1: 2}), [1], 0, eos=7) == []


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 4]) == 2
    assert first_divergence([5], [6]) == 0
    assert first_divergence([1, 2], [1, 2]) is None
    assert first_divergence([1, 2], [1, 2, 3]) is None
    assert first_divergence([], [1]) is None


def test_chat_ids_render_the_template_once_without_extra_special_tokens():
    tok = build_tiny_tokenizer()
    ids = chat_ids(tok, "hi")
    text = tok.decode(ids)
    assert text == tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                           tokenize=False)
    assert text.count("<|im_start|>") == 2  # the user turn and the assistant's, nothing prepended
