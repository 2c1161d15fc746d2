"""An on-disk cache of the teacher's scores on the fixed (teacher) responses, reused across rounds and resumes.

The fixed responses -- the teacher's own responses of distillm2 / dpkd / kd / gkd / imitkd / distillm v1 -- are
the same sequences every round, and so are the teacher's scores on them. With `--teacher-cache exact` they are
computed once, before training, and every later micro-batch takes them from disk: the teacher only runs on
sequences the cache does not hold (the fresh student responses). Exact, not approximate: what is stored is the
teacher's *final hidden state* (after the last norm) at each response position, H floats per token (576 for
SmolLM2-135M) instead of V logits (49,152), and the fused loss applies the teacher's head to it, a chunk at a
time, exactly as it would after a live teacher pass (the plain path applies the head at once).

Layout, in `teacher_cache/` of the run directory (or `--teacher-cache-dir`):

- `exact-<teacher>-<data>.npy`: the hidden states of all cached sequences, one row per response token
  [tokens, H], read memory-mapped (`numpy.load(mmap_mode="r")`), so the cache costs no RAM up front;
- `exact-<teacher>-<data>.json`: the manifest: the keys, the array's shape, dtype and SHA-256, and the index
  (sequence key -> first row, response length).

<teacher> fingerprints the teacher (its config, and every parameter's name, shape, dtype, sum and a strided
sample of its values); <data> hashes the cached sequences' keys, each the SHA-1 of the sequence's token ids and
response length. A different teacher or different data gives other names, so a stale cache is never read (and
is deleted when the new one is written). Both files are written atomically (temporary file, then rename; the
manifest last, so its presence marks a complete cache). On load the array's SHA-256 is checked against the
manifest; a truncated or corrupted cache is reported and rebuilt.

With `--teacher-cache topk` what is stored per response token is the teacher's k most likely tokens instead
(k = --teacher-cache-k, over the tokenizer's real tokens, float32 log-softmax), and the teacher's log-prob of the
actual (next) token, from the same pass (`topk_rows`): `top<k>-<teacher>-<data>.npy` (log-probs [tokens, k]),
`.ids.npy` (their ids [tokens, k]), `.target.npy` (the actual tokens' log-probs [tokens]), all three in the
manifest and its SHA check. The manifest's "format" (2) marks caches with the actual tokens' log-probs: one
written before (format 1, two arrays) is rebuilt, never read. One tokenizer: the fused and plain losses spread the
tail (losses.fused.TopKTeacher); the actual tokens' log-probs are stored but not handed to the loss (the loss is as
before they were stored).

Across tokenizers (`crosstok`) either cache holds the teacher's scores on its own responses in its own tokens (its
prompt rendering, its sampled response ids), keyed by the teacher's ids: `model_scores` scores the teacher's side
of a cross batch. The exact cache gives its hidden states (the full cross-tokenizer loss, as a live teacher); the
top-k cache gives a `TopKTeacher` with the actual tokens' log-probs -- the form a served teacher's scores take
(`teacher.remote.RemoteScores`), the rows it lacks (the student's responses re-tokenized for the teacher) turned
into it from one live teacher pass -- so the loss is the top-k aligned one of --teacher-url
(`crosstok.losses.topk_group_values`: a lower bound of the full 1:1 divergence, exact at k = the teacher's
vocabulary; merged spans and span log-probs exact from the actual tokens' log-probs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..io import atomic_write_json
from ..losses.fused import HeadInputs, TopKTeacher
from .fused_inputs import fused_inputs
from ..methods.base import TeacherGroups
from .collate import IGNORE, build_sequences, pad_left, response_logits

logger = logging.getLogger("distillm")

MODES = ("exact", "topk")
#: the on-disk format of each mode's cache (the manifest's "format"; absent: 1). A cache of another format is
#: rebuilt, not read. topk 2: + the actual tokens' log-probs (`.target.npy`)
FORMAT = {"exact": 1, "topk": 2}
#: bytes of fp32 logits per chunk of positions when the top-k of the teacher's head is taken (`topk_rows`)
TOPK_CHUNK_BYTES = 64 * 2**20


def teacher_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the teacher's config and weights (per parameter: name, shape, dtype, sum, a strided sample)."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        h.update(config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, p in model.state_dict().items():
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 1024)][:1024].float().cpu().numpy()
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{float(flat.double().sum()):.10e}".encode())
            h.update(sample.tobytes())
    return h.hexdigest()


def sequence_keys(batch: dict[str, torch.Tensor]) -> list[str]:
    """One key per row of a left-padded batch: SHA-1 of its real token ids and its response length."""
    keys = []
    for ids, attention, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        real = ids[attention.bool()].to(torch.int64).cpu().numpy()
        response = int((labels != IGNORE).sum())
        keys.append(hashlib.sha1(real.tobytes() + response.to_bytes(4, "little")).hexdigest())
    return keys


def _save_atomic(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class TeacherCache:
    """The teacher's final hidden states on a fixed set of sequences, built once and memory-mapped.

    `build(teacher, sequences)` makes (or finds) the cache of those (prompt ids, response ids) sequences;
    `scores(trainer, inputs)` gives a micro-batch's teacher scores, from the cache for the rows it holds and from
    a live teacher pass (`trainer.run_teacher`) for the others; `model_scores(teacher, inputs)` the same for a
    batch in the teacher's own tokens (the teacher's side of a cross-tokenizer batch). `teacher_rows` counts the
    rows the teacher ran on (`cached_rows` those read from the cache; `built_rows` those it ran over to build the
    cache)."""

    def __init__(self, directory: str | os.PathLike, mode: str = "exact", k: int = 64, vocab_size: int | None = None,
                 tail: str = "uniform"):
        if mode not in MODES:
            raise ValueError(f"teacher cache mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "topk" and (k < 1 or vocab_size is None):
            raise ValueError("a top-k teacher cache needs k >= 1 and the vocabulary size")
        self.directory = Path(directory)
        self.mode, self.k, self.vocab_size = mode, k, vocab_size
        self.tail = tail  # how the top-k teacher spreads its tail (losses.fused.TopKTeacher)
        self.label = mode if mode == "exact" else f"top{k}"
        self.index: dict[str, tuple[int, int]] = {}
        self.hidden: np.ndarray | None = None  # exact: [tokens, H]; topk: log-probs [tokens, k]
        self.ids: np.ndarray | None = None  # topk: token ids [tokens, k]
        self.target: np.ndarray | None = None  # topk: the actual (next) token's log-prob [tokens]
        self.teacher_rows = 0
        self.cached_rows = 0
        self.built_rows = 0  # sequences the teacher ran over to build the cache (0: an existing one was loaded)

    # ------------------------------------------------------------------ building and loading
    def build(self, teacher: torch.nn.Module, sequences: Iterable[tuple[list[int], list[int]]], *,
              max_length: int, pad_token_id: int, batch_size: int = 8) -> "TeacherCache":
        """Load the cache of these sequences if a valid one exists, else run the teacher over them (under
        torch.inference_mode, with a progress bar) and write it atomically."""
        batches = self._batches(list(sequences), max_length, pad_token_id, batch_size)
        keys = [key for batch in batches for key in sequence_keys(batch)]
        data_key = hashlib.sha256("\n".join(sorted(set(keys))).encode()).hexdigest()[:16]
        stem = f"{self.label}-{teacher_fingerprint(teacher)[:16]}-{data_key}"
        array_path, manifest_path = self.directory / f"{stem}.npy", self.directory / f"{stem}.json"
        if self._load(array_path, manifest_path):
            logger.info("Teacher cache: %d sequences from %s", len(self.index), array_path)
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        index, parts, offset = {}, [], 0
        device = next(teacher.parameters()).device
        for batch in tqdm(batches, desc="teacher cache", unit="batch"):
            batch = {name: value.to(device) for name, value in batch.items()}
            with torch.inference_mode():
                fused = fused_inputs(teacher, batch)
            hidden, mask = fused.head.hidden, fused.mask
            for key, row_hidden, row_mask, row_labels in zip(sequence_keys(batch), hidden, mask, fused.labels):
                if key in index:
                    continue
                rows = row_hidden[row_mask]
                if self.mode == "topk":  # the teacher's k most likely tokens, and its actual token's log-prob
                    head = fused.head
                    top = topk_rows(rows, head.weight, head.bias, row_labels[row_mask], self.k, self.vocab_size)
                    parts.append(tuple(x.cpu().numpy() for x in top))
                else:
                    parts.append((rows.float().cpu().numpy(),))
                index[key] = (offset, parts[-1][0].shape[0])
                offset += parts[-1][0].shape[0]
        self.built_rows = len(index)
        width = (teacher.get_output_embeddings().weight.shape[1] if self.mode == "exact"
                 else min(self.k, self.vocab_size))
        empty = [np.zeros((0, width), dtype=np.float32), np.zeros((0, width), dtype=np.int32),
                 np.zeros(0, dtype=np.float32)]
        arrays = [np.concatenate([p[i] for p in parts]) if parts else empty[i]
                  for i in range(3 if self.mode == "topk" else 1)]
        paths = self._paths(array_path)
        for path, array in zip(paths, arrays):
            _save_atomic(path, array)
        atomic_write_json(manifest_path, {"mode": self.label, "format": FORMAT[self.mode],
                                          "shape": list(arrays[0].shape),
                                          "sha256": [_sha256(path) for path in paths], "index": index})
        for stale in self.directory.glob(f"{self.label}-*"):
            if not stale.name.startswith(stem + "."):
                stale.unlink(missing_ok=True)
        if not self._load(array_path, manifest_path):
            raise RuntimeError(f"the teacher cache just written to {array_path} does not read back")
        logger.info("Teacher cache: wrote %d sequences (%d tokens) to %s", len(index), arrays[0].shape[0], array_path)
        return self

    def _paths(self, array_path: Path) -> list[Path]:
        """The cache's arrays: exact: the hidden states; topk: the log-probs, their ids, the actual tokens'
        log-probs."""
        if self.mode == "exact":
            return [array_path]
        return [array_path, array_path.with_suffix(".ids.npy"), array_path.with_suffix(".target.npy")]

    def _load(self, array_path: Path, manifest_path: Path) -> bool:
        if not manifest_path.is_file():
            return False
        try:
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("format", 1) != FORMAT[self.mode]:
                # a top-k cache written before the actual tokens' log-probs were stored (format 1: log-probs and
                # ids only): what the cross-tokenizer loss needs is missing, so it is rebuilt, never read
                raise ValueError(f"it is in format {manifest.get('format', 1)}, this version reads format "
                                 f"{FORMAT[self.mode]} (a top-k cache now also stores the actual tokens' log-probs)")
            paths = self._paths(array_path)
            if len(manifest["sha256"]) != len(paths) or any(
                    not path.is_file() or _sha256(path) != digest for path, digest in zip(paths, manifest["sha256"])):
                raise ValueError("its checksum does not match the manifest")
            arrays = [np.load(path, mmap_mode="r") for path in paths]
            shapes = [manifest["shape"], manifest["shape"], manifest["shape"][:1]][:len(arrays)]
            if any(list(array.shape) != shape for array, shape in zip(arrays, shapes)):
                raise ValueError(f"shapes {[a.shape for a in arrays]} do not match the manifest's {manifest['shape']}")
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.warning("Teacher cache %s is incomplete, corrupted or outdated (%s): rebuilding it.", array_path,
                           err)
            return False
        self.hidden = arrays[0]
        self.ids = arrays[1] if self.mode == "topk" else None
        self.target = arrays[2] if self.mode == "topk" else None
        self.index = {key: (int(start), int(length)) for key, (start, length) in manifest["index"].items()}
        return True

    @staticmethod
    def _batches(sequences, max_length: int, pad_token_id: int, batch_size: int) -> list[dict]:
        built = [build_sequences(prompt, response, max_length) for prompt, response in sequences]
        return [pad_left(built[i:i + batch_size], pad_token_id) for i in range(0, len(built), batch_size)]

    # ------------------------------------------------------------------ use
    def scores(self, trainer, inputs: dict[str, torch.Tensor]):
        """The teacher's scores on a micro-batch (as `trainer.run_teacher` gives them): cached rows from disk,
        the others from one teacher pass over just those rows."""
        if self.mode == "topk":
            return self._topk_scores(trainer, inputs, sequence_keys(inputs))
        head = trainer.teacher.get_output_embeddings()
        hidden = self.cached_hidden(inputs, head, lambda subset: trainer.run_teacher(subset, fused=True))
        if hidden is None:
            return trainer.run_teacher(inputs)
        return head_scores(hidden, head, fused=trainer.loss_impl == "fused", vocab_size=trainer.vocab_size)

    def model_scores(self, teacher: torch.nn.Module, inputs: dict[str, torch.Tensor], *, fused: bool,
                     vocab_size: int) -> tuple:
        """(scores, targets) of `teacher` on a left-padded batch in its own tokens -- e.g. the teacher's side of a
        cross-tokenizer batch (`crosstok.data.teacher_batch`) -- as `fused_inputs` (HeadInputs) or
        `response_logits` (logits cut to `vocab_size`) give them: cached rows from disk, the others from one
        teacher pass (under torch.inference_mode) over just those rows. With the top-k cache: a `TopKTeacher`
        [N, R, k] with the actual tokens' log-probs (`target`), the form a served teacher's scores take
        (`teacher.remote.RemoteScores`), whatever `fused`: cached rows from disk, the others' top-k taken from one
        teacher pass over them (`topk_rows`)."""
        if self.mode == "topk":
            if vocab_size != self.vocab_size:
                raise ValueError(f"this top-k teacher cache was built over {self.vocab_size} tokens, the batch's "
                                 f"teacher has {vocab_size}: build it with the teacher's vocabulary size")
            return self._topk_model_scores(teacher, inputs)
        labels = inputs["labels"]
        targets = labels[:, -max(int((labels != IGNORE).sum(-1).max().item()), 1):]
        head = teacher.get_output_embeddings()

        def live(subset):
            with torch.inference_mode():
                scores = fused_inputs(teacher, subset).head
            return HeadInputs(scores.hidden.clone(), scores.weight, scores.bias)

        hidden = self.cached_hidden(inputs, head, live)
        if hidden is None:  # no row cached: the whole batch through the teacher, as without a cache
            if fused:
                return live(inputs), targets
            with torch.inference_mode():
                logits = response_logits(teacher, inputs, vocab_size)[0]
            return logits.clone(), targets  # cloned out of inference mode, so the loss may keep it
        return head_scores(hidden, head, fused=fused, vocab_size=vocab_size), targets

    def cached_hidden(self, inputs: dict[str, torch.Tensor], head: torch.nn.Module, live) -> torch.Tensor | None:
        """The teacher's final hidden states at a left-padded batch's response columns [N, R, H] (R: its longest
        response), in the head's dtype: the rows the cache holds from disk, the others from `live(subset)` (the
        teacher's HeadInputs on just those rows, one pass). None when the cache holds none of the rows (run the
        teacher on the whole batch then). Counts the rows (`cached_rows`, `teacher_rows`)."""
        keys = sequence_keys(inputs)
        hits = [i for i, key in enumerate(keys) if key in self.index]
        if not hits or self.hidden is None:
            self.teacher_rows += len(keys)
            return None
        labels = inputs["labels"]
        width = max(int((labels != IGNORE).sum(-1).max().item()), 1)
        hidden = torch.zeros(len(keys), width, self.hidden.shape[1], dtype=head.weight.dtype,
                             device=labels.device)
        for i in hits:
            start, length = self.index[keys[i]]
            if length:
                hidden[i, width - length:] = torch.from_numpy(np.array(self.hidden[start:start + length]))
        misses = [i for i in range(len(keys)) if i not in set(hits)]
        if misses:
            rows = torch.tensor(misses, device=labels.device)
            subset = {name: inputs[name].index_select(0, rows)
                      for name in ("input_ids", "attention_mask", "position_ids", "labels")}
            live_hidden = live(subset).hidden
            hidden[rows, width - live_hidden.shape[1]:] = live_hidden.to(hidden.dtype)
        self.teacher_rows += len(misses)
        self.cached_rows += len(hits)
        return hidden

    def _topk_model_scores(self, teacher: torch.nn.Module, inputs: dict[str, torch.Tensor]):
        """(TopKTeacher with `target`, targets) of `model_scores` with the top-k cache, per row: cached or live."""
        labels = inputs["labels"]
        width = max(int((labels != IGNORE).sum(-1).max().item()), 1)
        targets = labels[:, -width:]
        keys = sequence_keys(inputs)
        k, device = self.hidden.shape[1], labels.device
        values = torch.zeros(len(keys), width, k, device=device)
        ids = torch.zeros(len(keys), width, k, dtype=torch.long, device=device)
        own = torch.zeros(len(keys), width, device=device)
        hits = [i for i, key in enumerate(keys) if key in self.index]
        for i in hits:
            start, length = self.index[keys[i]]
            if length:
                values[i, width - length:] = torch.from_numpy(np.array(self.hidden[start:start + length]))
                ids[i, width - length:] = torch.from_numpy(np.array(self.ids[start:start + length])).long()
                own[i, width - length:] = torch.from_numpy(np.array(self.target[start:start + length]))
        misses = [i for i in range(len(keys)) if i not in set(hits)]
        if misses:  # one teacher pass over the rows the cache lacks, turned into the same top-k form
            rows = torch.tensor(misses, device=device)
            subset = {name: inputs[name].index_select(0, rows)
                      for name in ("input_ids", "attention_mask", "position_ids", "labels")}
            with torch.inference_mode():
                fused = fused_inputs(teacher, subset)
                head = fused.head
                top = topk_rows(head.hidden[fused.mask], head.weight, head.bias, fused.labels[fused.mask], k,
                                self.vocab_size)
            # the subset's response columns are the last fused.mask.shape[1] of the batch's
            cols = torch.arange(width - fused.mask.shape[1], width, device=device)
            mask = torch.zeros(len(keys), width, dtype=torch.bool, device=device)
            mask[rows.unsqueeze(1), cols] = fused.mask.to(device)
            values[mask], ids[mask], own[mask] = top[0].to(device), top[1].to(device).long(), top[2].to(device)
        self.teacher_rows += len(misses)
        self.cached_rows += len(hits)
        return TopKTeacher(values, ids, self.tail, own), targets

    def _topk_scores(self, trainer, inputs, keys):
        """Per group of sequences: the cached top-k log-probs if the cache holds all of the group's rows, else a
        live (exact) teacher pass over the group."""
        labels = inputs["labels"]
        width = max(int((labels != IGNORE).sum(-1).max().item()), 1)
        n_first = int(inputs["n_first"])
        groups = []
        for rows in (range(0, n_first), range(n_first, len(keys))):
            if not rows:
                groups.append(None)
            elif all(keys[i] in self.index for i in rows):
                k = self.hidden.shape[1]
                values = torch.zeros(len(rows), width, k, device=labels.device)
                ids = torch.zeros(len(rows), width, k, dtype=torch.long, device=labels.device)
                for j, i in enumerate(rows):
                    start, length = self.index[keys[i]]
                    if length:
                        values[j, width - length:] = torch.from_numpy(np.array(self.hidden[start:start + length]))
                        ids[j, width - length:] = torch.from_numpy(np.array(self.ids[start:start + length])).long()
                groups.append(TopKTeacher(values, ids, self.tail))
                self.cached_rows += len(rows)
            else:
                index = torch.tensor(list(rows), device=labels.device)
                subset = {name: inputs[name].index_select(0, index)
                          for name in ("input_ids", "attention_mask", "position_ids", "labels")}
                live = trainer.run_teacher(subset)
                groups.append(_widen(live, width))
                self.teacher_rows += len(rows)
        return TeacherGroups(groups[0], groups[1], n_first)


@torch.no_grad()
def topk_rows(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, k: int,
              vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's top-k at M positions from its final hidden states `hidden` [M, H] and head: (log-probs
    [M, k'] float32, descending; their ids [M, k'] int32; the log-prob of the actual next token `targets` [M]
    float32), k' = min(k, vocab_size), over the first `vocab_size` logits (the tokenizer's real tokens), float32
    log-softmax -- as a vLLM server's prompt_logprobs give them. A chunk of positions at a time (TOPK_CHUNK_BYTES
    of logits), so [M, V] is never alive at once."""
    k = min(k, vocab_size)
    chunk = max(1, TOPK_CHUNK_BYTES // (4 * vocab_size))
    values, ids, own = [], [], []
    for start in range(0, hidden.shape[0], chunk):
        logits = F.linear(hidden[start:start + chunk], weight, bias)[:, :vocab_size].float()
        log_probs = torch.log_softmax(logits, -1)
        top = log_probs.topk(k, dim=-1)
        values.append(top.values)
        ids.append(top.indices.to(torch.int32))
        own.append(log_probs.gather(1, targets[start:start + chunk].long().unsqueeze(-1)).squeeze(-1))
    if not values:
        return (hidden.new_zeros(0, k, dtype=torch.float32), torch.zeros(0, k, dtype=torch.int32, device=hidden.device),
                hidden.new_zeros(0, dtype=torch.float32))
    return torch.cat(values), torch.cat(ids), torch.cat(own)


def head_scores(hidden: torch.Tensor, head: torch.nn.Module, *, fused: bool, vocab_size: int):
    """The teacher's scores from its final hidden states: HeadInputs (fused: the loss applies the head a chunk at
    a time) or logits cut to the tokenizer's `vocab_size` real tokens (plain, as `response_logits` gives them)."""
    bias = getattr(head, "bias", None)
    if fused:
        return HeadInputs(hidden, head.weight, bias)
    return F.linear(hidden, head.weight, bias)[..., :vocab_size]


def _widen(scores, width: int):
    """Teacher scores of a subset of rows, whose longest response may be shorter, left-padded to `width`."""
    if isinstance(scores, HeadInputs):
        hidden = scores.hidden
        if hidden.shape[1] < width:
            hidden = F.pad(hidden, (0, 0, width - hidden.shape[1], 0))
        return HeadInputs(hidden, scores.weight, scores.bias)
    if scores.shape[1] < width:
        scores = F.pad(scores, (0, 0, width - scores.shape[1], 0))
    return scores
