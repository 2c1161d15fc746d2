"""Align two tokenizations of the same text on byte offsets.

Each side's tokens are laid end to end over the text's bytes (`vocab.sequence_bytes`); a *boundary* is a byte
offset where a token ends. The boundaries both sides have in common cut the text into *groups*: the teacher
tokens [i0, i1) and the student tokens [j0, j1) covering exactly the same bytes.

- a group of one token on each side is a *1:1* span: the two tokens stand for the same bytes, and the two
  models' next-token distributions at its start condition on the same text;
- any other group (one token against several, or several against several) is a *merged* span.

Rules for what does not spell text:
- special tokens (None bytes) are never inside a group; the final EOS of both sides, when both sequences end
  with one, forms a 1:1 group of its own (matched through the EOS pair of the vocabulary map);
- the two sides must spell the same bytes; where they part (e.g. a sampled byte-level response cut in the
  middle of a UTF-8 character, re-tokenized from its decoded text), groups stop at the last common boundary
  before the first differing byte, and the rest of both sequences is left out of the cross-tokenizer loss
  (`Alignment.complete` is False).
"""

from __future__ import annotations

from dataclasses import dataclass

from .vocab import sequence_bytes


@dataclass(frozen=True)
class Alignment:
    """Groups (i0, i1, j0, j1) in order: teacher tokens [i0, i1) and student tokens [j0, j1) cover the same bytes.
    `complete`: every token of both sides (but specials other than a shared final EOS) is in a group."""

    groups: tuple[tuple[int, int, int, int], ...]
    complete: bool

    @property
    def one_to_one(self) -> list[tuple[int, int]]:
        """(teacher position, student position) of the 1:1 groups."""
        return [(i0, j0) for i0, i1, j0, j1 in self.groups if i1 - i0 == 1 and j1 - j0 == 1]

    @property
    def merged(self) -> list[tuple[int, int, int, int]]:
        return [g for g in self.groups if not (g[1] - g[0] == 1 and g[3] - g[2] == 1)]


def _ends(pieces: list[bytes | None]) -> list[int]:
    """Cumulative byte offset after each token (special tokens add nothing)."""
    out, pos = [], 0
    for piece in pieces:
        pos += len(piece) if piece else 0
        out.append(pos)
    return out


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    for k in range(n):
        if a[k] != b[k]:
            return k
    return n


def align(teacher: list[bytes | None], student: list[bytes | None], *, teacher_eos: bool = False,
          student_eos: bool = False) -> Alignment:
    """Align the token byte strings of the teacher and the student (see the module docstring). `teacher_eos`,
    `student_eos`: the sequence's last token is an EOS (then it is not text; two EOS ends form a 1:1 group)."""
    t_text = teacher[:-1] if teacher_eos else teacher
    s_text = student[:-1] if student_eos else student
    t_bytes = b"".join(p for p in t_text if p)
    s_bytes = b"".join(p for p in s_text if p)
    shared = _common_prefix(t_bytes, s_bytes)
    complete = shared == len(t_bytes) == len(s_bytes)
    t_ends, s_ends = _ends(t_text), _ends(s_text)
    groups: list[tuple[int, int, int, int]] = []
    i = j = 0  # next token not yet in a group, on each side
    ti = sj = 0  # scan positions
    while ti < len(t_text) and sj < len(s_text):
        # advance over tokens that spell nothing at a group's start (specials inside the text are left out)
        if i == ti and not t_text[ti]:
            ti += 1
            i = ti
            continue
        if j == sj and not s_text[sj]:
            sj += 1
            j = sj
            continue
        te, se = t_ends[ti], s_ends[sj]
        if te > shared or se > shared:
            complete = False
            break
        if te == se:
            groups.append((i, ti + 1, j, sj + 1))
            ti += 1
            sj += 1
            i, j = ti, sj
        elif te < se:
            ti += 1
        else:
            sj += 1
    else:
        # leftover tokens on one side that spell bytes mean the sides differ
        rest = [p for p in t_text[i:] if p] + [p for p in s_text[j:] if p]
        if rest:
            complete = False
    if complete and teacher_eos and student_eos:
        groups.append((len(teacher) - 1, len(teacher), len(student) - 1, len(student)))
    elif teacher_eos != student_eos:
        complete = False
    return Alignment(tuple(groups), complete)


def align_ids(teacher_tok, student_tok, teacher_ids: list[int], student_ids: list[int]) -> Alignment:
    """`align` on token ids: each side's trailing EOS is recognised by its tokenizer's eos_token_id."""
    t_eos = bool(teacher_ids) and teacher_ids[-1] == teacher_tok.eos_token_id
    s_eos = bool(student_ids) and student_ids[-1] == student_tok.eos_token_id
    return align(sequence_bytes(teacher_tok, teacher_ids), sequence_bytes(student_tok, student_ids),
                 teacher_eos=t_eos, student_eos=s_eos)
