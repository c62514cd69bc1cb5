"""The one exception type for input a user can fix (bad spec, bad file, bad flag), and message helpers."""

from __future__ import annotations

import re


class CLoRAError(ValueError):
    """A problem with the user's input, reported as one line that names the culprit.

    The CLI turns it into ``error: <message>`` and exit code 2, without a traceback.
    """


# where a long message may be shortened: after a sentence or a clause
_BOUNDARY = re.compile(r"[.;:,!?)](?=\s)")


def shorten(text: str, limit: int = 200) -> str:
    """``text`` if it fits in ``limit`` characters, else its longest start that ends a sentence or
    clause, followed by an ellipsis; never a cut inside a clause (a word boundary only when the
    first clause alone is longer than ``limit``)."""
    text = text.strip()
    if len(text) <= limit:
        return text
    head = text[: limit - 4]  # room for " ..."
    ends = [m.end() for m in _BOUNDARY.finditer(text[: limit - 3])]
    if ends:
        return head[: ends[-1]].rstrip(",;:") + " ..."
    return (head.rsplit(None, 1)[0] if " " in head else head) + " ..."


def one_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, for quoting a library's error inside ours."""
    lines = str(exc).strip().splitlines()
    return shorten(lines[0], limit) if lines else type(exc).__name__
