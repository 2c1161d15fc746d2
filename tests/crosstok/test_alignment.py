"""Byte alignment of two tokenizations: the tiny byte-level tokenizer (teacher) against a merged-pair variant
of it (student), on known strings; the byte rules (multi-byte characters, byte fallback, specials); the shared
vocabulary map."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from distillm.crosstok.align import align, align_ids
from distillm.crosstok.testing import build_merged_tokenizer
from distillm.crosstok.vocab import CrossTokenizerError, check_tokenizer, sequence_bytes, token_bytes, vocab_map
from distillm.testing.tiny import build_tiny_tokenizer


@pytest.fixture(scope="module")
def pair():
    return build_tiny_tokenizer(), build_merged_tokenizer()


def ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def test_known_strings_align_exactly(pair):
    teacher, student = pair
    # "the cat": teacher one token per byte; student "the" | " c" | "at"
    assert student.convert_ids_to_tokens(ids(student, "the cat")) == ["the", "Ġc", "at"]
    a = align_ids(teacher, student, ids(teacher, "the cat"), ids(student, "the cat"))
    assert a.complete and a.groups == ((0, 3, 0, 1), (3, 5, 1, 2), (5, 7, 2, 3))
    assert a.one_to_one == [] and len(a.merged) == 3
    # "Hello" -> H e ll o: the two l's merge; H, e, o are 1:1
    a = align_ids(teacher, student, ids(teacher, "Hello"), ids(student, "Hello"))
    assert a.groups == ((0, 1, 0, 1), (1, 2, 1, 2), (2, 4, 2, 3), (4, 5, 3, 4))
    assert a.one_to_one == [(0, 0), (1, 1), (4, 3)]


def test_multibyte_character_split_by_one_side(pair):
    """'é' is two byte tokens for the teacher and one merged token for the student: one 2:1 group, exact on bytes
    (offset_mapping would give both teacher halves the same character span)."""
    teacher, student = pair
    t, s = ids(teacher, "café"), ids(student, "café")
    assert len(t) == 5 and len(s) == 4
    a = align_ids(teacher, student, t, s)
    assert a.complete and a.groups[-1] == (3, 5, 3, 4)
    enc = teacher("café", add_special_tokens=False, return_offsets_mapping=True)
    assert enc.offset_mapping[3] == enc.offset_mapping[4]  # why characters are not exact here, and bytes are


def test_char_offsets_agree_with_bytes_on_ascii(pair):
    """Where every token is whole characters of ASCII text, the byte spans are the offset_mapping's spans."""
    for tok in pair:
        text = "Hello there, the cat sat on the mat."
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        pos, spans = 0, []
        for piece in sequence_bytes(tok, enc.input_ids):
            spans.append((pos, pos + len(piece)))
            pos += len(piece)
        assert spans == [tuple(o) for o in enc.offset_mapping]


def test_eos_and_specials(pair):
    teacher, student = pair
    t = ids(teacher, "the") + [teacher.eos_token_id]
    s = ids(student, "the") + [student.eos_token_id]
    a = align_ids(teacher, student, t, s)
    assert a.complete and a.groups == ((0, 3, 0, 1), (3, 4, 1, 2))
    # one side ends with EOS, the other was cut: not complete, the text groups stay
    a = align_ids(teacher, student, t, s[:-1])
    assert not a.complete and a.groups == ((0, 3, 0, 1),)


def test_sides_that_part_stop_at_the_last_common_boundary():
    a = align([b"ab", b"c", b"x"], [b"a", b"bc", b"y"])
    assert a.groups == ((0, 2, 0, 2),) and not a.complete
    a = align([b"ab"], [b"a"])
    assert a.groups == () and not a.complete
    assert align([], []) .groups == () and align([], []).complete


def test_byte_fallback_sentencepiece_style():
    """A SentencePiece-style tokenizer (Replace '▁' + ByteFallback, as Gemma): <0xHH> tokens are their byte,
    '▁' is a space, and the text is spelt byte for byte."""
    vocab = {"<unk>": 0, "<eos>": 1, **{f"<0x{b:02X}>": 2 + b for b in range(256)}, "▁the": 258, "c": 259,
             "a": 260, "t": 261, "▁": 262, "h": 263, "e": 264, "▁t": 265, "he": 266}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "t"), ("h", "e"), ("▁t", "he")], unk_token="<unk>",
                                byte_fallback=True))
    core.normalizer = normalizers.Replace(" ", "▁")
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>")
    text = "cat the é"
    got = ids(tok, text)
    assert b"".join(sequence_bytes(tok, got)) == text.encode()
    assert sequence_bytes(tok, got)[-2:] == [b"\xc3", b"\xa9"]
    # against the tiny byte-level tokenizer: the two fallback bytes of é face the teacher's two byte tokens
    tiny = build_tiny_tokenizer()
    a = align_ids(tiny, tok, ids(tiny, text), got)
    assert a.complete
    table = token_bytes(tok)
    assert table[1] is None and table[2 + 0x41] == b"A"


def test_tokenizer_that_rewrites_text_is_refused():
    vocab = {chr(c): i for i, c in enumerate(range(32, 127))}
    vocab["<eos>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>")
    with pytest.raises(CrossTokenizerError, match="byte for byte"):
        check_tokenizer(tok, "student")


def test_vocab_map(pair):
    teacher, student = pair
    vm = vocab_map(teacher, student)
    assert vocab_map(teacher, student) is vm  # cached
    t_bytes, s_bytes = token_bytes(teacher), token_bytes(student)
    for t, s in zip(vm.teacher_ids.tolist(), vm.student_ids.tolist()):
        if t == teacher.eos_token_id:
            assert s == student.eos_token_id
        else:
            assert t_bytes[t] == s_bytes[s] is not None
    # every byte token is shared, plus EOS; the student's merged tokens are unmatched
    assert vm.teacher_ids.numel() == 257
    merged = set(vm.unmatched("student").tolist())
    assert student.convert_tokens_to_ids("the") in merged and student.eos_token_id not in merged
    assert len(set(vm.teacher_ids.tolist())) == len(set(vm.student_ids.tolist())) == 257
    same = vocab_map(teacher, teacher)
    assert not same.identity or same.teacher_ids.numel() == len(teacher)
