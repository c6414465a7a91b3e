"""Builds torch_bn_manual._C: the C++ (CPU) kernels always, CUDA ones when possible.

TORCH_BN_MANUAL_CUDA=1 forces the CUDA build, =0 forbids it; by default CUDA is
built when torch was built with CUDA and a toolkit (CUDA_HOME) is found.
TORCH_CUDA_ARCH_LIST is respected; without it we build sm_80 and sm_90.
"""
import glob
import os

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def build_cuda() -> bool:
    forced = os.environ.get("TORCH_BN_MANUAL_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def cpu_flags() -> list:
    """Vector width for at::vec: AVX2+FMA when this compiler machine has them.

    at::vec picks its implementation from CPU_CAPABILITY_* macros; without one
    it falls back to scalar loops. The build machine is the machine that runs
    the code here (pip install -e . on each machine), so we match its CPU.
    """
    # No -std here: torch.utils.cpp_extension adds the standard its headers need.
    # -fopenmp: at::parallel_for is inline; without _OPENMP it runs serially.
    #   The GOMP symbols resolve to the libgomp that libtorch_cpu already loads.
    # -fno-tree-vectorize: the kernels vectorize explicitly with at::vec; GCC
    #   12's auto-vectorizer drops the last element of some odd-length loops
    #   over structs of doubles (seen on per-channel bookkeeping loops).
    flags = ["-O3", "-fopenmp", "-fno-tree-vectorize"]
    try:
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read()
    except OSError:
        cpuinfo = ""
    wanted = (" avx2", " fma", " f16c")  # f16c: at::vec's AVX2 float16 conversions
    if os.environ.get("TORCH_BN_MANUAL_NO_AVX2") != "1" and all(f in cpuinfo for f in wanted):
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
        # AVX512-BF16 (with VL and DQ): one-instruction float -> bfloat16
        # rounding in the 256-bit kernels (csrc/cpu/vec.h: round_to_bf16).
        if all(f in cpuinfo for f in (" avx512f", " avx512vl", " avx512dq", " avx512_bf16")):
            flags += ["-mavx512f", "-mavx512vl", "-mavx512dq", "-mavx512bf16"]
    return flags


def extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc")]
    if build_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        return CUDAExtension(
            "torch_bn_manual._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("TORCH_BN_MANUAL_WITH_CUDA", "1")],
            # nvcc: no -std (torch adds the one its headers need) and no --use_fast_math: it
            # flushes float32 denormals and approximates division/sqrt; the kernels are
            # bandwidth-bound, divide once per chunk and take 1/sqrt in double anyway.
            # -lineinfo maps compute-sanitizer and profiler reports to source lines.
            extra_compile_args={"cxx": cpu_flags(), "nvcc": ["-O3", "-lineinfo"]},
        )
    return CppExtension(
        "torch_bn_manual._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cpu_flags()},
    )


setup(
    name="torch_bn_manual",
    version="0.1.0",
    description="Batch normalization for PyTorch with forward and backward written by hand",
    packages=find_packages(include=["torch_bn_manual", "torch_bn_manual.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
)
