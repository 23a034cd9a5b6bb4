"""The one exception type users see: a clear message, no traceback on the CLI."""


class XCompileError(Exception):
    """Bad input or an impossible request: the message says what, where, and what was expected."""
