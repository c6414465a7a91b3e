"""Refuses, with a message, to load the compiled extension on a CPU it was not built for.

setup.py builds for the build machine's x86 baseline (AVX2 + FMA + F16C where
it has them) and records it in _cpu_requirements.py. A library built for AVX2
may execute AVX2 instructions while it loads, so the check must come before
the import: on an older CPU the process would otherwise die of SIGILL.
"""
from typing import Optional, Set


def _cpu_flags() -> Optional[Set[str]]:
    """The CPU's feature flags as Linux names them, or None where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def check_cpu() -> None:
    """Raises ImportError when this CPU lacks an x86 feature the build requires."""
    try:
        from ._cpu_requirements import REQUIRED
    except ImportError:
        return  # built before the requirements were recorded
    present = _cpu_flags()
    if present is None or not REQUIRED:
        return
    missing = [flag for flag in REQUIRED if flag not in present]
    if missing:
        raise ImportError(
            f"torch_bn_manual._C was built for CPUs with {', '.join(REQUIRED)}; this CPU lacks "
            f"{', '.join(missing)}. Rebuild it on this machine (pip install --no-build-isolation .), "
            "or with TORCH_BN_MANUAL_NO_AVX2=1 for any x86-64 CPU.")
