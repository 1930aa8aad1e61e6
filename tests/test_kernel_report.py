"""The GPU kernels' machine code, checked without a GPU (ame_kernels/kernel_report.py).

Triton: every kernel variant (optimizer x input dtype kind x options, aligned or not,
and the whole-run kernel under every autotune config) is compiled ahead of time for
sm_80 and sm_90 with the ptxas Triton ships; a compile error fails here, in CI, instead
of on a user's GPU. CUDA C++: the built ``_C_cuda`` is read with cuobjdump.

Beyond compiling, the tests hold the property a memory-bound kernel needs: its hot
loads and stores are 16-byte vectors, and nothing spills to local memory. The negative
controls (unaligned variants do use 2-byte loads) show the checks can fail.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from ame_kernels.config import OPTIMIZERS

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = (80, 90)
OPTS = OPTIMIZERS


def _report(*args) -> list:
    """Run the report in a child without TRITON_INTERPRET (it fixes compile vs interpret at import)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "ame_kernels.kernel_report", "--json", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"kernel_report {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


def _triton_tool_missing() -> bool:
    # find_spec, not import: importing triton here would fix interpreter mode for the
    # test modules collected after this one.
    root = importlib.util.find_spec("triton").submodule_search_locations[0]
    return not os.path.exists(os.path.join(root, "backends", "nvidia", "bin", "cuobjdump"))


@pytest.fixture(scope="module")
def triton_rows():
    if _triton_tool_missing():
        pytest.skip("this triton install ships no NVIDIA tools (ptxas/cuobjdump)")
    return _report("--only", "triton")


def _variant(row) -> dict:
    return dict(kv.split("=") for kv in row["variant"].split(","))


def _loads(row, prefix) -> int:
    return sum(v for k, v in row["loads"].items() if k.startswith(prefix))


def test_every_triton_variant_compiles_for_sm80_and_sm90(triton_rows):
    for kernel in ("_whole_run_kernel", "_step_kernel"):
        for arch in ARCHS:
            seen = {(v["OPT"], v["IN_KIND"]) for v in (_variant(r) for r in triton_rows
                                                        if r["kernel"] == kernel and r["arch"] == arch)}
            assert seen == {(str(o), str(k)) for o in range(len(OPTS)) for k in range(4)}, (kernel, arch, seen)
    for arch in ARCHS:
        kinds = {_variant(r)["IN_KIND"] for r in triton_rows if r["kernel"] == "_weighted_sum_kernel" and r["arch"] == arch}
        assert kinds == {"0", "1", "2", "3"}


def test_triton_kernels_do_not_spill(triton_rows):
    for r in triton_rows:
        assert r["local"] == 0, f"{r['kernel']} sm_{r['arch']} uses local memory: {r['variant']}"
        # a few bytes of stack frame are ptxas' choice, not register pressure
        assert r["stack"] <= 16, f"{r['kernel']} sm_{r['arch']} spills {r['stack']} B: {r['variant']}"
        assert r["regs"] <= 128, f"{r['kernel']} sm_{r['arch']} needs {r['regs']} registers: {r['variant']}"


def test_aligned_16bit_inputs_are_read_as_16_byte_vectors(triton_rows):
    checked = 0
    for r in triton_rows:
        v = _variant(r)
        if v.get("ALIGNED") != "1" or r["in_type"] not in ("bf16", "fp16"):
            continue
        assert _loads(r, "ld.global.b16") == 0, f"scalar 2-byte loads in {r['kernel']} sm_{r['arch']}: {r['variant']}"
        assert _loads(r, "ld.global.v4") >= 1, f"no 16-byte loads in {r['kernel']} sm_{r['arch']}: {r['variant']}"
        checked += 1
    assert checked >= 20


def test_unaligned_16bit_inputs_fall_back_to_scalar_loads(triton_rows):
    """Negative control: without the host's alignment promise the same loads are 2-byte ones."""
    rows = [r for r in triton_rows if _variant(r).get("ALIGNED") == "0" and r["in_type"] in ("bf16", "fp16")]
    assert rows
    for r in rows:
        assert _loads(r, "ld.global.b16") > 0, r["variant"]


def test_outputs_and_state_are_written_as_16_byte_vectors(triton_rows):
    for r in triton_rows:
        stores = r["stores"]
        assert stores and all(k.startswith("st.global.v4") for k in stores), \
            f"{r['kernel']} sm_{r['arch']} stores {stores}: {r['variant']}"


def test_every_autotune_config_reads_whole_vectors(triton_rows):
    """bf16 Adam under each GPU autotune config: 8+ elements per thread, so 16-byte loads."""
    configs = [r for r in triton_rows if r["kernel"] == "_whole_run_kernel" and _variant(r)["OPT"] == "2"
               and _variant(r)["IN_KIND"] == "1" and _variant(r)["SOUP"] == "1"]
    assert len({(_variant(r)["BLOCK"], _variant(r)["warps"]) for r in configs}) >= 4
    for r in configs:
        assert _loads(r, "ld.global.b16") == 0 and _loads(r, "ld.global.v2") == 0, r["variant"]


