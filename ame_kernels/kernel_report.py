"""Static report on the GPU kernels, made without a GPU: registers, spills, access widths.

The Triton kernels are compiled ahead of time for a chosen NVIDIA architecture
(``triton.compile`` with a ``GPUTarget``: Triton ships its own ptxas, so no driver or
device is needed), the CUDA C++ kernels are read from the built ``_C_cuda`` module
with ``cuobjdump`` (also shipped with Triton). For every kernel variant the report
gives the registers and stack/spill bytes per thread and the widths of its global
loads and stores, which is what decides whether a memory-bound kernel can reach the
copy bandwidth: a bf16 stream read with 2-byte loads issues eight times the load
instructions of one read with 16-byte loads.

It is how CI checks, on a machine without a GPU, that every Triton variant compiles
for sm_80 and sm_90 and that the hot loads and stores are 16-byte vectors
(tests/test_kernel_report.py). Run ``python -m ame_kernels.kernel_report`` for the
table; ``--json`` for machine-readable output.

Triton decides at import whether it interprets (TRITON_INTERPRET): run this in a
process where it is unset, as the tests do.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Optional

_IN_TYPES = {0: "fp32", 1: "bf16", 2: "fp16", 3: "mixed"}
_OPTS = {0: "sgd", 1: "adagrad", 2: "adam", 3: "adamw", 4: "adadelta"}


@dataclass
class Variant:
    """One compiled kernel and what its machine code says."""

    kernel: str
    variant: str
    arch: int
    regs: int
    stack: int  # bytes of per-thread stack frame (spills land here)
    local: int  # bytes of per-thread local memory
    loads: dict = field(default_factory=dict)  # instruction -> count, global loads
    stores: dict = field(default_factory=dict)
    aligned: Optional[bool] = None
    in_type: Optional[str] = None
    # 32-bit integer instructions that take the i32 size argument C as an operand (Triton
    # only): an index or address built from C in 32 bits overflows once it passes 2^31,
    # e.g. ``2 * C`` for a [3, C] state buffer of C >= 2^30 elements. Empty when C is only
    # widened to 64 bits or compared.
    c_narrow_ops: Optional[list] = field(default_factory=list)


def _triton_tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} is not shipped with this triton install ({path})")
    return path


def _resource_usage(cubin: bytes, tmpdir: str) -> dict:
    """{function name: (regs, stack, local)} from ``cuobjdump --dump-resource-usage``."""
    path = os.path.join(tmpdir, "k.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    return _parse_resource_usage(subprocess.run([_triton_tool("cuobjdump"), "--dump-resource-usage", path],
                                                capture_output=True, text=True, check=True).stdout)


def _parse_resource_usage(text: str) -> dict:
    out, arch, name = {}, None, None
    for line in text.splitlines():
        m = re.match(r"\s*arch = sm_(\d+)", line)
        if m:
            arch = int(m.group(1))
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", line)
        if m and name is not None:
            out[(arch, name)] = tuple(int(v) for v in m.groups())
            name = None
    return out


# Instructions that may take a 32-bit C: widening to 64 bits, wide multiplies, compares.
_C_SAFE_OPS = re.compile(r"^(cvt\.[su]64\.[su]32|(mul|mad)\.wide\.[su]32|setp\.)")


def _ptx_narrow_uses(ptx: str, kernel: str, param_index: int) -> Optional[list]:
    """Opcodes of the PTX instructions that read the u32 kernel parameter ``param_index``
    other than through ``_C_SAFE_OPS`` (see ``Variant.c_narrow_ops``)."""
    m = re.search(rf"ld\.param\.[bsu]32\s+(%rd?\d+),\s*\[{re.escape(kernel)}_param_{param_index}\]", ptx)
    if m is None:
        return None  # not found: the test fails rather than pass on a parse miss
    if m.group(1).startswith("%rd"):
        return []  # sign-extended into a 64-bit register as it is loaded
    reg = re.escape(m.group(1))
    ops = []
    for line in ptx.splitlines():
        line = line.strip()
        if line.startswith("ld.param") or not re.search(rf"{reg}(?![\d])", line):
            continue
        op = line.split()[0].lstrip("@%p0123456789 ")
        if not _C_SAFE_OPS.match(op):
            ops.append(op)
    return ops


def _ptx_accesses(ptx: str) -> tuple:
    ops = Counter(re.findall(r"\b((?:ld|st)\.global[\w.]*)", ptx))
    loads = {k: v for k, v in ops.items() if k.startswith("ld.")}
    stores = {k: v for k, v in ops.items() if k.startswith("st.")}
    return loads, stores


# --- Triton ---------------------------------------------------------------------------

# Runtime (non-constexpr) arguments of each kernel and their Triton signature types.
# Pointers to the pivot/out take the variant's dtype ("{pivot}", "{out}").
_TRITON_ARGS = {
    "_whole_run_kernel": dict(
        table="*i64", codes="*i32", pivot_ptr="*{pivot}", out_ptr="*{out}", coeffs_ptr="*fp32",
        batch_ptr="*i32", batch_idx="*i32", flags_ptr="*i32", C="i32", N="i32", T="i32", C_LOG2="i32"),
    "_weighted_sum_kernel": dict(
        table="*i64", codes="*i32", pivot_ptr="*{pivot}", out_ptr="*{out}", weights_ptr="*fp32",
        flags_ptr="*i32", C="i32", N="i32", C_LOG2="i32"),
    "_step_kernel": dict(
        w_ptr="*fp32", state_ptr="*fp32", table="*i64", codes="*i32", pivot_ptr="*fp32",
        C="i32", M="i32", first="i32", zscale="fp32", lr_eff="fp32", decay="fp32", inv_bc2_sqrt="fp32"),
    "_combine_kernel": dict(
        table="*i64", codes="*i32", base_ptr="*{base}", out_ptr="*{out}", fparams="*fp32", iparams="*i64",
        ptable="*i64", otable="*i64", C="i32", N="i32", C_LOG2="i32", offset="i64", k0_arg="i64", k1_arg="i64",
        div_none="fp32", lam="fp32"),
}
_DIVISIBLE = ("C",)  # sizes specialised as multiples of 16, as Triton's JIT does for such values


def _triton_variants() -> list:
    """(kernel name, constexprs, dtypes, (BLOCK, num_warps)) covering every optimizer x input
    kind x option, each option on and off at least once, aligned and not."""
    out = []
    flag_sets = [
        dict(SOUP=True, ADAPTIVE=True, HAS_WD=False, MOMENTUM=False, NESTEROV=False, AMSGRAD=False,
             EPS_INSIDE_SQRT=False, CHECK_FINITE=False),
        dict(SOUP=False, ADAPTIVE=False, HAS_WD=True, MOMENTUM=True, NESTEROV=True, AMSGRAD=True,
             EPS_INSIDE_SQRT=True, CHECK_FINITE=True),
    ]
    outs = ["bf16", "fp32", "fp16"]
    for opt in _OPTS:
        for kind in _IN_TYPES:
            for k, flags in enumerate(flag_sets):
                aligned = k == 0 or kind == 1
                dt = dict(out=outs[(opt + kind + k) % 3], pivot=outs[(opt + kind) % 3])
                out.append(("_whole_run_kernel", dict(OPT=opt, IN_KIND=kind, ALIGNED=aligned, **flags), dt, (1024, 4)))
            out.append(("_step_kernel", dict(OPT=opt, IN_KIND=kind, ADAPTIVE=kind % 2 == 0, SLOTS=min(opt, 3),
                                              HAS_WD=kind == 1, MOMENTUM=kind > 1, NESTEROV=kind == 3,
                                              AMSGRAD=kind == 2, EPS_INSIDE_SQRT=kind == 3, ALIGNED=kind != 3),
                        {}, (1024, 4)))
    for kind in _IN_TYPES:
        for pivot in (False, True):
            out.append(("_weighted_sum_kernel", dict(IN_KIND=kind, PIVOT=pivot, CHECK_FINITE=pivot, ALIGNED=True),
                        dict(out=outs[kind % 3], pivot=outs[(kind + 1) % 3]), (1024, 4)))
    out += _combine_variants()
    return out


def _combine_variants() -> list:
    """The combine kernel (backends/triton/combine.py): every input kind x elect mode, each
    option (base, probs table, random draws, normalize, inv_prob) on and off at least once,
    aligned and not (unaligned only for bf16, the negative control)."""
    outs = ["bf16", "fp32", "fp16"]
    out = []
    for kind in _IN_TYPES:
        for elect in (0, 1, 2):
            k = kind + elect
            consts = dict(IN_KIND=kind, HAS_BASE=k % 3 != 2, HAS_PROBS=k % 2 == 1, RANDOM=k % 4 != 0,
                          ELECT=elect, NORMALIZE=elect != 1 or kind == 0, INV_PROB=k % 2 == 0, ALIGNED=True,
                          SPLIT=False)
            out.append(("_combine_kernel", consts, dict(out=outs[k % 3], base=outs[(k + 1) % 3]), (1024, 4)))
    # the heaviest variant (every option on, mixed inputs, elect count): the register ceiling
    out.append(("_combine_kernel", dict(IN_KIND=3, HAS_BASE=True, HAS_PROBS=True, RANDOM=True, ELECT=2,
                                        NORMALIZE=True, INV_PROB=True, ALIGNED=True, SPLIT=False),
                dict(out="bf16", base="bf16"), (1024, 4)))
    out.append(("_combine_kernel", dict(IN_KIND=1, HAS_BASE=True, HAS_PROBS=True, RANDOM=True, ELECT=1,
                                        NORMALIZE=True, INV_PROB=True, ALIGNED=False, SPLIT=False),
                dict(out="bf16", base="bf16"), (1024, 4)))
    # the transform pass (SPLIT: each ingredient's fp32 output), without and with an election
    for elect in (0, 1):
        out.append(("_combine_kernel", dict(IN_KIND=1, HAS_BASE=True, HAS_PROBS=elect == 1, RANDOM=True,
                                            ELECT=elect, NORMALIZE=False, INV_PROB=elect == 0, ALIGNED=True,
                                            SPLIT=True),
                    dict(out="fp32", base="bf16"), (1024, 4)))
    return out


def _compile_triton(kernel_name: str, consts: dict, dtypes: dict, block_warps: tuple, arch: int, tmpdir: str):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .backends.triton import combine, step, whole_run

    fn = getattr(whole_run, kernel_name, None) or getattr(step, kernel_name, None) or getattr(combine, kernel_name)
    while not isinstance(fn, triton.runtime.JITFunction):
        fn = fn.fn  # autotuned kernels wrap the JITFunction
    types = _TRITON_ARGS[kernel_name]
    block, warps = block_warps
    consts = dict(consts, BLOCK=block)
    sig, attrs, constexprs = {}, {}, {}
    for idx, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            constexprs[(idx,)] = consts[name]
        elif name in types:
            sig[name] = types[name].format(**dtypes)
            if sig[name].startswith("*") or name in _DIVISIBLE:
                attrs[(idx,)] = [["tt.divisibility", 16]]
        elif name.startswith("h_"):
            sig[name] = "fp32"
        else:
            raise KeyError(f"kernel_report: {kernel_name} argument {name!r} has no type in _TRITON_ARGS")
    missing = set(consts) - set(fn.arg_names)
    if missing:
        raise KeyError(f"kernel_report: {kernel_name} has no argument(s) {sorted(missing)}")
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=warps, enable_fp_fusion=getattr(
                                  combine if kernel_name == "_combine_kernel" else whole_run, "FP_FUSION")))
    usage = _resource_usage(compiled.asm["cubin"], tmpdir)
    regs, stack, local = next(iter(usage.values()))
    ptx = compiled.asm["ptx"]
    loads, stores = _ptx_accesses(ptx)
    runtime_args = [n for n in fn.arg_names if sig[n] != "constexpr"]
    c_narrow = _ptx_narrow_uses(ptx, kernel_name, runtime_args.index("C"))
    shown = {k: v for k, v in consts.items() if k not in ("BLOCK",)}
    label = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in shown.items())
    label += "".join(f",{k}={v}" for k, v in dtypes.items()) + f",BLOCK={block},warps={warps}"
    return Variant(kernel_name, label, arch, regs, stack, local, loads, stores,
                   aligned=bool(consts.get("ALIGNED")), in_type=_IN_TYPES.get(consts.get("IN_KIND")),
                   c_narrow_ops=c_narrow)


def triton_report(archs=(80, 90), configs: bool = True) -> list:
    """Compile every variant of ``_triton_variants`` for each arch; with ``configs``, also
    the bf16 Adam whole-run kernel under every autotune config of the GPU."""
    import tempfile

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("kernel_report: TRITON_INTERPRET=1 is set; the report compiles for a GPU target")
    from .backends.triton import whole_run

    variants = _triton_variants()
    if configs:
        base = dict(OPT=2, IN_KIND=1, ALIGNED=True, SOUP=True, ADAPTIVE=True, HAS_WD=False, MOMENTUM=False,
                    NESTEROV=False, AMSGRAD=False, EPS_INSIDE_SQRT=False, CHECK_FINITE=False)
        for block_warps in whole_run.GPU_CONFIGS:
            variants.append(("_whole_run_kernel", base, dict(out="bf16", pivot="bf16"), block_warps))
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            for name, consts, dtypes, bw in variants:
                out.append(_compile_triton(name, consts, dtypes, bw, arch, tmp))
    return out


# --- CUDA C++ -------------------------------------------------------------------------

def _cuda_module_path() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    paths = sorted(glob.glob(os.path.join(here, "_C_cuda*.so")))
    if not paths:
        raise FileNotFoundError("kernel_report: ame_kernels/_C_cuda*.so is not built (make build with nvcc)")
    return paths[0]


def _demangle(names) -> dict:
    names = list(names)
    try:
        text = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        return dict(zip(names, text.splitlines()))
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in names}


def cuda_report(path: Optional[str] = None, archs=(80, 90)) -> list:
    """Every kernel of the built ``_C_cuda``: resource usage and SASS global access widths."""
    path = path or _cuda_module_path()
    cuobjdump = _triton_tool("cuobjdump")
    usage = _parse_resource_usage(subprocess.run([cuobjdump, "--dump-resource-usage", path],
                                                 capture_output=True, text=True, check=True).stdout)
    sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout
    ops: dict = {}
    arch, name = None, None
    for line in sass.splitlines():
        m = re.match(r"\s*arch = sm_(\d+)", line)
        if m:
            arch = int(m.group(1))
            continue
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            name = m.group(1)
            ops.setdefault((arch, name), Counter())
            continue
        if name is not None:
            for op in re.findall(r"\b((?:LDG|STG)\.E[\w.]*)", line):
                ops[(arch, name)][op] += 1
    names = _demangle({n for _, n in usage})
    out = []
    for (a, n), (regs, stack, local) in sorted(usage.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1])):
        if a not in archs:
            continue
        counts = ops.get((a, n), Counter())
        loads = {k: v for k, v in counts.items() if k.startswith("LDG")}
        stores = {k: v for k, v in counts.items() if k.startswith("STG")}
        pretty = names.get(n, n)
        kernel = pretty.split("<")[0].replace("void ", "").split("(")[0]
        out.append(Variant(kernel, pretty, a, regs, stack, local, loads, stores))
    return out


# --- table ----------------------------------------------------------------------------

def _widths(acc: dict) -> str:
    return " ".join(f"{k}x{v}" for k, v in sorted(acc.items()))


def format_table(rows: list) -> str:
    lines = ["| kernel | arch | regs | stack B | local B | global loads | global stores | variant |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.kernel} | sm_{r.arch} | {r.regs} | {r.stack} | {r.local} | {_widths(r.loads)} | "
                     f"{_widths(r.stores)} | {r.variant} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ame_kernels.kernel_report", description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, action="append", help="sm version(s), default 80 and 90")
    ap.add_argument("--only", choices=["triton", "cuda"], help="one backend")
    ap.add_argument("--no-configs", action="store_true", help="skip the autotune-config sweep")
    ap.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = ap.parse_args(argv)
    archs = tuple(args.arch or (80, 90))
    rows = []
    if args.only in (None, "triton"):
        rows += triton_report(archs, configs=not args.no_configs)
    if args.only in (None, "cuda"):
        rows += cuda_report(archs=archs)
    if args.json:
        json.dump([asdict(r) for r in rows], sys.stdout)
    else:
        import triton

        print(f"# kernel_report: triton {triton.__version__}, sm {', '.join(map(str, archs))}; "
              f"{len(rows)} kernels (regs and stack/local bytes per thread; global access instructions x count)\n")
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
