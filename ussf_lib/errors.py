"""One exception type for mistakes a user can fix.

The CLI prints a ``UserError`` as a single line on stderr and exits with code 2, without a traceback;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input (a path, a value, a file), with the fix in the message."""
