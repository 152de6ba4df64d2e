"""The one exception type the CLI turns into a single clear error line."""


class UserError(Exception):
    """Bad input or environment: the message names the problem and the fix, no traceback."""
