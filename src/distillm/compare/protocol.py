"""The comparison's protocol: its variants (every method, and the methods' ablation variants), metrics, sizes and
settings (see `distillm.compare`)."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field

from .. import methods
from ..config import METHOD_NAMES
from ..errors import DistillmError
from ..quant.qat import QUANT_BITS

logger = logging.getLogger("distillm")


class CompareError(DistillmError):
    """Bad comparison settings, or an output directory holding another comparison."""


#: the methods' ablation variants (DistiLLM-2's components, paper Table 6: the last row, "all", is the distillm2
#: cell itself), declared by each method (`Method.ablations`, `Method.ablation_rows`)
ABLATIONS: dict[str, dict] = methods.ablations()
ABLATION_ROWS = methods.ablation_rows()
VARIANTS: dict[str, dict] = {**{name: {"method": name} for name in METHOD_NAMES}, **ABLATIONS}

#: metric key -> (label, better); the order is the table's
METRICS = {
    "teacher_nll": ("teacher NLL of responses", "lower"),
    "kl": ("KL(teacher ‖ student)", "lower"),
    "tvd": ("TVD", "lower"),
    "rouge_l": ("ROUGE-L", "higher"),
    "distinct_2": ("distinct-2", "target"),  # neither direction: the teacher's value is the target
    # degeneracy (evaluation.degeneracy): a collapsed student wins the teacher-NLL column; these expose it
    "distinct_2_gap": ("distinct-2 distance to the teacher's", "lower"),  # no '|' in a table cell
    "repetition": ("repetition (seq-rep-4)", "target"),
    "loop_rate": ("answers ending in a loop", "target"),
    "empty_rate": ("empty answers", "target"),
    "math_accuracy": ("arithmetic exact match", "higher"),
    "win_rate": ("judge win rate", "higher"),
}
HEADLINE = ("teacher_nll", "kl", "rouge_l", "math_accuracy", "win_rate")
CHARTED = HEADLINE + ("distinct_2",)

#: sizes; `full` is the default on SmolLM2 (a few hours on 2 CPU cores), `quick` the same protocol in < 30 min
SIZES: dict[str, dict] = {
    "full": dict(num_builtin=128, num_generated=32, rounds=2, max_new_tokens=32, batch_size=8,
                 num_eval_prompts=40, num_math=40, eval_max_new_tokens=64),
    # the longer budget: every built-in training prompt, 8 rounds (256 optimizer steps per cell), e.g. after a
    # warm-up (`--student`)
    "long": dict(num_builtin=200, num_generated=56, rounds=8, max_new_tokens=32, batch_size=8,
                 num_eval_prompts=40, num_math=40, eval_max_new_tokens=64),
    "quick": dict(num_builtin=14, num_generated=2, rounds=2, max_new_tokens=16, batch_size=8,
                  num_eval_prompts=8, num_math=8, eval_max_new_tokens=24),
    # tiny random models: the tests
    "tiny": dict(num_builtin=6, num_generated=2, rounds=2, max_new_tokens=8, batch_size=4,
                 num_eval_prompts=3, num_math=3, eval_max_new_tokens=8),
}


@dataclass
class CompareSettings:
    output_dir: str = "runs/compare"
    size: str = "full"
    teacher: str = "smollm2-135m-instruct"
    student_layers: str = "even:10"
    #: every cell's starting student, e.g. a warm-up run's `student/` directory; None: derived from the teacher
    #: (pruned to `student_layers`, or quantized by `student_quant`)
    student: str | None = None
    #: the quantized regime: the student is the teacher with its linear weights fake-quantized to this grid
    #: (e.g. "int3"), starting from round-to-nearest; "none": the layer-pruned student of `student_layers`
    student_quant: str = "none"
    student_quant_group_size: int = 32
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    learning_rate: float = 2e-4
    temperature: float = 0.8
    top_p: float = 0.95
    max_prompt_length: int = 128
    judge_url: str | None = None
    judge_model: str | None = None
    judge_api_key_env: str | None = None
    #: any run option for every cell (e.g. {"save_steps": 4}); applied before the variant's own options
    run_overrides: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.size not in SIZES:
            raise CompareError(f"Unknown size {self.size!r}: choose one of {', '.join(SIZES)}.")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise CompareError(f"Unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}.")
        if not self.variants:
            raise CompareError("No variants to compare: give at least one (e.g. --variants distillm2,kd).")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise CompareError(f"Seeds must be a non-empty list of distinct integers (got {self.seeds}).")
        if self.student_quant != "none" and self.student_quant not in QUANT_BITS:
            raise CompareError(f"Unknown --student-quant {self.student_quant!r}: choose none or one of "
                               f"{', '.join(QUANT_BITS)}.")
        if self.student is not None and self.student_quant != "none":
            raise CompareError("--student and --student-quant exclude each other: a quantized comparison starts "
                               "from the teacher's round-to-nearest copy.")
        if self.student_quant_group_size < 32 or self.student_quant_group_size % 32:
            raise CompareError("--student-quant-group-size must be a multiple of 32 (the GGUF block), got "
                               f"{self.student_quant_group_size}.")
        if bool(self.judge_url) != bool(self.judge_model):
            raise CompareError("A judge needs both --judge-url and --judge-model (or neither: no win rate).")

    @property
    def sizes(self) -> dict:
        return SIZES[self.size]

    def protocol(self) -> dict:
        """What every cell must share: a directory holding a comparison with another protocol is refused."""
        out = dataclasses.asdict(self)
        for key in ("output_dir", "variants", "seeds", "judge_api_key_env"):
            out.pop(key)
        return out | {"sizes": self.sizes}


def cell_model_name(variant: str, seed: int) -> str:
    """A cell's model name in the shared evaluation (letters, digits, . _ - only)."""
    return f"{variant}-seed{seed}".replace("+", "_")


def protocol_changes(saved: dict, settings: CompareSettings) -> list[str]:
    """The protocol keys in which a saved ``compare.json`` differs from `settings` (compared as JSON); [] if none."""
    protocol = json.loads(json.dumps(settings.protocol()))
    return sorted(k for k in set(saved) | set(protocol) if saved.get(k) != protocol.get(k))