def test_size_argument_is_widened_before_any_index_math(triton_rows):
    """C arrives as an i32 below 2^31 elements; any 32-bit arithmetic on it (``2 * C`` addressing
    the third state slot, say) overflows for large buffers. The PTX may only widen or compare it."""
    steps = [r for r in triton_rows if r["kernel"] == "_step_kernel" and _variant(r)["SLOTS"] == "3"]
    assert steps, "no 3-slot step variant: the check below would see no multi-slot addressing"
    for r in triton_rows:
        assert r["c_narrow_ops"] == [], f"{r['kernel']} sm_{r['arch']} {r['c_narrow_ops']} on C: {r['variant']}"


def test_triton_combine_variants_compile_and_read_whole_vectors(triton_rows):
    """The combine kernel (backends/triton/combine.py): every input kind x elect mode compiles for
    both archs; aligned 16-bit inputs are 16-byte loads (the generic checks above cover spills, stores
    and the size argument for these rows too), and the unaligned control falls back to 2-byte loads."""
    rows = [r for r in triton_rows if r["kernel"] == "_combine_kernel"]
    for arch in ARCHS:
        seen = {(v["IN_KIND"], v["ELECT"]) for v in (_variant(r) for r in rows if r["arch"] == arch)}
        assert seen == {(str(k), str(e)) for k in range(4) for e in range(3)}, (arch, seen)
    aligned16 = [r for r in rows if _variant(r)["ALIGNED"] == "1" and r["in_type"] in ("bf16", "fp16")]
    assert len(aligned16) >= 12
    for r in aligned16:
        assert _loads(r, "ld.global.b16") == 0 and _loads(r, "ld.global.v4") >= 1, r["variant"]
    unaligned = [r for r in rows if _variant(r)["ALIGNED"] == "0"]
    assert unaligned and all(_loads(r, "ld.global.b16") > 0 for r in unaligned)


# --- CUDA C++ -------------------------------------------------------------------------

def _cuda_module_built() -> bool:
    import glob

    return bool(glob.glob(os.path.join(ROOT, "ame_kernels", "_C_cuda*.so")))


@pytest.fixture(scope="module")
def cuda_rows():
    if not _cuda_module_built():
        pytest.skip("_C_cuda is not built (no nvcc at build time)")
    if _triton_tool_missing():
        pytest.skip("cuobjdump comes from the triton install, which ships none here")
    return _report("--only", "cuda")


def _concrete(row) -> bool:
    """A kernel over one input dtype (not the run-time Mixed dispatch)."""
    return row["kernel"].endswith(("whole_run_kernel", "step_kernel", "weighted_sum_kernel", "combine_kernel")) \
        and "Mixed" not in row["variant"]


def test_cuda_kernels_are_built_for_sm80_and_sm90(cuda_rows):
    for arch in ARCHS:
        names = {r["kernel"] for r in cuda_rows if r["arch"] == arch}
        assert any(n.endswith("whole_run_kernel") for n in names), names
        assert any(n.endswith("step_kernel") for n in names), names


def test_cuda_kernels_use_16_byte_loads_and_stores(cuda_rows):
    rows = [r for r in cuda_rows if _concrete(r)]
    assert rows
    for r in rows:
        assert any(k.startswith("LDG.E.128") for k in r["loads"]), f"no 16-byte loads: {r['variant']} sm_{r['arch']}"
        assert any(k.startswith("STG.E.128") for k in r["stores"]), f"no 16-byte stores: {r['variant']} sm_{r['arch']}"


def test_cuda_kernels_do_not_use_local_memory(cuda_rows):
    for r in cuda_rows:
        assert r["local"] == 0, f"{r['variant']} sm_{r['arch']}"


def test_cuda_combine_kernel_variants_are_built(cuda_rows):
    """csrc/cuda/combine.cu: TIn (3 dtypes + Mixed) x TOut x (elect none, elect sum/count) per arch, and
    the transform pass (split: fp32 outputs) per TIn x elect, 16-byte loads and stores in each (the
    concrete ones are also in the checks above), no local memory."""
    for arch in ARCHS:
        rows = [r for r in cuda_rows if r["arch"] == arch and r["kernel"].endswith("combine_kernel")]
        assert len(rows) == 4 * 3 * 2 + 4 * 2, (arch, [r["variant"] for r in rows])
        split = [r for r in rows if r["variant"].replace(" ", "").endswith(",true>(ame::cuda::CombineArgs,bool)")]
        assert len(split) == 4 * 2 and all(", float," in r["variant"] for r in split), [r["variant"] for r in split]
        for r in rows:
            assert any(k.startswith("LDG.E.128") for k in r["loads"]), r["variant"]
            assert any(k.startswith("STG.E.128") for k in r["stores"]), r["variant"]
            # the split variants may keep one 64-bit value in an 8-byte frame across the IEEE
            # division's slow-path CALL (fp16 inputs, elect none: STL/LDL beside the CALL, no local
            # memory); the combine variants keep none
            assert r["local"] == 0 and r["stack"] <= (8 if r in split else 0), r["variant"]
