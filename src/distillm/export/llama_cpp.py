"""Running an exported GGUF in llama.cpp beside the torch student: greedy decoding with llama-cpp-python.

Nothing here imports `llama_cpp`: the functions take a `llama_cpp.Llama` built by the caller (with
`logits_all=True`), so the package does not depend on it. Used by the slow runtime test in tests/export/test_gguf.py
and by scripts/llama_cpp_greedy.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def chat_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of one user message rendered with the tokenizer's chat template, ready for the answer."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def greedy(llm: Any, ids: list[int], n: int, eos: int) -> list[int]:
    """llama.cpp's greedy continuation of `ids`: up to `n` argmax tokens of its logits, eos included when produced."""
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    while len(out) < n:
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        if out[-1] == eos or len(out) == n:
            break
        llm.eval([out[-1]])  # only a token that something follows is evaluated
    return out


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first position where two token lists differ, None where one is a prefix of the other."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
