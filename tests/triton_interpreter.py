"""How the Triton test files run their kernels without a GPU, in one place.

Triton reads TRITON_INTERPRET when it is imported and when a kernel is decorated, and a few
helpers check it again while running. So, without CUDA, a Triton test file sets the variable
only while it imports its kernel modules (``import_kernels``) and while its tests run (the
autouse fixtures of ``module_fixtures``), and restores it afterwards, so that test modules
collected after it do not see it. Where triton was already imported in this process without
the interpreter (``too_late()`` at the file's import: too late to switch), the file's tests
skip and its ``test_interpreter_in_subprocess`` reruns the file in a child process with the
variable set (``rerun_in_child``).
"""

import contextlib
import importlib
import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
INTERPRET = not CUDA  # the kernels run under the interpreter, on CPU tensors


def too_late() -> bool:
    """Whether triton was imported in this process without the interpreter (asked by a test
    file at its import, before it imports any kernel)."""
    return INTERPRET and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"


@contextlib.contextmanager
def interpreted(on: bool = True):
    """TRITON_INTERPRET=1 inside the block when ``on``; the variable as it was afterwards."""
    saved = os.environ.get("TRITON_INTERPRET")
    if on:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if on:
            if saved is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = saved


def import_kernels(names, late: bool) -> dict:
    """{name: ame_kernels.backends.triton.<name>}, imported under the interpreter without CUDA;
    empty when it is too late to switch (the file's tests then run in a child)."""
    mods = {}
    if not late:
        with interpreted(INTERPRET):
            for name in names:
                mods[name] = importlib.import_module(f"ame_kernels.backends.triton.{name}")
    return mods


def module_fixtures(late: bool):
    """A Triton test file's two autouse fixtures: the interpreter set while its tests run, and
    every test but ``test_interpreter_in_subprocess`` skipped when it is too late. Bind both
    names in the test module (pytest collects fixtures from its namespace)."""

    @pytest.fixture(scope="module", autouse=True)
    def _interpreter():
        with interpreted(INTERPRET and not late):
            yield

    @pytest.fixture(autouse=True)
    def _in_process(request):
        if late and request.node.originalname != "test_interpreter_in_subprocess":
            pytest.skip("triton was imported before TRITON_INTERPRET could be set; "
                        "test_interpreter_in_subprocess runs this file")

    return _interpreter, _in_process


def rerun_in_child(path: str, *pytest_args: str) -> None:
    """The test file at ``path`` (with ``pytest_args``) in a fresh interpreter process with
    TRITON_INTERPRET=1, from the repository root; fails with the child's output."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args, path],
                          env=env, capture_output=True, text=True, cwd=root)
    assert proc.returncode == 0, (f"{path} {' '.join(pytest_args)} under TRITON_INTERPRET=1 failed:\n"
                                  f"{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}")
