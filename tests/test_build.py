"""The native extension exists and reports what it was built with; the package imports without it."""

import subprocess
import sys

import ame_kernels as ak


def test_build_info_reports_compiler_and_simd():
    info = ak.build_info()
    assert info["native"], info.get("reason")
    assert info["compiler"]
    assert "scalar" in info["simd_supported"]
    assert info["simd_best"] in info["simd_supported"]
    assert isinstance(info["cuda_compiled"], bool)


def test_package_imports_without_extension():
    """With _C hidden, import still works, the reference backend still merges, and the reason is given."""
    code = (
        "import sys, builtins\n"
        "real = builtins.__import__\n"
        "def fake(name, *a, **k):\n"
        "    if name.startswith('ame_kernels._C') or (a and a[2] and '_C' in a[2] and name == ''):\n"
        "        raise ImportError('hidden for the test')\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = fake\n"
        "import importlib\n"
        "_imp = importlib.import_module\n"
        "def imp(name, *a, **k):\n"
        "    if name.startswith('ame_kernels._C'): raise ImportError('hidden for the test')\n"
        "    return _imp(name, *a, **k)\n"
        "importlib.import_module = imp\n"
        "import torch, ame_kernels as ak\n"
        "info = ak.build_info(); assert not info['native'] and 'make build' in info['reason'], info\n"
        "print(ak.merge([torch.ones(2), torch.zeros(2)], backend='reference'))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "tensor" in r.stdout


def test_make_build_stamp_predates_the_build(tmp_path):
    """A prerequisite changed while `make build` runs is newer than the stamp, so the next `make build`
    rebuilds. The build is a stand-in PY that edits the (redirected) install stamp, a prerequisite."""
    import os
    import shutil

    import pytest

    make = shutil.which("make")
    if make is None:
        pytest.skip("no make here")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    installed, built = tmp_path / "installed", tmp_path / "built"
    installed.touch()
    fake_py = tmp_path / "py"
    fake_py.write_text(f"#!/bin/sh\nsleep 0.05\ntouch {installed}\nsleep 0.05\n")  # an edit in mid-build
    fake_py.chmod(0o755)
    args = [make, "-C", repo, f"PY={fake_py}", f"STAMP={installed}", f"BUILD_STAMP={built}"]
    r = subprocess.run(args + ["build"], capture_output=True, text=True)
    assert r.returncode == 0 and built.exists() and not (tmp_path / "built.tmp").exists(), r.stdout + r.stderr
    assert os.stat(built).st_mtime_ns < os.stat(installed).st_mtime_ns
    r = subprocess.run(args + ["-q", "build"], capture_output=True, text=True)
    assert r.returncode == 1, "make build thinks the build is up to date after a mid-build edit"
