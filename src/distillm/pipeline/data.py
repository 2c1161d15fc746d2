"""A run's training rows: teacher responses (imported or generated), (teacher, student) pairs, and the
`DataContext` a method builds its rows from."""

from __future__ import annotations

import logging
from pathlib import Path

from ..config import RunConfig
from ..data.prompts import EncodedPrompt, encode_prompts, load_prompts
from ..errors import DistillmError
from ..generation.factory import generate_once, sampling_params
from ..io import iter_json_objects, write_jsonl
from ..models import real_vocab_size
from .paths import RunPaths

logger = logging.getLogger("distillm")


def pair_rows(teacher_rows: list[dict], student_rows: list[dict]) -> list[dict]:
    """TRL DPO columns (prompt, chosen = teacher response, rejected = student response) plus token ids.
    Both responses must answer the same prompt tokens: each is scored under the prompt it was sampled from."""
    by_id = {row["id"]: row for row in student_rows}
    pairs = []
    for t in teacher_rows:
        s = by_id[t["id"]]
        if s["prompt_ids"] != t["prompt_ids"]:
            raise DistillmError(f"Prompt {t['id']!r}: the teacher and student responses were generated from different "
                                "prompt tokens (a teacher file made with other prompt settings?).")
        pairs.append({"id": t["id"], "prompt": t["prompt"], "chosen": t["response"], "rejected": s["response"],
                      "prompt_ids": t["prompt_ids"], "chosen_ids": t["response_ids"], "rejected_ids": s["response_ids"]})
    return pairs


def import_teacher_responses(path: str, prompts: list[EncodedPrompt], tokenizer, out: Path) -> None:
    """Use existing teacher responses as the run's teacher data. Rows are matched to the prompt set by id and
    take its (templated, truncated) prompt tokens; rows without `response_ids` are tokenized (plus EOS)."""
    if not Path(path).is_file():
        raise DistillmError(f"Teacher responses file not found: {path}")
    rows = {}
    vocab = real_vocab_size(tokenizer)
    for number, row in iter_json_objects(path):
        if "id" not in row or "response" not in row:
            raise DistillmError(f"{path}:{number}: a teacher response row needs 'id' and 'response' fields "
                                "(`distillm generate` writes such files).")
        check_teacher_row(row, f"{path}:{number}", vocab)
        rows[str(row["id"])] = row
    missing = [p.id for p in prompts if p.id not in rows]
    if missing:
        raise DistillmError(f"{path} has no response for {len(missing)} of the {len(prompts)} training prompts "
                            f"(e.g. id {missing[0]!r}): generate it from the same prompt file and settings.")
    imported = []
    for prompt in prompts:
        row = rows[prompt.id]
        ids = row.get("response_ids") or tokenizer(row["response"], add_special_tokens=False).input_ids + [
            tokenizer.eos_token_id]
        imported.append({"id": prompt.id, "prompt": prompt.text, "response": row["response"],
                         "prompt_ids": prompt.input_ids, "response_ids": ids,
                         "finish_reason": row.get("finish_reason", "stop")})
    write_jsonl(out, imported)


def check_teacher_row(row: dict, where: str, vocab: int) -> None:
    """A teacher response row's fields have the types training needs, and its token ids are in the vocabulary."""
    if isinstance(row["id"], bool) or not isinstance(row["id"], (str, int)):
        raise DistillmError(f"{where}: field 'id' must be a string or an integer (the prompt's id).")
    if not isinstance(row["response"], str):
        raise DistillmError(f"{where}: field 'response' must be a string (the response text).")
    ids = row.get("response_ids")
    if ids is None:
        return
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise DistillmError(f"{where}: field 'response_ids' must be a list of integer token ids. Fix it, or drop the "
                            "field to have the response text tokenized.")
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise DistillmError(
            f"{where}: field 'response_ids' holds the token id {bad}, outside the tokenizer's vocabulary (0 to "
            f"{vocab - 1}): were these responses tokenized by another model? Regenerate them with `distillm generate "
            "--model` the teacher, or drop 'response_ids' from the rows to have the response text tokenized.")


class DataContext:
    """What a method's `build_rows` may use: the training prompts, the teacher (while its backend is open) and
    the run directory. Teacher responses are generated at most once and cached in data/."""

    def __init__(self, config: RunConfig, tokenizer, prompts: list[EncodedPrompt], paths: RunPaths, teacher_backend):
        self.config, self.tokenizer, self.prompts, self.paths = config, tokenizer, prompts, paths
        self.backend = teacher_backend
        self._teacher_rows: list[dict] | None = None

    def teacher_generate(self, prompts: list[EncodedPrompt], filename: str, desc: str) -> list[dict]:
        """The teacher's sampled responses to `prompts`, generated (resumably) into data/`filename`."""
        return generate_once(self.backend, prompts, self.paths.root / "data" / filename, sampling_params(self.config),
                             self.tokenizer, desc=desc)

    def teacher_rows(self) -> list[dict]:
        """Rows (id, prompt_ids, response_ids, ...) of the teacher's responses to the training prompts."""
        if self._teacher_rows is None:
            self._teacher_rows = self.teacher_generate(self.prompts, self.paths.teacher_train.name, "teacher responses")
        return self._teacher_rows

    def dataset_rows(self) -> list[dict]:
        """Rows of the prompt file's own reference responses (its response field or last assistant message)."""
        missing = [p.id for p in self.prompts if not p.response]
        if missing:
            d = self.config.data
            raise DistillmError(
                f"{d.prompts}: --fixed-responses dataset needs a reference response for every prompt (field "
                f"'{d.response_field}', or a final assistant message in '{d.messages_field}'), but {len(missing)} of "
                f"{len(self.prompts)} have none (e.g. id {missing[0]!r}). Add them, point --response-field at the "
                "field that holds them, or use --fixed-responses teacher.")
        return [{"id": p.id, "prompt": p.text, "response": p.response, "prompt_ids": p.input_ids,
                 "response_ids": self.encode_response(p.response)} for p in self.prompts]

    def fixed_rows(self) -> list[dict]:
        """The fixed (off-policy) responses the config asks for: the teacher's or the data set's."""
        return self.dataset_rows() if self.config.method.fixed_responses == "dataset" else self.teacher_rows()

    def prompt_rows(self) -> list[dict]:
        """Prompt-only rows, for methods that answer every prompt afresh while training."""
        return [{"id": p.id, "prompt": p.text, "prompt_ids": p.input_ids, "response_ids": []} for p in self.prompts]

    def encode(self, transform) -> list[EncodedPrompt]:
        """The training prompts again, each chat passed through `transform(messages) -> messages` first (e.g. to
        add a task prefix), in the same order and with the same ids."""
        d = self.config.data
        records, _ = load_prompts(d.prompts, prompt_field=d.prompt_field, messages_field=d.messages_field,
                                  response_field=d.response_field, id_field=d.id_field,
                                  system_prompt=d.system_prompt, limit=d.num_prompts)
        wanted = {p.id for p in self.prompts}
        records = [r for r in records if r.id in wanted]
        for record in records:
            record.messages = transform(record.messages)
        encoded, _ = encode_prompts(records, self.tokenizer, max_prompt_length=d.max_prompt_length,
                                    use_chat_template=d.chat_template)
        return encoded

    def encode_response(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids + [self.tokenizer.eos_token_id]
