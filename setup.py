"""Builds torch_bn_manual._C: the C++ (CPU) kernels always, CUDA ones when possible.

The project's metadata (name, version, dependencies) is in pyproject.toml; this
file describes the compiled extension. Install with

    pip install --no-build-isolation .        (or -e . for a checkout you edit)

The extension is compiled against the torch of the environment it is built
in and must run with that same torch: pip's default build isolation would
build it against a second, throwaway torch.

TORCH_BN_MANUAL_CUDA=1 forces the CUDA build, =0 forbids it; by default CUDA is
built when torch was built with CUDA and a toolkit (CUDA_HOME) is found.
TORCH_CUDA_ARCH_LIST is respected; without it we build sm_80 and sm_90.
TORCH_BN_MANUAL_NO_AVX2=1 builds for any x86-64 CPU (no AVX2 baseline);
TORCH_BN_MANUAL_NATIVE=1 adds AVX-512 (F, VL, DQ, BF16) to the baseline where
the build machine has it: that build runs only on such CPUs.
TORCH_BN_MANUAL_DEBUG=1 keeps debug info (release builds carry none).
TORCH_BN_MANUAL_NO_EXTENSION=1 installs the Python package only: scripts/setup_venv.sh
builds the extension in place (setup.py build_ext --inplace, which keeps its
objects between builds) and then makes the editable install with it.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
except ImportError as error:
    sys.exit(
        f"torch_bn_manual: building the extension needs torch, and `import torch` failed here ({error}).\n"
        "Install torch first, then build against it with pip's --no-build-isolation flag (pip's\n"
        "default build isolation hides the torch you have installed):\n"
        "    pip install torch numpy\n"
        "    pip install --no-build-isolation .")
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def build_cuda() -> bool:
    forced = os.environ.get("TORCH_BN_MANUAL_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


AVX2_BASELINE = ("avx2", "fma", "f16c")  # f16c: at::vec's AVX2 float16 conversions
AVX512_NATIVE = ("avx512f", "avx512vl", "avx512dq", "avx512_bf16")


def build_cpu_flags() -> tuple:
    """The x86 feature flags (as /proc/cpuinfo names them) the build assumes.

    at::vec picks its implementation from CPU_CAPABILITY_* macros; without one
    it falls back to scalar loops. AVX2 + FMA + F16C is the baseline wherever
    the build machine has it: torch_bn_manual/_cpu_check.py refuses, with a
    message, to load such a build on a CPU without them. AVX512-BF16 rounding
    is chosen at run time (csrc/cpu/cpu_features.h), so a wheel built here
    runs on any AVX2 machine; TORCH_BN_MANUAL_NATIVE=1 compiles AVX-512 in.
    """
    try:
        with open("/proc/cpuinfo") as f:
            present = set(f.read().split())
    except OSError:
        present = set()
    flags = ()
    if os.environ.get("TORCH_BN_MANUAL_NO_AVX2") != "1" and all(f in present for f in AVX2_BASELINE):
        flags = AVX2_BASELINE
        if os.environ.get("TORCH_BN_MANUAL_NATIVE") == "1" and all(f in present for f in AVX512_NATIVE):
            flags += AVX512_NATIVE
    return flags


def cpu_flags(features: tuple) -> list:
    # No -std here: torch.utils.cpp_extension adds the standard its headers need.
    # -fopenmp: at::parallel_for is inline; without _OPENMP it runs serially.
    #   The GOMP symbols resolve to the libgomp that libtorch_cpu already loads.
    # -fno-tree-vectorize: the kernels vectorize explicitly with at::vec; GCC
    #   12's auto-vectorizer drops the last element of some odd-length loops
    #   over structs of doubles (seen on per-channel bookkeeping loops).
    # -g0: Python's own CFLAGS add -g, which made the library 19.7 MB of
    #   mostly debug info; it comes last so that it wins.
    flags = ["-O3", "-fopenmp", "-fno-tree-vectorize"]
    if "avx2" in features:
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    if "avx512_bf16" in features:
        # One-instruction float -> bfloat16 rounding compiled in (csrc/cpu/vec.h).
        flags += ["-mavx512f", "-mavx512vl", "-mavx512dq", "-mavx512bf16"]
    flags += ["-g"] if debug_build() else ["-g0"]
    return flags


def debug_build() -> bool:
    return os.environ.get("TORCH_BN_MANUAL_DEBUG") == "1"


def write_cpu_requirements(features: tuple) -> None:
    """Records the build's CPU baseline for torch_bn_manual/_cpu_check.py.

    The check runs before the library loads: a library built for AVX2 may
    execute AVX2 instructions as soon as it is loaded (static initializers),
    so asking the library itself would be too late.
    """
    path = os.path.join(ROOT, "torch_bn_manual", "_cpu_requirements.py")
    text = ("# Written by setup.py: the x86 features (as /proc/cpuinfo names them) that the\n"
            "# compiled extension was built to require. Read by _cpu_check.py.\n"
            f"REQUIRED = {tuple(features)!r}\n")
    try:
        with open(path) as f:
            if f.read() == text:
                return  # unchanged: keep the timestamp
    except OSError:
        pass
    with open(path, "w") as f:
        f.write(text)


def extension():
    features = build_cpu_flags()
    write_cpu_requirements(features)
    # Release builds: no debug info to link, and no symbol table beyond the
    # dynamic one the loader needs.
    link_args = [] if debug_build() else ["-Wl,--strip-all"]
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
            extra_compile_args={"cxx": cpu_flags(features), "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link_args,
        )
    return CppExtension(
        "torch_bn_manual._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cpu_flags(features)},
        extra_link_args=link_args,
    )


def install_requires() -> list:
    """torch of the release compiled against (any patch level: same C++ ABI), and numpy.

    A wheel built under pip's build isolation is compiled against the torch pip
    put there; the pin makes pip install that same release to run it.
    """
    major, minor = torch.__version__.split(".")[:2]
    return [f"torch=={major}.{minor}.*", "numpy"]


# Name, version and description: pyproject.toml.
setup(
    install_requires=install_requires(),
    packages=find_packages(include=["torch_bn_manual", "torch_bn_manual.*"]),
    ext_modules=[] if os.environ.get("TORCH_BN_MANUAL_NO_EXTENSION") == "1" else [extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
