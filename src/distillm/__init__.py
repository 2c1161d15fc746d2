"""distillm: distil a large language model (the teacher) into a smaller one (the student).

The flagship method is DistiLLM-2 (contrastive distillation: skew KL on teacher responses, skew reverse KL on
the student's own responses, batched on-policy). Main entry points:

    from distillm import load_config, run            # the whole pipeline, as `distillm run` does
    from distillm import load_model, prune_layers     # models: aliases, GGUF, layer-pruned students
    from distillm.losses import divergences, cald     # pure loss functions of logits and masks
"""

__version__ = "0.1.0"

from . import _quiet  # noqa: E402,F401  (before transformers imports torchao)

from .config import RunConfig, load_config  # noqa: E402
from .models import load_model, prune_layers  # noqa: E402
from .pipeline import run  # noqa: E402

__all__ = ["RunConfig", "load_config", "load_model", "prune_layers", "run", "__version__"]
