"""distillm: distil a large language model into a smaller one."""
__version__ = "0.1.0"
