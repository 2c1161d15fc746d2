"""A second tiny tokenizer for cross-tokenizer tests and smoke runs: the tiny byte-level tokenizer
(`distillm.testing.tiny`) plus a few BPE merges, so the same text tokenizes differently (fewer tokens) and the special
tokens sit at other ids. Everything is built offline."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ..testing.tiny import CHATML_TEMPLATE, build_tiny_model

#: merges in byte-level characters ('Ġ' is a space; 'Ã' + '©' are the two bytes of 'é')
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("t", "he"), ("l", "l"), ("Ġ", "c"), ("a", "t"), ("Ã", "©"),
          ("i", "n"), ("o", "r"), ("e", "r"), ("Ġ", "a"), ("a", "n"), ("Ġ", "s"), ("o", "n"), ("e", "s")]
SPECIALS = ["<|end|>", "<|user|>", "<|assistant|>"]
#: the tiny tokenizer's own special tokens (`distillm.testing.tiny`), EOS first: a merged tokenizer built with these
#: shares its special tokens' strings with the tiny one (TRL GOLD pairs tokens by their strings)
CHATML_SPECIALS = ["<|im_end|>", "<|im_start|>", "<|endoftext|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|user|>' if message['role'] != 'assistant' else '<|assistant|>' }}{{ message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_merged_tokenizer(merges=MERGES, chat_template: str | None = CHAT_TEMPLATE,
                           specials=SPECIALS) -> PreTrainedTokenizerFast:
    """The 256 byte tokens, then one token per merge, then its own special tokens (`specials`: the first is EOS
    and pad, the second BOS; default `<|end|>`, `<|user|>`)."""
    vocab = {tok: i for i, tok in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for tok in specials:
        vocab[tok] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=specials[0], pad_token=specials[0],
                                        bos_token=specials[1], additional_special_tokens=list(specials))
    tokenizer.chat_template = chat_template
    tokenizer.padding_side = "left"
    return tokenizer


def save_tiny_pair_student(directory, *, seed: int = 1, num_layers: int = 2, hidden_size: int = 48) -> str:
    """A tiny random model with the merged tokenizer, saved (safetensors + tokenizer) to `directory`."""
    tokenizer = build_merged_tokenizer()
    model = build_tiny_model(tokenizer, num_layers=num_layers, hidden_size=hidden_size, seed=seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)
