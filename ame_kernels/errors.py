"""The one exception users catch: bad input is reported before any work is done; and the
"did you mean" hint its messages share."""

import difflib
from typing import Sequence


class MergeError(ValueError):
    """Raised for invalid ingredients, configs or files; the message names the culprit."""


class Terminated(BaseException):
    """SIGTERM/SIGHUP, raised in the main thread so cleanup handlers run (BaseException, like KeyboardInterrupt)."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


def suggest(key: str, choices: Sequence[str]) -> str:
    """' (did you mean 'x'?)' with the closest of ``choices`` to ``key``, or '' when none is close."""
    close = difflib.get_close_matches(str(key), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
