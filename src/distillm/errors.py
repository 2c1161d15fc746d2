"""The error every bad input raises: the CLI prints its message (which names the file, line, field or option
and how to fix it) without a traceback."""


class DistillmError(ValueError):
    """Bad input or state the user can fix; the message says where and how."""
