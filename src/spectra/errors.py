"""One exception type for every user-facing error.

The CLI catches :class:`SpectraError`, prints its one-line message and exits with
status 2, so bad input never surfaces as a stack trace from deep inside torch.
"""


class SpectraError(Exception):
    """A problem with the user's input (file, field, flag) with a message saying how to fix it."""


def closest(word: str, choices) -> str:
    """' (did you mean X?)' for the closest choice, or '' when nothing is close."""
    import difflib

    m = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {m[0]!r}?)" if m else ""
