"""Distilling step-by-step (Hsieh et al.): learn the answer and, as a second task, the teacher's rationale.

Data (built once, before training): the teacher answers every prompt with `sbs_instruction` appended ("explain
your reasoning, then give the final answer on its own last line as 'Answer: ...'"); its response is split into
a rationale (the text before the last 'Answer:' line) and an answer (after it). The answer label is the prompt
file's reference response when there is one (ground truth, as in the paper), else the teacher's answer; a
response without an 'Answer:' line gives its last line as the answer if it has several lines, else no answer
(that prompt then trains the rationale task only; such prompts are counted and reported).
Two tasks with task prefixes on the input: `sbs_answer_prefix` + prompt -> answer, `sbs_rationale_prefix` +
prompt -> rationale. Loss: NLL(answer) + `sbs_rationale_weight` * NLL(rationale), each reduced per the
`reduction` option. No teacher pass while training.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from ..options import opt
from .base import LossInputs, Method, sequence_sums
from .seqkd import response_nll

logger = logging.getLogger("distillm")

_ANSWER_LINE = re.compile(r"^[ \t*#>-]*(?:final\s+)?answer\s*[:：]\s*(.*?)\s*$", re.IGNORECASE | re.MULTILINE)


def split_rationale(text: str) -> tuple[str, str | None]:
    """(rationale, answer or None) of a teacher response (see the module docstring)."""
    matches = list(_ANSWER_LINE.finditer(text))
    if matches:
        last = matches[-1]
        answer = last.group(1).strip() or None
        return text[:last.start()].strip(), answer
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if len(lines) >= 2:
        return "\n".join(lines[:-1]).strip(), lines[-1].strip()
    return text.strip(), None


def with_prefix(prefix: str, messages: list[dict]) -> list[dict]:
    """The chat with `prefix` prepended to its last user message."""
    out = [dict(m) for m in messages]
    last_user = max(i for i, m in enumerate(out) if m["role"] == "user")
    out[last_user]["content"] = prefix + out[last_user]["content"]
    return out


def with_suffix(suffix: str, messages: list[dict]) -> list[dict]:
    out = [dict(m) for m in messages]
    last_user = max(i for i, m in enumerate(out) if m["role"] == "user")
    out[last_user]["content"] = out[last_user]["content"].rstrip() + "\n\n" + suffix
    return out


class StepByStep(Method):
    name = "step-by-step"
    summary = "multi-task NLL: answer and teacher rationale, with task prefixes; no teacher pass while training"
    needs_teacher = False
    rank = 9

    @dataclass
    class Options:
        sbs_rationale_weight: float = opt(1.0, "step-by-step: weight of the rationale task (loss = answer NLL + weight * rationale NLL).", ge=0)
        sbs_answer_prefix: str = opt("[answer] ", "step-by-step: task prefix of the answer task (prepended to the prompt).")
        sbs_rationale_prefix: str = opt("[rationale] ", "step-by-step: task prefix of the rationale task.")
        sbs_instruction: str = opt("Think step by step: explain your reasoning, then give the final answer on its own last line as 'Answer: <answer>'.", "step-by-step: instruction appended to each prompt when asking the teacher for a rationale.")

    @classmethod
    def uses_teacher_rows(cls, config) -> bool:
        return False  # the teacher's rationales are its own generation, not the shared teacher responses

    def build_rows(self, ctx) -> list[dict]:
        o = self.config.method
        asked = ctx.encode(lambda messages: with_suffix(o.sbs_instruction, messages))
        responses = ctx.teacher_generate(asked, "teacher_rationales_train.jsonl", "teacher rationales")
        answer_prompts = ctx.encode(lambda messages: with_prefix(o.sbs_answer_prefix, messages))
        rationale_prompts = ctx.encode(lambda messages: with_prefix(o.sbs_rationale_prefix, messages))
        by_id = {r["id"]: r for r in responses}
        rows, no_answer, from_data = [], 0, 0
        for plain, answer_prompt, rationale_prompt in zip(ctx.prompts, answer_prompts, rationale_prompts):
            rationale, answer = split_rationale(by_id[plain.id]["response"])
            if plain.response:
                answer, from_data = plain.response, from_data + 1
            no_answer += answer is None
            rows.append({
                "id": plain.id,
                "answer_prompt_ids": answer_prompt.input_ids,
                "answer_ids": ctx.encode_response(answer) if answer else [],
                "rationale_prompt_ids": rationale_prompt.input_ids,
                "rationale_ids": ctx.encode_response(rationale) if rationale else [],
                "prompt_ids": plain.input_ids,
            })
        logger.info("step-by-step: %d prompts; answers from the prompt file for %d, from the teacher for %d; "
                    "%d without an answer (rationale task only)", len(rows), from_data,
                    len(rows) - from_data - no_answer, no_answer)
        return rows

    def sequences(self, row):
        return [(row["answer_prompt_ids"], row["answer_ids"]), (row["rationale_prompt_ids"], row["rationale_ids"])]

    def compute_loss(self, batch: LossInputs):
        answer_loss, answer_nll, answer_mask = response_nll(batch, batch.first, 0, self.reduction, self.temperature)
        rationale_loss, rationale_nll, rationale_mask = response_nll(batch, batch.second, 1, self.reduction,
                                                                     self.temperature)
        loss = answer_loss + self.config.method.sbs_rationale_weight * rationale_loss
        metrics = {"units": float(batch.n_first), "answer_nll": sequence_sums(answer_nll, answer_mask),
                   "rationale_nll": sequence_sums(rationale_nll, rationale_mask)}
        return loss, metrics, {}
