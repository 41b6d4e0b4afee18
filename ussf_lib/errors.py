"""One exception type for mistakes a user can fix, and the one rule for the kind of a hand-written value.

The CLI prints a ``UserError`` as a single line on stderr and exits with code 2, without a traceback;
anything else is a bug and keeps its traceback. :func:`same_kind` checks run configs and notebook parameters.
"""


class UserError(Exception):
    """A problem with the user's input (a path, a value, a file), with the fix in the message."""


def same_kind(value: object, default: object) -> bool:
    """Whether a hand-written ``value`` (a JSON config, a notebook parameter) has the kind of ``default``: a
    bool for a bool, a whole number for an int (not a bool), any number for a float, a list or tuple of the same
    length for a tuple (JSON has no tuples), else an instance of the default's type."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, tuple):
        return isinstance(value, (list, tuple)) and len(value) == len(default)
    return isinstance(value, type(default))
