"""bfloat16 batch norm (32,128,28,28), eval and train, per CPU rounding path.

    python scripts/bench_bf16_rounding.py [--rounds 6] [LABEL=PYTHONPATH ...]

Each round runs, one after another, a fresh process per variant: this tree
with the path chosen at run time ("runtime"), this tree with
TORCH_BN_MANUAL_CPU=portable ("portable"), and any LABEL=PYTHONPATH given (e.g.
a copy built with TORCH_BN_MANUAL_NATIVE=1, AVX-512 compiled in). One thread,
so that a busy machine does not stall a parallel region; medians of each
process's 40 calls, then medians over rounds.
"""
import argparse
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MEASURE = r"""
import statistics, time, torch, torch_bn_manual as bnm
torch.set_num_threads(1)
out = []
for fmt in (torch.contiguous_format, torch.channels_last):
    x = torch.randn(32, 128, 28, 28).to(torch.bfloat16).contiguous(memory_format=fmt)
    m = bnm.BatchNorm2d(128, backend="cpp").to(torch.bfloat16)
    xg, dy = x.clone().requires_grad_(), torch.randn_like(x)
    def eval_step():
        m.eval()
        with torch.no_grad():
            m(x)
    def train_step():
        m.train()
        m(xg).backward(dy)
    for step in (eval_step, train_step):
        for _ in range(5):
            step()
        times = []
        for _ in range(40):
            start = time.perf_counter(); step(); times.append(time.perf_counter() - start)
        out.append(statistics.median(times) * 1e3)
print(*out)
"""
CASES = ["contiguous eval", "contiguous train", "channels_last eval", "channels_last train"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("variants", nargs="*", help="LABEL=PYTHONPATH")
    args = parser.parse_args()
    variants = [("runtime", ROOT, None), ("portable", ROOT, "portable")]
    variants += [(v.split("=", 1)[0], v.split("=", 1)[1], None) for v in args.variants]
    results = {label: [] for label, _, _ in variants}
    for _ in range(args.rounds):
        for label, path, cpu in variants:
            env = dict(os.environ, PYTHONPATH=path)
            env.pop("TORCH_BN_MANUAL_CPU", None)
            if cpu:
                env["TORCH_BN_MANUAL_CPU"] = cpu
            line = subprocess.run([sys.executable, "-c", MEASURE], env=env, check=True, capture_output=True,
                                  text=True).stdout
            results[label].append([float(t) for t in line.split()])
    print(f"{'ms (median over rounds)':28s}" + "".join(f"{label:>12s}" for label in results))
    for i, case in enumerate(CASES):
        row = [statistics.median(r[i] for r in runs) for runs in results.values()]
        print(f"{case:28s}" + "".join(f"{t:12.3f}" for t in row))


if __name__ == "__main__":
    main()
