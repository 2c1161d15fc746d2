"""Silence two import-time messages of torchao that say nothing about the user's run.

transformers imports torchao when it is installed (distillm needs it for --student-quant). On a CPU-only machine
torchao then logs "Failed to load .../_C_*.so" for its CUDA kernel libraries, and torch logs a deprecation note for
each Enum torchao registers as a pytree constant. Fake quantization uses neither; only these two messages are
dropped, every other warning of both loggers still shows.
"""

import logging


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
