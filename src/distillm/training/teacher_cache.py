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

Across tokenizers (`crosstok`) the exact cache holds the teacher's states on its own responses in its own tokens
(its prompt rendering, its sampled response ids), keyed by the teacher's ids: `model_scores` scores the teacher's
side of a cross batch. The top-k cache is refused there (the cross loss needs the teacher's full distribution).
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
            for key, row_hidden, row_mask in zip(sequence_keys(batch), hidden, mask):
                if key in index:
                    continue
                rows = row_hidden[row_mask]
                if self.mode == "topk":  # the teacher's k most likely tokens at each position
                    head = fused.head
                    logits = F.linear(rows, head.weight, head.bias)[:, :self.vocab_size].float()
                    top = torch.log_softmax(logits, -1).topk(min(self.k, self.vocab_size), dim=-1)
                    rows = (top.values, top.indices.to(torch.int32))
                    parts.append(tuple(x.cpu().numpy() for x in rows))
                else:
                    parts.append((rows.float().cpu().numpy(),))
                index[key] = (offset, parts[-1][0].shape[0])
                offset += parts[-1][0].shape[0]
        self.built_rows = len(index)
        width = (teacher.get_output_embeddings().weight.shape[1] if self.mode == "exact"
                 else min(self.k, self.vocab_size))
        arrays = [np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, width), dtype=np.float32)]
        if self.mode == "topk":
            arrays.append(np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, width), dtype=np.int32))
        paths = [array_path, array_path.with_suffix(".ids.npy")][:len(arrays)]
        for path, array in zip(paths, arrays):
            _save_atomic(path, array)
        atomic_write_json(manifest_path, {"mode": self.label, "shape": list(arrays[0].shape),
                                          "sha256": [_sha256(path) for path in paths], "index": index})
        for stale in self.directory.glob(f"{self.label}-*"):
            if not stale.name.startswith(stem + "."):
                stale.unlink(missing_ok=True)
        if not self._load(array_path, manifest_path):
            raise RuntimeError(f"the teacher cache just written to {array_path} does not read back")
        logger.info("Teacher cache: wrote %d sequences (%d tokens) to %s", len(index), array.shape[0], array_path)
        return self

    def _load(self, array_path: Path, manifest_path: Path) -> bool:
        if not manifest_path.is_file():
            return False
        try:
            manifest = json.loads(manifest_path.read_text())
            paths = [array_path, array_path.with_suffix(".ids.npy")][:2 if self.mode == "topk" else 1]
            if len(manifest["sha256"]) != len(paths) or any(
                    not path.is_file() or _sha256(path) != digest for path, digest in zip(paths, manifest["sha256"])):
                raise ValueError("its checksum does not match the manifest")
            arrays = [np.load(path, mmap_mode="r") for path in paths]
            if any(list(array.shape) != manifest["shape"] for array in arrays):
                raise ValueError(f"shape {arrays[0].shape} != {manifest['shape']}")
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.warning("Teacher cache %s is incomplete or corrupted (%s): rebuilding it.", array_path, err)
            return False
        self.hidden = arrays[0]
        self.ids = arrays[1] if self.mode == "topk" else None
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
        teacher pass (under torch.inference_mode) over just those rows. Exact cache only."""
        if self.mode != "exact":
            raise ValueError("model_scores needs the exact teacher cache (the top-k one holds no hidden states)")
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
