"""The bytes each token stands for, and the shared vocabulary of two tokenizers.

Every alignment and every vocabulary match works on BYTES, not characters: a byte-level BPE token may hold half
of a multi-byte UTF-8 character (its `offset_mapping` then gives both halves the whole character's span, so
character offsets are not exact there), and a SentencePiece tokenizer with byte fallback spells an unknown
character as `<0xHH>` tokens. Byte strings are exact in both cases:

- byte-level BPE (the decoder is `ByteLevel`, e.g. GPT-2, Llama 3, Qwen, SmolLM2, the tiny tokenizer): each
  character of the token's string stands for one byte through GPT-2's byte <-> unicode table;
- SentencePiece-style (Gemma, Llama 2; decoder `Replace('▁', ' ')` [+ `ByteFallback`]): `<0xHH>` is the byte
  HH, any other token is its string with '▁' read as a space, in UTF-8;
- special tokens (EOS, chat markers, ...) stand for no text (None): they are never part of an aligned span.

`check_tokenizer` verifies, on probe strings, that encoding a text gives tokens whose bytes concatenate back to
exactly the text's UTF-8 bytes (no normaliser rewriting it, no prefix space added); a tokenizer for which this
fails is refused with the reason, since nothing could be aligned exactly.

`VocabMap`: teacher id -> student id for every pair of non-special tokens that stand for the same bytes (one id
per byte string on each side: a duplicate, e.g. a byte-fallback token `<0x41>` beside `A`, keeps the plain
token), plus the teacher's EOS -> the student's EOS, plus special tokens with the same string on both sides. Built once per tokenizer pair (one pass over both
vocabularies) and cached on the teacher tokenizer object.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import torch

from ..errors import DistillmError


class CrossTokenizerError(DistillmError):
    """A tokenizer pair or a sequence that cross-tokenizer distillation cannot handle; says why and what to do."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: printable bytes stand for themselves, the others for characters from U+0100 on."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_DECODER = {char: byte for byte, char in _bytes_to_unicode().items()}
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _decoder_types(tokenizer) -> set[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise CrossTokenizerError(f"{type(tokenizer).__name__} is a slow (Python) tokenizer: cross-tokenizer "
                                  "distillation needs fast tokenizers (the `tokenizers` library), which transformers "
                                  "provides for byte-level BPE and SentencePiece models.")
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    kinds, stack = set(), [decoder]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "type" in item:
                kinds.add(item["type"])
            stack.extend(item.get("decoders") or [])
    return kinds


def token_bytes(tokenizer) -> list[bytes | None]:
    """bytes of every token id (None for special tokens), computed once and kept on the tokenizer object."""
    cached = getattr(tokenizer, "_distillm_token_bytes", None)
    if cached is not None:
        return cached
    kinds = _decoder_types(tokenizer)
    byte_level = "ByteLevel" in kinds
    fallback = "ByteFallback" in kinds
    special = set(tokenizer.all_special_ids)
    added = {idx: tok for idx, tok in tokenizer.added_tokens_decoder.items()}
    size = len(tokenizer)
    out: list[bytes | None] = [None] * size
    for piece, idx in tokenizer.get_vocab().items():
        if idx >= size:
            continue
        if idx in special or (idx in added and added[idx].special):
            continue
        if idx in added:  # a plain added token: its text as such
            out[idx] = added[idx].content.encode("utf-8")
        elif byte_level and all(c in BYTE_DECODER for c in piece):
            out[idx] = bytes(BYTE_DECODER[c] for c in piece)
        elif fallback and _BYTE_FALLBACK.match(piece):
            out[idx] = bytes([int(piece[3:5], 16)])
        else:
            out[idx] = piece.replace("▁", " ").encode("utf-8")
    tokenizer._distillm_token_bytes = out
    return out


def sequence_bytes(tokenizer, ids) -> list[bytes | None]:
    """The bytes of each token of `ids` (None for special tokens)."""
    table = token_bytes(tokenizer)
    return [table[i] if 0 <= i < len(table) else None for i in ids]


PROBES = ("Hello world", " leading space", "two  spaces\n\nnew lines\ttab", "café 中文 🙂", "x=1+2; print(x)")


def check_tokenizer(tokenizer, name: str) -> None:
    """Refuse a tokenizer whose tokens do not spell the encoded text byte for byte (see the module docstring)."""
    for text in PROBES:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        pieces = sequence_bytes(tokenizer, ids)
        got = b"".join(p for p in pieces if p is not None)
        if got != text.encode("utf-8"):
            raise CrossTokenizerError(
                f"The {name}'s tokenizer does not spell text byte for byte: {text!r} is encoded as tokens whose bytes "
                f"read {got!r} (a normaliser rewrites the text or a prefix space is added). Cross-tokenizer "
                "distillation aligns the two tokenizations on exact byte offsets and cannot use this tokenizer; "
                "use --cross-tokenizer off with a student that shares the teacher's tokenizer.")


@dataclass(frozen=True)
class VocabMap:
    """Shared vocabulary of a (teacher, student) tokenizer pair: teacher_ids[k] and student_ids[k] stand for the
    same bytes (or are both EOS). Ids are unique on each side; tokens outside it are 'unmatched'."""

    teacher_ids: torch.Tensor  # [K] long
    student_ids: torch.Tensor  # [K] long
    teacher_size: int
    student_size: int

    def unmatched(self, side: str) -> torch.Tensor:
        """Ids of `side` ('teacher' or 'student') outside the shared vocabulary, ascending."""
        size, ids = ((self.teacher_size, self.teacher_ids) if side == "teacher" else
                     (self.student_size, self.student_ids))
        keep = torch.ones(size, dtype=torch.bool)
        keep[ids] = False
        return keep.nonzero().squeeze(-1)

    def to(self, device) -> "VocabMap":
        return VocabMap(self.teacher_ids.to(device), self.student_ids.to(device), self.teacher_size, self.student_size)

    @property
    def identity(self) -> bool:
        """Both vocabularies are the same ids for the same tokens (then cross-tokenizer losses reduce to plain)."""
        return (self.teacher_size == self.student_size == self.teacher_ids.numel()
                and bool((self.teacher_ids == self.student_ids).all()))


def _canonical_ids(tokenizer) -> dict[bytes, int]:
    """byte string -> the one id that stands for it (a plain token before a byte-fallback one, then the lowest id)."""
    vocab = tokenizer.get_vocab()
    pieces = {idx: piece for piece, idx in vocab.items()}
    best: dict[bytes, int] = {}
    for idx, data in enumerate(token_bytes(tokenizer)):
        if data is None:
            continue
        old = best.get(data)
        if old is None or (_BYTE_FALLBACK.match(pieces.get(old, "")) and not _BYTE_FALLBACK.match(pieces.get(idx, ""))):
            best[data] = idx
    return best


def _special_ids(tokenizer) -> dict[str, int]:
    table = token_bytes(tokenizer)
    return {piece: idx for piece, idx in tokenizer.get_vocab().items() if idx < len(table) and table[idx] is None}


def vocab_map(teacher_tok, student_tok) -> VocabMap:
    """The shared vocabulary of the pair, computed once and cached on the teacher tokenizer object."""
    cache = getattr(teacher_tok, "_distillm_vocab_maps", None)
    if cache is None:
        cache = teacher_tok._distillm_vocab_maps = {}
    key = id(student_tok)
    if key in cache and cache[key][0] is student_tok:
        return cache[key][1]
    t_best, s_best = _canonical_ids(teacher_tok), _canonical_ids(student_tok)
    pairs = sorted((t_id, s_best[data]) for data, t_id in t_best.items() if data in s_best)
    t_eos, s_eos = teacher_tok.eos_token_id, student_tok.eos_token_id
    if t_eos is not None and s_eos is not None:
        pairs.append((t_eos, s_eos))
    # special tokens with the same string on both sides (e.g. '<|im_start|>' in two ChatML tokenizers)
    t_special, s_special = _special_ids(teacher_tok), _special_ids(student_tok)
    pairs += sorted((t_id, s_special[name]) for name, t_id in t_special.items()
                    if name in s_special and t_id != t_eos and s_special[name] != s_eos)
    t_ids = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    s_ids = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    result = VocabMap(t_ids, s_ids, len(teacher_tok), len(student_tok))
    cache[key] = (student_tok, result)
    return result
