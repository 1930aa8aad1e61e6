"""Which backends the tests can run on CPU tensors here, with a reason for each one left out."""

import os

import pytest

import ame_kernels as ak


def cpu_backends() -> list:
    """pytest params for every backend that takes CPU tensors here (skipped with a reason otherwise)."""
    params = []
    for name, (ok, why) in ak.available_backends().items():
        if name == "cuda":
            continue  # GPU only: tests/test_cuda.py
        if name == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
            params.append(pytest.param(name, marks=pytest.mark.skip(reason="triton on CPU needs TRITON_INTERPRET=1 (tests/test_triton.py runs it)")))
            continue
        marks = [] if ok else [pytest.mark.skip(reason=f"backend {name} unavailable: {why}")]
        params.append(pytest.param(name, marks=marks))
    return params
