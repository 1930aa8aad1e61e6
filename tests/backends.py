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


# Every optimizer and option of the semantics (DESIGN 1.5), for backend parity tests; small
# lr so runs stay well conditioned.
OPTIMIZER_VARIANTS = {
    "sgd": dict(optimizer="sgd"),
    "sgd_momentum_nesterov_wd": dict(optimizer="sgd", lr=0.5, momentum=0.9, nesterov=True, weight_decay=0.1),
    "sgd_momentum_dampening": dict(optimizer="sgd", lr=0.5, momentum=0.5, dampening=0.3),
    "adagrad_decay_init_wd": dict(optimizer="adagrad", lr=0.1, lr_decay=0.05, initial_accumulator_value=0.1,
                                  weight_decay=0.05),
    "adagrad_eps_inside": dict(optimizer="adagrad", lr=0.1, eps=1e-3, eps_inside_sqrt=True),
    "adam": dict(optimizer="adam", lr=0.01),
    "adam_amsgrad_wd": dict(optimizer="adam", lr=0.01, amsgrad=True, weight_decay=0.1, betas=(0.8, 0.99)),
    "adam_eps_inside": dict(optimizer="adam", lr=0.01, eps=1e-4, eps_inside_sqrt=True),
    "adamw_wd": dict(optimizer="adamw", lr=0.01, weight_decay=0.1),
    "adamw_amsgrad_eps_inside": dict(optimizer="adamw", lr=0.01, weight_decay=0.05, amsgrad=True, eps=1e-4,
                                     eps_inside_sqrt=True),
    "adadelta_wd": dict(optimizer="adadelta", lr=1.0, rho=0.8, weight_decay=0.05),
}
