"""The ``mergekit-yaml`` console script: ``ame-merge CONFIG OUT [flags]`` under mergekit's name.

pip gives ``bin/mergekit-yaml`` to whichever of ame-kernels and mergekit was installed last
(silently; uninstalling that one removes the file). So that the command keeps working either
way, a run this engine refuses but mergekit runs (``spec.MergekitOnly``: a mergekit method or
key not implemented here, DoRA, a mergekit flag ame-merge lacks) is handed, with the same argv,
to mergekit's own entry (``mergekit.scripts.run_yaml:main``) when mergekit is importable and
``AME_NO_MERGEKIT_FALLBACK=1`` is not set; otherwise it is the usual error, exit 2. The
hand-over happens only before anything is written, never for a config mergekit refuses too,
and never when the argv has a flag only ame-merge knows (mergekit would refuse it).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import List, Optional, Sequence

#: mergekit-yaml 0.1.5's options that take a value (tests/test_mergekit_schema.py checks these
#: tables against the installed mergekit where there is one)
MK_VALUE_FLAGS = ("--transformers-cache", "--lora-merge-cache", "--lora-merge-dtype", "--device", "--out-shard-size",
                  "--random-seed", "--num-threads", "-j", "--write-threads")
#: ... and its switches
MK_SWITCHES = ("--allow-crimes", "--no-allow-crimes", "--unsafe-truncate-embeddings", "--no-unsafe-truncate-embeddings",
               "--cuda", "--no-cuda", "--low-cpu-memory", "--no-low-cpu-memory", "--copy-tokenizer",
               "--no-copy-tokenizer", "--clone-tensors", "--no-clone-tensors", "--trust-remote-code",
               "--no-trust-remote-code", "--lazy-unpickle", "--no-lazy-unpickle", "--write-model-card",
               "--no-write-model-card", "--safe-serialization", "--no-safe-serialization", "-v", "--quiet",
               "--no-quiet", "--read-to-gpu", "--no-read-to-gpu", "--multi-gpu", "--no-multi-gpu", "--gpu-rich",
               "--async-write", "--no-async-write", "--help")
#: mergekit's '--no-X' switches that state what this engine does anyway: dropped before parsing
#: (an earlier --X of the same switch with them, click's last-one-wins)
DEFAULT_NEGATIONS = ("--no-allow-crimes", "--no-unsafe-truncate-embeddings", "--no-trust-remote-code", "--no-quiet",
                     "--no-cuda", "--no-low-cpu-memory", "--no-read-to-gpu", "--no-multi-gpu", "--no-async-write",
                     "--no-clone-tensors")
ENV_OFF = "AME_NO_MERGEKIT_FALLBACK"


def _flag(tok: str) -> str:
    return tok.split("=", 1)[0] if tok.startswith("--") else tok


def classify(argv: Sequence[str], ours: Sequence[str]):
    """(argv for ame-merge, mergekit-only flags, ame-merge-only flags). ``ours``: ame-merge's
    option strings. A token that is neither (a typo) is left for ame-merge's parser to name."""
    out: List[str] = []
    mk_only: List[str] = []
    ours_only: List[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        name = _flag(tok)
        takes = name in MK_VALUE_FLAGS and "=" not in tok
        if tok == "--":
            out.extend(argv[i:])
            break
        if name == "-v" or (len(tok) > 2 and tok.startswith("-v") and set(tok[1:]) == {"v"}):
            out.append("-v")  # mergekit's count (-vv): ame-merge's -v (tracebacks)
        elif name in DEFAULT_NEGATIONS:
            pos = "--" + name[len("--no-"):]
            out = [t for t in out if t != pos]
        elif name.startswith("-") and name in MK_VALUE_FLAGS + MK_SWITCHES and name not in ours:
            mk_only.append(name)
            i += 2 if takes else 1
            continue
        else:
            if name.startswith("-") and name not in MK_VALUE_FLAGS + MK_SWITCHES and name in ours:
                ours_only.append(name)
            out.append(tok)
            if takes and i + 1 < len(argv):
                out.append(argv[i + 1])
                i += 1
        i += 1
    return out, mk_only, ours_only


def mergekit_available() -> bool:
    """mergekit importable here (its own entry can run) and the hand-over not switched off."""
    if os.environ.get(ENV_OFF, "").strip() not in ("", "0"):
        return False
    try:
        return importlib.util.find_spec("mergekit") is not None
    except (ImportError, ValueError):
        return False


def run_mergekit(argv: Sequence[str]) -> int:
    """mergekit's own ``mergekit-yaml`` in this process, with this argv; its exit code."""
    try:
        from mergekit.scripts.run_yaml import main as mk_main
    except Exception as e:  # noqa: BLE001 (a broken mergekit install: one line)
        print(f"mergekit-yaml: error: mergekit's entry (mergekit.scripts.run_yaml:main) could not be imported: "
              f"{type(e).__name__}: {e}", file=sys.stderr)
        return 2
    saved = sys.argv
    sys.argv = ["mergekit-yaml", *argv]
    try:
        rc = mk_main()
    except SystemExit as e:
        rc = e.code
    finally:
        sys.argv = saved
    if rc is None or isinstance(rc, int):
        return int(rc or 0)
    print(rc, file=sys.stderr)
    return 1


def _hand_over(argv: Sequence[str], why: str) -> int:
    print(f"mergekit-yaml: {why}; handing the run to mergekit's own mergekit-yaml ({ENV_OFF}=1 turns this off)",
          file=sys.stderr)
    return run_mergekit(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .cli import build_parser, main as cli_main
    from .cli_common import EXIT_USAGE, error
    from .spec import MergekitOnly

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("inspect", "help", "sweep"):
        return cli_main(argv)
    ours = list(build_parser()._option_string_actions)
    mine, mk_only, ours_only = classify(argv, ours)
    if mk_only:
        flags = ", ".join(mk_only)
        if not ours_only and mergekit_available():
            return _hand_over(argv, f"{flags}: mergekit's flag, not supported by ame-merge")
        why = (f"with ame-merge's {', '.join(ours_only)}" if ours_only else
               f"mergekit is not importable here, or {ENV_OFF} is set")
        error(f"{flags}: mergekit-yaml's flag is not supported by ame-merge (not handed to mergekit: {why})")
        return EXIT_USAGE
    try:
        return cli_main(mine, raise_mergekit_only=True)
    except MergekitOnly as e:  # raised before anything was written (cli._run)
        if not ours_only and mergekit_available():
            return _hand_over(argv, f"not supported by ame-merge: {e}")
        why = f" (not handed to mergekit: with ame-merge's {', '.join(ours_only)})" if ours_only and mergekit_available() else ""
        error(f"{e}{why}")
        return EXIT_USAGE
