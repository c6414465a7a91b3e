"""How a callable is timed, and which operators it really runs."""
from __future__ import annotations

import contextlib

import torch
import torch.utils.benchmark as benchmark
from torch.utils._python_dispatch import TorchDispatchMode

try:  # CUDA event timing with an L2 flush between calls, when Triton is installed
    from triton.testing import do_bench
except Exception:  # ImportError, or a Triton that cannot load on this machine
    do_bench = None


def cuda_timer_name() -> str:
    return "triton.testing.do_bench (CUDA events)" if do_bench else "torch.utils.benchmark (synchronized wall clock)"


def measure(fn, device: str, min_run_time: float, threads: int):
    """(median seconds of one call of `fn`, interquartile range / median).

    CPU: torch.utils.benchmark blocked_autorange with `threads` intra-op threads
    (Timer's default is 1 thread, so the count is always passed).
    CUDA: triton's do_bench (device events) when importable, else the same
    Timer, which synchronizes the device around each timed block.
    """
    fn()  # warm-up: first-call allocations, lazy initialization
    if device == "cuda":
        torch.cuda.synchronize()
        if do_bench is not None:
            rep_ms = max(1, int(min_run_time * 1000))
            q1, median, q3 = do_bench(fn, warmup=max(1, rep_ms // 4), rep=rep_ms, quantiles=[0.25, 0.5, 0.75])
            return median / 1e3, (q3 - q1) / median
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return m.median, m.iqr / m.median


def take_turns(fns: dict, device: str, seconds: float, threads: int, rounds: int, context=None):
    """Time several callables fairly on a machine whose speed drifts.

    Each of `rounds` rounds times every callable for seconds / rounds (with
    measure()), starting with a different one each round, so a slow spell
    hits them all alike. Returns ({name: (median of the round medians,
    spread)}, {name: error}); spread is the larger of the median
    interquartile range within a round and the range between rounds, both
    relative to the median. `context(name)`, when given, wraps each timing
    (e.g. a cuDNN switch). A callable that raises is dropped with its error.
    """
    results, errors = {}, {}
    names = list(fns)
    per_round = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)] if names else []:
            if name in errors:
                continue
            try:
                with context(name) if context else contextlib.nullcontext():
                    per_round[name].append(measure(fns[name], device, seconds / rounds, threads))
            except Exception as e:  # reported by the caller
                errors[name] = e
    for name, values in per_round.items():
        if name in errors or not values:
            continue
        medians = sorted(t for t, _ in values)
        median = medians[len(medians) // 2]
        within = sorted(iqr for _, iqr in values)[len(values) // 2]
        results[name] = (median, max(within, (medians[-1] - medians[0]) / median if len(medians) > 1 else 0.0))
    return results, errors


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func._schema.name)
        return func(*args, **(kwargs or {}))


def ops_called(fn) -> set:
    """Names of the operators (aten::..., torch_bn_manual::...) that one call of `fn` dispatches, backward included."""
    with _OpRecorder() as recorder:
        fn()
    return recorder.names
