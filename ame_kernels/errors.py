"""The one exception users catch: bad input is reported before any work is done."""


class MergeError(ValueError):
    """Raised for invalid ingredients, configs or files; the message names the culprit."""


class Terminated(BaseException):
    """SIGTERM/SIGHUP, raised in the main thread so cleanup handlers run (BaseException, like KeyboardInterrupt)."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum
