"""The ``ame-merge`` and ``mergekit-yaml`` console entries: Ctrl-C, SIGTERM and SIGHUP are handled
from the first line. (``mergekit-yaml`` is ame-merge with mergekit's argv: ame_kernels/mergekit_yaml.py.)

Importing ``ame_kernels`` (numpy, the native module) takes a few tenths of a second, and a
console script imports its target before calling it: a signal in that window used to print a
KeyboardInterrupt traceback (Ctrl-C) or end the process silently with -15 (SIGTERM). This module
is outside the package and imports nothing heavy, so its handlers are in place before the
package loads; ``ame_kernels.cli.main`` then installs its own. (``python -m ame_kernels``
imports the package before its ``__main__`` runs, so only the console script has this.)
"""

import os
import signal
import sys

_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}


class _EarlySignal(BaseException):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise(signum, frame):
    raise _EarlySignal(signum)


def main() -> int:
    """``ame-merge``."""
    return _start("ame_kernels.cli")


def mergekit_yaml_main() -> int:
    """``mergekit-yaml CONFIG OUT [mergekit-yaml's flags]``: this engine, handing to mergekit what only it runs."""
    return _start("ame_kernels.mergekit_yaml")


def _start(module: str) -> int:
    old = {s: signal.signal(s, _raise) for s in _NAMES}
    try:
        if "import" in os.environ.get("AME_TEST_PAUSE_AT", "").split(","):  # the test hook of io.atomic
            os.write(2, f"ame-test-pause: import {os.getpid()}\n".encode())
            try:
                os.read(0, 1)
            except OSError:
                pass
        import importlib

        cli_main = importlib.import_module(module).main
    except (_EarlySignal, KeyboardInterrupt) as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"ame-merge: error: interrupted ({_NAMES[signum]}) while starting; nothing was written", file=sys.stderr)
        return 130 if signum == signal.SIGINT else 128 + signum
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
