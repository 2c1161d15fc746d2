"""The paper's comparison at laptop scale: every method (and DistiLLM-2's component ablation) trained from the same
teacher, student initialisation, prompts and budget, evaluated on held-out prompts over several seeds, in one
table (mean ± std over seeds) and one chart.

One *cell* is (variant, seed): a normal `distillm run` directory under ``OUT/cells/VARIANT/seed_S`` (its config
saved there), then an evaluation of its student with the evaluation suite. A cell is finished once its
``cell.json`` exists (written atomically, last); a rerun skips finished cells, and an unfinished cell continues
where its run stopped (the run directory is itself resumable). Work shared by every cell is done once, under
``OUT/shared``: the prompt file, the teacher's responses to it (every cell trains from the same file, so the
teacher side of the budget is identical), and the teacher's and the initial student's evaluation.

Equal budget: the same optimizer steps (rounds x prompts / batch), batch, learning rate and schedule,
`max_new_tokens` and sampling settings (temperature, top-p) for every variant. What each method then generates
differs by design (on-policy methods sample the student for every batch, DistiLLM-2 once per round, SeqKD never);
each cell records the tokens it actually generated (student and teacher) and its wall time, and the table shows
them. Seeds vary the training seed and the generation seed of the student samples; the shared teacher responses
and the held-out evaluation (greedy decoding) are the same for every seed.

Held-out metrics (local, no network): the teacher's NLL of the student's responses, KL and TVD on the teacher's
responses, ROUGE-L against the teacher's responses, exact match on built-in arithmetic problems, and, when a judge
endpoint is given, the judge's win rate against the teacher's responses. Degeneracy figures (repetition, loop and
empty rates, distinct-2 and its distance to the teacher's) flag collapsed students, which every ranking puts last;
the preference figure compares each variant's greedy answers with the initial student's, prompt by prompt, by
their length-normalised teacher log-likelihood (docs/evaluation.md, "Degenerate students and the preference
figure").

Modules: `protocol` (variants, metrics, sizes, `CompareSettings`), `cells` (`Comparison`: the shared work and the
cells), `archive` (the small records kept outside the output directory, `--archive`, so that a comparison moves
to another machine), `report` (tables, charts). The command line (`distillm compare`) is in `distillm.cli`.
"""

from __future__ import annotations

from .cells import CellClaim, Comparison, generated_tokens
from .protocol import (ABLATION_ROWS, ABLATIONS, CHARTED, HEADLINE, METRICS, SIZES, VARIANTS, CompareError,
                       CompareSettings, cell_model_name)
from .report import mean_std, ranking, summarise, write_results

__all__ = ["ABLATION_ROWS", "ABLATIONS", "CHARTED", "HEADLINE", "METRICS", "SIZES", "VARIANTS", "CellClaim",
           "CompareError", "CompareSettings", "Comparison", "cell_model_name", "generated_tokens", "mean_std",
           "ranking", "summarise", "write_results"]
