"""Builds fusedopt._C: a pybind11 module that does not link libtorch.

Environment switches:
  FUSEDOPT_CUDA=0|1          skip CUDA / require it (default: build it when nvcc is found)
  FUSEDOPT_CUDA_ARCHS="90;100"  SM targets; the newest also gets PTX for later chips
  FUSEDOPT_SANITIZE=1        compile and link the C++ code with ASan and UBSan
  MAX_JOBS=N                 parallel compile jobs
"""
import os
import platform

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup

# The same kernels compiled once per x86 instruction set; the driver picks one at
# run time, so one wheel runs everywhere and uses AVX-512 where it exists.
X86_ISA_FLAGS = {
    "csrc/cpu/kernels_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "csrc/cpu/kernels_avx512.cpp": [
        "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
        "-mprefer-vector-width=512",
    ],
}
IS_X86_64 = platform.machine().lower() in ("x86_64", "amd64")
SANITIZE = os.environ.get("FUSEDOPT_SANITIZE", "0") == "1"

# -fno-math-errno lets sqrt vectorize; -ffp-contract=off keeps every variant (and
# the reference) rounding identically: no fused multiply-add is formed behind our back.
COMMON_FLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-fno-strict-aliasing"]
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                  "-fno-omit-frame-pointer", "-g"]


class BuildExt(build_ext):
    """Adds the per-source ISA flags that setuptools has no place for."""

    def build_extensions(self):
        default_compile = self.compiler._compile

        def compile_one(obj, src, ext, cc_args, extra_postargs, pp_opts):
            postargs = list(extra_postargs) + X86_ISA_FLAGS.get(os.path.relpath(src), [])
            default_compile(obj, src, ext, cc_args, postargs, pp_opts)

        self.compiler._compile = compile_one
        super().build_extensions()


sources = [
    "csrc/bindings.cpp",
    "csrc/step_scalars.cpp",
    "csrc/cpu/driver.cpp",
    "csrc/cpu/thread_pool.cpp",
    "csrc/cpu/kernels_baseline.cpp",
]
macros = []
if IS_X86_64:
    sources += list(X86_ISA_FLAGS)
    macros.append(("FUSEDOPT_X86_ISA_VARIANTS", "1"))

extension = Pybind11Extension(
    "fusedopt._C",
    sources,
    include_dirs=["csrc", "csrc/include"],
    define_macros=macros,
    cxx_std=17,
    extra_compile_args=COMMON_FLAGS + (SANITIZE_FLAGS if SANITIZE else []),
    extra_link_args=["-pthread"] + (["-fsanitize=address,undefined"] if SANITIZE else []),
)

ParallelCompile("MAX_JOBS", default=0).install()
setup(ext_modules=[extension], cmdclass={"build_ext": BuildExt})
