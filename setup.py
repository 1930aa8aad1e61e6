"""Drives CMake to build ame_kernels._C (and _C_cuda where CUDA can run).

Environment switches (printed when used):
  AME_SKIP_NATIVE=1     pure Python install (reference and Triton backends only)
  AME_BUILD_CUDA=auto|0|1   build the CUDA module. auto (default): only where it can run,
                        i.e. a CUDA build of torch is installed or an NVIDIA driver is
                        visible, and nvcc is found; 1: always (an error without nvcc;
                        `make build`/`make test` and CI's compile check use it where
                        nvcc exists); 0: never. The CUDA module adds minutes to a build.
  AME_CUDA_ARCHS="80;90"    CUDA architectures
  AME_BUILD_JOBS=N      parallel compile jobs (default: cores)
  CMAKE_ARGS            passed through to CMake
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _torch_cuda_version(python=None):
    """The CUDA version the installed torch was built with ('12.8'), or None (no torch, a CPU build).

    Read from torch/version.py without importing torch. The lookup runs in ``python -I`` (isolated
    mode ignores PYTHONPATH), so under pip's build isolation it sees the environment being
    installed into, not the temporary build environment (which has no torch)."""
    try:
        out = subprocess.run(
            [python or sys.executable, "-I", "-c",
             "import importlib.util as u; s = u.find_spec('torch'); print(s.origin if s else '')"],
            capture_output=True, text=True, timeout=60,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out:
        return None
    try:
        return parse_torch_cuda((Path(out).parent / "version.py").read_text())
    except OSError:
        return None


def parse_torch_cuda(version_py):
    """torch/version.py's ``cuda: Optional[str] = '12.8'`` -> '12.8'; a CPU build's ``= None`` -> None."""
    m = re.search(r"^cuda\b[^=\n]*=\s*['\"]([^'\"]+)['\"]", version_py, re.M)
    return m.group(1) if m else None


def _nvidia_driver(root="/"):
    """What shows an NVIDIA driver on this machine (a path), or None."""
    for p in ("proc/driver/nvidia/version", "dev/nvidiactl", "dev/nvidia0"):
        if os.path.exists(os.path.join(root, p)):
            return "/" + p
    smi = shutil.which("nvidia-smi")
    return smi


def cuda_build_decision(env=None, torch_cuda=None, driver=None):
    """(CMake's AME_BUILD_CUDA value 'ON' | 'OFF', the reason printed with it).

    env: the AME_BUILD_CUDA setting ('auto' when unset). torch_cuda / driver: what
    _torch_cuda_version() and _nvidia_driver() found (passed in by the tests)."""
    value = (env or "auto").strip().lower()
    if value in ("1", "on", "yes", "true"):
        return "ON", "AME_BUILD_CUDA=1: the CUDA module is built (nvcc required)"
    if value in ("0", "off", "no", "false"):
        return "OFF", "AME_BUILD_CUDA=0: no CUDA module"
    if value != "auto":
        raise SystemExit(f"ame_kernels: AME_BUILD_CUDA must be auto, 0 or 1, got {env!r}")
    if torch_cuda:
        return "auto", f"torch is a CUDA {torch_cuda} build: the CUDA module is built if nvcc is found"
    if driver:
        return "auto", f"an NVIDIA driver is visible ({driver}): the CUDA module is built if nvcc is found"
    return "OFF", ("no CUDA build of torch and no NVIDIA driver here: no CUDA module "
                   "(AME_BUILD_CUDA=1 builds it anyway; it adds minutes)")


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self):
        if os.environ.get("AME_SKIP_NATIVE") == "1":
            print("ame_kernels: AME_SKIP_NATIVE=1, skipping the native build")
            return
        super().run()

    def build_extension(self, ext):
        import pybind11

        extdir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_temp = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}"
        build_temp.mkdir(parents=True, exist_ok=True)
        setting = os.environ.get("AME_BUILD_CUDA", "auto")
        if (setting or "auto").strip().lower() == "auto":
            cuda, why = cuda_build_decision(setting, _torch_cuda_version(), _nvidia_driver())
        else:
            cuda, why = cuda_build_decision(setting)
        print(f"ame_kernels: {why}")
        archs = os.environ.get("AME_CUDA_ARCHS", "80;90")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DAME_BUILD_CUDA={cuda}",
            f"-DAME_CUDA_ARCHS={archs}",
        ] + shlex.split(os.environ.get("CMAKE_ARGS", ""))
        jobs = os.environ.get("AME_BUILD_JOBS", str(os.cpu_count() or 1))
        print(f"ame_kernels: CMake build (AME_BUILD_CUDA={cuda}, archs={archs}, jobs={jobs})")
        subprocess.check_call(["cmake", str(ROOT), *args], cwd=build_temp)
        subprocess.check_call(["cmake", "--build", ".", "-j", jobs], cwd=build_temp)
        # CMake writes every module into extdir, but an editable install copies only the declared
        # extension (_C) back into the package: copy the optional sibling (_C_cuda) ourselves.
        package_dir = ROOT / "ame_kernels"
        if extdir != package_dir.resolve():
            for module in extdir.glob("_C_cuda*"):
                shutil.copy2(module, package_dir / module.name)
                print(f"ame_kernels: copied {module.name} into {package_dir}")


# setuptools runs this file as __main__ (pip, build, python setup.py); the tests import it for the
# functions above without running setup().
if __name__ == "__main__":
    setup(
        ext_modules=[CMakeExtension("ame_kernels._C")],
        cmdclass={"build_ext": CMakeBuild},
    )
