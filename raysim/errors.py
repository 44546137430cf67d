"""User-facing error type: one line that names the field and the fix, exit code 2 from the CLI."""

import reprlib


class ScenarioError(ValueError):
    """A scenario, a data file or a setting that cannot be run as given.

    The message is one line that names the offending field and says how to fix it;
    the command line prints it without a traceback and exits with code 2.
    """


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4
_REPR.maxlevel = 2


def shown(value: object) -> str:
    """A user's value as an error message echoes it: its repr, never more than a few dozen characters,
    however long the string or deep the list (an error must stay one short line)."""
    return _REPR.repr(value)


def shown_text(text: str, limit: int = 80) -> str:
    """A user's string (a path, a key) as a message echoes it: control characters escaped and the
    middle of a long one elided, keeping both ends."""
    text = text if text.isprintable() else text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else f"{text[: limit // 2]}...{text[-(limit // 2):]} ({len(text)} characters)"


def first_line(err: BaseException, limit: int | None = None) -> str:
    """``Type: first line of the message`` (``Type`` alone for an empty message), at most ``limit`` characters
    of message: how a run reports an exception it survives (a failed client, a lost worker) in one line."""
    text = str(err).strip()
    line = text.splitlines()[0] if text else ""
    if limit is not None:
        line = line[:limit]
    return f"{type(err).__name__}: {line}" if line else type(err).__name__
