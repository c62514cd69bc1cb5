"""The one exception type for input a user can fix (bad spec, bad file, bad flag)."""


class CLoRAError(ValueError):
    """A problem with the user's input, reported as one line that names the culprit.

    The CLI turns it into ``error: <message>`` and exit code 2, without a traceback.
    """


def one_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, for quoting a library's error inside ours."""
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else type(exc).__name__
