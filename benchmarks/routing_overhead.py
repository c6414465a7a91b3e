"""What the torch.func routing costs a plain eager training step (cpp backend).

Times a module forward+backward in training with the routing checks
(ops.train_forward/eval_forward/running_stats asking _func.transforms_active(),
functional._copy_into_buffers asking _func.store_running_stats) against the
same step with those functions swapped for versions without the checks, by
turns in one process (timing.take_turns), and prints the ratio.

    python benchmarks/routing_overhead.py [--seconds 20] [--rounds 10]
"""
import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import take_turns  # noqa: E402

import torch_bn_manual as bnm  # noqa: E402
from torch_bn_manual import functional, ops  # noqa: E402

_ops = torch.ops.torch_bn_manual


def _train_forward_unrouted(input, weight, bias, eps):
    return _ops.batch_norm_train_forward(input, weight, bias, eps)


def _running_stats_unrouted(save_mean, save_invstd, running_mean, running_var, momentum, eps, count):
    if not isinstance(momentum, torch.Tensor):
        momentum = torch.scalar_tensor(momentum, dtype=torch.float64)
    return _ops.batch_norm_running_stats(save_mean, save_invstd, running_mean, running_var, momentum, eps, count)


def _copy_into_buffers_unrouted(running_mean, running_var, new_mean, new_var):
    running_mean.copy_(new_mean)
    running_var.copy_(new_var)


@contextlib.contextmanager
def _variant(name):
    """'unrouted': the step without the routing checks; 'routed': as shipped."""
    saved = (ops.train_forward, ops.running_stats, functional._copy_into_buffers)
    if name == "unrouted":
        ops.train_forward, ops.running_stats = _train_forward_unrouted, _running_stats_unrouted
        functional._copy_into_buffers = _copy_into_buffers_unrouted
    try:
        yield
    finally:
        ops.train_forward, ops.running_stats, functional._copy_into_buffers = saved


def _step(shape):
    torch.manual_seed(0)
    layer = bnm.BatchNorm2d(shape[1], backend="cpp")
    x = torch.randn(shape, requires_grad=True)
    dy = torch.randn(shape)

    def step():
        layer(x).backward(dy)
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, {args.rounds} rounds, {args.seconds} s per variant")
    print("| step (BatchNorm2d, train fwd+bwd, cpp) | unrouted µs | routed µs | routed / unrouted |")
    print("|---|---|---|---|")
    for label, shape in (("small (8, 32, 8, 8)", (8, 32, 8, 8)), ("ResNet (16, 256, 28, 28)", (16, 256, 28, 28))):
        step = _step(shape)
        results, errors = take_turns({"unrouted": step, "routed": step}, "cpu", args.seconds, threads,
                                     args.rounds, context=_variant)
        if errors:
            raise next(iter(errors.values()))
        (u, us), (r, rs) = results["unrouted"], results["routed"]
        print(f"| {label} | {u * 1e6:.1f} (±{us:.0%}) | {r * 1e6:.1f} (±{rs:.0%}) | {r / u:.3f} |")


if __name__ == "__main__":
    main()
