"""Drives CMake to build ame_kernels._C (and _C_cuda when nvcc is present).

Environment switches (printed when used):
  AME_SKIP_NATIVE=1     pure Python install (reference and Triton backends only)
  AME_BUILD_CUDA=auto|0|1   build the CUDA module (auto: when nvcc is found)
  AME_CUDA_ARCHS="80;90"    CUDA architectures
  AME_BUILD_JOBS=N      parallel compile jobs (default: cores)
  CMAKE_ARGS            passed through to CMake
"""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


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
        cuda = os.environ.get("AME_BUILD_CUDA", "auto")
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


setup(
    ext_modules=[CMakeExtension("ame_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
)
