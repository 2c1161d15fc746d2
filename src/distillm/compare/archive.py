"""A comparison's small records, kept outside its output directory so that the work survives the machine.

A full-size comparison runs for hours and its output directory holds gigabytes (students, teacher caches). What
its report needs is small: the shared prompts and teacher responses, the reference evaluation, and per finished
cell its ``cell.json`` and its held-out generations (the teacher's per-answer scores among them, which the
preference figure reads). ``distillm compare --archive DIR`` copies those into DIR after each finished cell
(a few hundred kB per cell; DIR can be committed), and at the start copies what DIR holds and the output
directory lacks back in, so that a comparison moved to a new machine continues with every archived cell counted
as finished and runs only the others. The run's config, metrics and training log and the student's samples of
each round are archived too, for readers (curves, the a and b trajectories, what the student wrote as it
trained); they are not restored, as a finished cell never reads them.

Layout: the output directory's own relative paths, e.g. ``DIR/cells/kd/seed_0/cell.json`` and
``DIR/eval/generations/kd-seed0/responses.jsonl``. Restoring never overwrites the output directory's shared
files: an output directory whose prompts, teacher responses or reference differ from the archive's is refused
(its cells would not be comparable).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..io import atomic_write_text
from .protocol import CompareError, CompareSettings, cell_model_name, protocol_changes

logger = logging.getLogger("distillm")

#: the work every cell shares, in the order it is made
SHARED = ("compare.json", "shared/prompts.jsonl", "shared/teacher_train.jsonl", "shared/reference.json")
#: per finished cell, beside cell.json (glob patterns): kept for readers, not restored -- the run's config,
#: metrics and training log, and the student's own samples of each round (on-policy methods)
CELL_RUN_FILES = ("run/config.yaml", "run/metrics.json", "run/logs/train_log.jsonl", "run/rounds/round_*/student.jsonl")


def _generation_files(folder: Path) -> list[Path]:
    """The files of one model's held-out generations (partial files of an interrupted write left out)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.endswith((".partial", ".tmp")))


def _copy(source: Path, target: Path) -> bool:
    """Copy one text file atomically unless `target` already holds the same text; whether it wrote."""
    text = source.read_text(encoding="utf-8")
    if target.is_file() and target.read_text(encoding="utf-8") == text:
        return False
    atomic_write_text(target, text)
    return True


def _cells(root: Path) -> list[Path]:
    """The finished cells under `root` (their folders, relative to it)."""
    return sorted(p.parent.relative_to(root) for p in root.glob("cells/*/seed_*/cell.json"))


def _model_name(cell_folder: Path) -> str:
    variant, seed = cell_folder.parts[1], int(cell_folder.parts[2].removeprefix("seed_"))
    return cell_model_name(variant, seed)


def save(root: Path, archive: Path) -> int:
    """Copy the finished work under the comparison directory `root` into `archive`; the number of files written
    (files the archive already holds unchanged are skipped)."""
    root, archive = Path(root), Path(archive)
    wanted: list[Path] = [Path(p) for p in SHARED if (root / p).is_file()]
    if (root / "shared" / "reference.json").is_file():
        for name in ("teacher", "initial"):
            wanted += [p.relative_to(root) for p in _generation_files(root / "eval" / "generations" / name)]
    cells = _cells(root)
    for cell in cells:
        wanted += [cell / "cell.json"] + sorted(p.relative_to(root) for pattern in CELL_RUN_FILES
                                                for p in (root / cell).glob(pattern) if p.is_file())
        wanted += [p.relative_to(root) for p in _generation_files(root / "eval" / "generations" / _model_name(cell))]
    written = sum(_copy(root / p, archive / p) for p in wanted)
    if written:
        logger.info("archive %s: %d file(s) written (%d finished cells)", archive, written, len(cells))
    return written


def restore(root: Path, archive: Path, settings: CompareSettings) -> int:
    """Copy into the comparison directory `root` (its compare.json already written for `settings`) what `archive`
    holds and `root` lacks: the shared files, the reference evaluation and every finished cell (its cell.json and
    generations). The number of files written; 0 when the archive is empty or absent."""
    root, archive = Path(root), Path(archive)
    saved = archive / "compare.json"
    if not saved.is_file():
        if archive.exists() and any(archive.iterdir()):
            raise CompareError(f"--archive {archive} is not empty and holds no compare.json: choose an empty or new "
                               "folder, or the archive of this comparison.")
        return 0
    changed = protocol_changes(json.loads(saved.read_text()), settings)
    if changed:
        raise CompareError(f"--archive {archive} holds a comparison with other settings (differs in: "
                           f"{', '.join(changed)}; see {saved}). Use the same settings, or another --archive.")
    written = 0
    for rel in SHARED[1:]:
        source, target = archive / rel, root / rel
        if not source.is_file():
            continue
        if target.is_file():
            if target.read_text(encoding="utf-8") != source.read_text(encoding="utf-8"):
                raise CompareError(f"{target} differs from the archive's {source}: the output directory's cells "
                                   "were made from other shared work than the archived ones. Restore into an "
                                   "empty --output-dir, or leave out --archive.")
            continue
        if rel == "shared/reference.json":  # the reference and the generations it was computed from, together
            for name in ("teacher", "initial"):
                for p in _generation_files(archive / "eval" / "generations" / name):
                    written += _copy(p, root / p.relative_to(archive))
        written += _copy(source, target)
    restored = 0
    for cell in _cells(archive):
        if (root / cell / "cell.json").is_file():
            continue
        for p in _generation_files(archive / "eval" / "generations" / _model_name(cell)):
            written += _copy(p, root / p.relative_to(archive))
        written += _copy(archive / cell / "cell.json", root / cell / "cell.json")  # last: finished from here
        restored += 1
    if written:
        logger.info("restored from the archive %s: %d finished cell(s), %d file(s)", archive, restored, written)
    return written
