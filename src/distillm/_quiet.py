"""Silence import-time and run-time messages of torchao and transformers that say nothing about the user's run.

transformers imports torchao when it is installed (distillm needs it for --student-quant). On a CPU-only machine
torchao then logs "Failed to load .../_C_*.so" for its CUDA kernel libraries, and torch logs a deprecation note for
each Enum torchao registers as a pytree constant. Fake quantization uses neither; only these two messages are
dropped, every other warning of both loggers still shows.
"""

import logging
import warnings


class _DropMessages(logging.Filter):
    def __init__(self, *needles: str):
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        return not any(needle in text for needle in self.needles)


logging.getLogger("torchao").addFilter(_DropMessages("Failed to load", "Skipping import of cpp extensions"))
logging.getLogger("torch.utils._pytree").addFilter(_DropMessages("is an Enum subclass and is now natively supported"))

# transformers 5.x's Trainer reads its own deprecated `is_gradient_checkpointing` property and warns about it at
# every run (modeling_utils.py); nothing in the user's configuration triggers it or can avoid it.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
