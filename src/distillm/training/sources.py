"""Fresh training data made during training, shared by the on-policy methods (gkd, imitkd, minillm, distillm v1,
speculative-kd): the current student's responses to a micro-batch's prompts, or the joint student-teacher
decoding of speculative KD.

The trainer binds one `OnlineSampler` to the live student and a per-micro-batch seed (derived from the training
seed, the optimizer step and the micro-batch), so the data of a step is reproducible and a resumed run draws
exactly what an uninterrupted one would. It counts the tokens it generates (`generated`, shared by its bound
copies): the trainer logs them per step, so a run's generation budget can be read off its training log.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

from ..errors import DistillmError
from ..generation.base import SamplingParams
from ..generation.hf import HFBackend
from ..generation.speculative import blockwise_speculative_decode, speculative_decode


@dataclass
class OnlineSampler:
    model: object  # the live (unwrapped) student
    teacher: object
    tokenizer: object
    params: SamplingParams
    vocab_size: int
    seed: int = 0
    image_inputs: object | None = None  # vision-language runs: training.vision.ImageInputs (rows -> pixel_values)
    #: a teacher reached by request (--teacher-url: teacher.remote.RemoteJointTeacher) for joint decoding when
    #: `teacher` is None
    joint_teacher: object | None = None
    #: tokens generated so far: "student" (sampled or proposed by the student), "teacher" (sampled by the teacher
    #: in joint decoding); one Counter shared by every bound copy
    generated: Counter = field(default_factory=Counter)

    def bound(self, model, seed: int) -> "OnlineSampler":
        return replace(self, model=model, seed=seed)

    # the `Sampler` protocol of methods.base
    def student(self, rows: list[dict]) -> list[dict]:
        """The current student's responses to the rows' prompts (sampled with the run's settings)."""
        backend = HFBackend(self.model, self.tokenizer, max_batch_size=len(rows))
        images = self.image_inputs.generate_inputs(rows=rows) if self.image_inputs is not None else {}
        completions = backend.generate_batch([r["prompt_ids"] for r in rows], self.params, seed=self.seed, **images)
        self.generated["student"] += sum(len(c.token_ids) for c in completions)
        return [{"id": r["id"], "prompt_ids": r["prompt_ids"], "response_ids": c.token_ids, "source": "student"}
                for r, c in zip(rows, completions)]

    def speculative(self, rows: list[dict], top_k: int) -> list[dict]:
        """Responses decoded jointly: the student proposes, the teacher keeps its top-K (generation.speculative)."""
        if self.image_inputs is not None:
            raise DistillmError("speculative-kd's joint decoding does not take images: use another method for "
                                "vision-language models.")
        backend = HFBackend(self.model, self.tokenizer, max_batch_size=len(rows))  # and its pad / end ids
        prompts = [r["prompt_ids"] for r in rows]
        if self.teacher is not None:
            completions = speculative_decode(
                self.model, self.teacher, prompts, self.params, top_k=top_k, seed=self.seed,
                eos_ids=backend.eos_ids, pad_id=backend.pad_id, vocab_size=self.vocab_size,
            )
        elif self.joint_teacher is not None:  # a served teacher: the same rule, a block of drafts at a time
            completions = blockwise_speculative_decode(backend, self.joint_teacher, prompts, self.params,
                                                       top_k=top_k, seed=self.seed, eos_ids=backend.eos_ids)
        else:
            raise DistillmError("speculative-kd's joint decoding needs a teacher: a model in this process or a "
                                "--teacher-url server.")
        self.generated["student"] += sum(len(c.token_ids) for c in completions)  # one proposal per position
        self.generated["teacher"] += sum(sum(c.replaced) for c in completions)
        return [{"id": r["id"], "prompt_ids": r["prompt_ids"], "response_ids": c.token_ids, "source": "speculative",
                 "proposals": c.proposals, "replaced": c.replaced} for r, c in zip(rows, completions)]
