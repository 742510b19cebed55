"""Builds fusedopt._C: a pybind11 module that does not link libtorch.

Environment switches:
  FUSEDOPT_CUDA=0|1             skip CUDA / require it (default: build it when nvcc is found)
  FUSEDOPT_CUDA_ARCHS="90;100"  SM targets (default 80;90;100;120: A100, H100/H200,
                                Blackwell); the newest also gets PTX for later chips
  FUSEDOPT_SANITIZE=1           compile and link the C++ code with ASan and UBSan
  FUSEDOPT_CUDA_EMULATION=1     also build fusedopt._cuda_emulated: csrc/cuda compiled for
                                the host and run thread by thread, for the tests (CI sets it)
  MAX_JOBS=N                    parallel compile jobs
"""
import os
import platform
import shutil
import sys

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
EMULATION = os.environ.get("FUSEDOPT_CUDA_EMULATION", "0") == "1"

# -fno-math-errno lets sqrt vectorize; -fno-trapping-math lets GCC compute a float
# operation it moved behind a select on both sides (fp16 conversions, lerp): without
# it no fp16 loop vectorized for AVX2 or SSE. Neither changes a value: FP exceptions
# are never enabled. -ffp-contract=off keeps every variant (and the reference)
# rounding identically: no fused multiply-add is formed behind our back.
COMMON_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off",
                "-fno-strict-aliasing"]
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                  "-fno-omit-frame-pointer", "-g"]


def find_nvcc():
    """nvcc's path, None to build without CUDA; FUSEDOPT_CUDA=1 makes a missing nvcc an error."""
    switch = os.environ.get("FUSEDOPT_CUDA", "")
    if switch == "0":
        return None
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = os.path.join(cuda_home, "bin", "nvcc")
    nvcc = candidate if os.path.exists(candidate) else shutil.which("nvcc")
    if nvcc is None and switch == "1":
        raise RuntimeError("FUSEDOPT_CUDA=1 but nvcc was not found (set CUDA_HOME)")
    return nvcc


def cuda_arch_flags(archs):
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return flags + [f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


NVCC = find_nvcc()
CUDA_ARCHS = os.environ.get("FUSEDOPT_CUDA_ARCHS", "80;90;100;120").replace(",", ";").split(";")
# --fmad=false and IEEE division and sqrt (nvcc's defaults without --use_fast_math)
# make the GPU round exactly as the CPU kernels and the reference.
NVCC_FLAGS = ["-O3", "-std=c++17", "--fmad=false", "-Xcompiler", "-fPIC,-fvisibility=hidden"]


class BuildExt(build_ext):
    """Adds what setuptools has no place for: per-source ISA flags and nvcc for .cu files."""

    def finalize_options(self):
        super().finalize_options()
        # setuptools skips an extension, and each object file, that is newer than its
        # sources whatever the flags; a change of configuration forces a full rebuild.
        self.configuration = (f"sanitize={int(SANITIZE)} emulation={int(EMULATION)} "
                              f"cuda={';'.join(CUDA_ARCHS) if NVCC else 'off'}")
        self.stamp = os.path.join(self.build_temp, "configuration")
        if not os.path.exists(self.stamp) or open(self.stamp).read() != self.configuration:
            self.force = True

    def run(self):
        super().run()
        with open(self.stamp, "w") as stamp:
            stamp.write(self.configuration)

    def build_extensions(self):
        default_compile = self.compiler._compile
        self.compiler.src_extensions.append(".cu")

        def compile_one(obj, src, ext, cc_args, extra_postargs, pp_opts):
            if src.endswith(".cu"):
                arch_flags = cuda_arch_flags([a for a in CUDA_ARCHS if a])
                self.spawn([NVCC, "-c", src, "-o", obj] + pp_opts + NVCC_FLAGS + arch_flags)
                return
            postargs = list(extra_postargs) + X86_ISA_FLAGS.get(os.path.relpath(src), [])
            default_compile(obj, src, ext, cc_args, postargs, pp_opts)

        self.compiler._compile = compile_one
        super().build_extensions()


sources = [
    "csrc/bindings.cpp",
    "csrc/launch_check.cpp",
    "csrc/step_args.cpp",
    "csrc/cpu/driver.cpp",
    "csrc/cpu/parallel.cpp",
    "csrc/cpu/thread_pool.cpp",
    "csrc/cpu/kernels_baseline.cpp",
]
macros = []
if IS_X86_64:
    sources += list(X86_ISA_FLAGS)
    macros.append(("FUSEDOPT_X86_ISA_VARIANTS", "1"))
link_dirs, link_libraries = [], []
if sys.platform.startswith("linux"):
    link_libraries.append("dl")  # parallel.cpp looks up the loaded OpenMP runtime
if NVCC is not None:
    sources.append("csrc/cuda/kernels.cu")
    macros += [("FUSEDOPT_WITH_CUDA", "1"), ("FUSEDOPT_CUDA_ARCH_LIST", f'"{";".join(CUDA_ARCHS)}"')]
    # The runtime is linked statically: importing never needs a driver or libcudart.
    link_dirs.append(os.path.join(os.path.dirname(os.path.dirname(NVCC)), "lib64"))
    link_libraries += ["cudart_static", "rt"]

common = dict(
    include_dirs=["csrc", "csrc/include"],
    cxx_std=17,
    extra_compile_args=COMMON_FLAGS + (SANITIZE_FLAGS if SANITIZE else []),
    extra_link_args=["-pthread"] + (["-fsanitize=address,undefined"] if SANITIZE else []),
)
extensions = [Pybind11Extension("fusedopt._C", sources, define_macros=macros,
                                library_dirs=link_dirs, libraries=link_libraries, **common)]
if EMULATION:
    # The same kernels.cu, through a one-line .cpp that includes it (NOTE: [emulated CUDA]).
    extensions.append(Pybind11Extension(
        "fusedopt._cuda_emulated",
        ["csrc/cuda_emulated_bindings.cpp", "csrc/cuda/emulated_kernels.cpp",
         "csrc/cuda/emulation.cpp", "csrc/step_args.cpp"],
        define_macros=[("FUSEDOPT_CUDA_EMULATION", "1")], **common))

ParallelCompile("MAX_JOBS", default=0).install()
setup(ext_modules=extensions, cmdclass={"build_ext": BuildExt})
