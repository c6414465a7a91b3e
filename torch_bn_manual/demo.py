"""Batch norm, ours against nn.BatchNorm2d: training, parity, hard inputs.

    python -m torch_bn_manual.demo [--epochs N] [--quick] [--seed S]

1. Training. A small conv net (three conv-BN-ReLU blocks, pooling, linear) on
   scikit-learn's 8x8 digits, trained from the same initial weights on the
   same batches with the same SGD, once with nn.BatchNorm2d and once with each
   of our backends. Loss and test accuracy per epoch side by side; the largest
   per-step loss and gradient differences in lockstep (every step of ours from
   nn's weights) and in the free runs (next to nn itself started one ulp away);
   the time per training step and per batch-norm layer.
2. Parity. Forward and backward of one BatchNorm2d in training mode against
   nn.BatchNorm2d, for every backend, device and dtype, as relative errors.
3. Hard input. float32 values with a large offset (1e4, 1e6), where a float32
   mean or E[x^2] - E[x]^2 loses digits: max abs error against float64 math.

Exits with status 1 when an error in 2. or 3. is above its tolerance.
"""
import argparse
import copy
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import torch_bn_manual as bnm

BATCH = 64
LR = 0.05
MOMENTUM = 0.9

PARITY_SHAPE = (8, 16, 10, 10)
BN_TIMING_SHAPE = (BATCH, 32, 8, 8)  # the input of the net's second batch norm

HALF = (torch.bfloat16, torch.float16)
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# Largest relative error against nn.BatchNorm2d accepted, per input dtype. Both compute
# half types in float32 and round once, so those may differ by an ulp or two of the output.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}

HARD_SHAPE = (16, 8, 16, 16)
HARD_OFFSETS = (1e4, 1e6)
HARD_TOLERANCE = 1e-5  # ours, max abs error in y


# ----------------------------------------------------------------------------- output


def section(title):
    print(f"\n== {title}", flush=True)


def fmt_err(value):
    return "0" if value == 0 else f"{value:.1e}"


def print_table(headers, rows, indent="  "):
    """Columns aligned: the first to the left, the others to the right."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        return indent + "  ".join(parts).rstrip()

    print(line(cells[0]))
    print(indent + "  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(line(row))
    sys.stdout.flush()


def relative_error(value, reference):
    """max|value - reference| / max|reference|."""
    scale = reference.abs().max().item()
    return (value - reference).abs().max().item() / (scale if scale > 0 else 1.0)


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------- data and model


def load_data(seed):
    """8x8 digits as (N, 1, 8, 8) float32, a fixed stratified split, normalized with train stats."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images.astype("float32"), digits.target, test_size=0.25, random_state=seed, stratify=digits.target
    )
    mean, std = x_train.mean(), x_train.std()

    def images(a):
        return torch.from_numpy((a - mean) / std).unsqueeze(1)

    return images(x_train), torch.from_numpy(y_train), images(x_test), torch.from_numpy(y_test)


def conv_block(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


def make_net():
    return nn.Sequential(
        conv_block(1, 16),
        conv_block(16, 32),
        # 8x8 -> 4x4. Averaging, not max: a max's tie-break would turn last-bit differences
        # between implementations into different gradient paths.
        nn.AvgPool2d(2),
        conv_block(32, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def build_models(backends, seed):
    """One net per implementation, all with the initial weights of the first."""
    torch.manual_seed(seed)
    base = make_net()
    models = {"nn": base}
    for backend in backends:
        models[f"ours-{backend}"] = bnm.convert_batchnorm(copy.deepcopy(base), backend=backend)
    return models


def nudged(model):
    """A copy with every parameter moved up by one float32 step (ulp): rounding noise, nothing more."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.nextafter(p, torch.full_like(p, float("inf"))))
    return model


# ----------------------------------------------------------------------------- training


@dataclass
class Run:
    label: str
    step_losses: list = field(default_factory=list)
    epoch_losses: list = field(default_factory=list)
    epoch_accs: list = field(default_factory=list)
    seconds: float = 0.0  # in training steps only


def make_optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)


def batches(n, generator):
    """Shuffled index batches of BATCH, the last partial batch dropped."""
    order = torch.randperm(n, generator=generator)
    for start in range(0, n - BATCH + 1, BATCH):
        yield order[start : start + BATCH]


def train_step(model, optimizer, x, y, check=None):
    """One SGD step; check(model, x, y, loss) sees the gradients before the update."""
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    if check is not None:
        check(model, x, y, loss.item())
    optimizer.step()
    return loss.item()


@torch.no_grad()
def accuracy(model, x, y):
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def train(label, model, data, epochs, seed, check=None):
    x_train, y_train, x_test, y_test = data
    optimizer = make_optimizer(model)
    order = torch.Generator().manual_seed(seed)  # the same batches for every run
    run = Run(label)
    print(f"  {label:<12} ", end="", flush=True)
    for _ in range(epochs):
        model.train()
        start = time.perf_counter()
        losses = [train_step(model, optimizer, x_train[i], y_train[i], check) for i in batches(len(x_train), order)]
        run.seconds += time.perf_counter() - start
        run.step_losses += losses
        run.epoch_losses.append(sum(losses) / len(losses))
        run.epoch_accs.append(accuracy(model, x_test, y_test))
        print(".", end="", flush=True)
    print(f" {len(run.step_losses)} steps in {run.seconds:.1f} s, test accuracy {run.epoch_accs[-1]:.2%}", flush=True)
    return run


def largest_relative_error(values, references):
    """The largest relative_error over pairs of tensors."""
    return max(relative_error(v, r) for v, r in zip(values, references))


class Lockstep:
    """Replays nn's run; at every step, ours and nn in float64 start from nn's weights and running stats.

    On the same batch, each computes its loss and gradients. Kept per step: |loss - loss_nn|, and
    the relative gradient error (max|g - g_ref| / max|g_ref|, the largest over the parameters)
    against nn and against float64: what batch norm changes in one step, before SGD amplifies it.
    """

    def __init__(self, models):
        self.exact = copy.deepcopy(models["nn"]).double().train()
        self.models = {label: copy.deepcopy(m).train() for label, m in models.items() if label != "nn"}
        self.loss = {label: [] for label in self.models}
        self.grad_vs_nn = {label: [] for label in self.models}
        self.grad_vs_exact = {label: [] for label in models}

    def __call__(self, reference, x, y, reference_loss):
        exact = self.gradients(self.exact, reference, x.double(), y)[1]
        theirs = [p.grad.double() for p in reference.parameters()]
        self.grad_vs_exact["nn"].append(largest_relative_error(theirs, exact))
        for label, model in self.models.items():
            loss, grads = self.gradients(model, reference, x, y)
            self.loss[label].append(abs(loss - reference_loss))
            self.grad_vs_nn[label].append(largest_relative_error(grads, theirs))
            self.grad_vs_exact[label].append(largest_relative_error(grads, exact))

    @staticmethod
    def gradients(model, reference, x, y):
        """Loss and parameter gradients (as float64) of model from reference's state, on one batch."""
        model.load_state_dict(reference.state_dict())
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss.item(), [p.grad.double() for p in model.parameters()]


def warm_up(models, data, steps=2):
    """A few steps on throwaway copies, so that first-call costs land in no measurement."""
    x, y = data[0][:BATCH], data[1][:BATCH]
    for model in models.values():
        model = copy.deepcopy(model)
        optimizer = make_optimizer(model)
        for _ in range(steps):
            train_step(model, optimizer, x, y)


def interleaved_median(calls, repeats, warmup=3):
    """{label: median seconds of calls[label]()}, the calls taking turns so that load hits all alike."""
    samples = {label: [] for label in calls}
    for i in range(warmup + repeats):
        for label, call in calls.items():
            start = time.perf_counter()
            call()
            if i >= warmup:
                samples[label].append(time.perf_counter() - start)
    return {label: statistics.median(s) for label, s in samples.items()}


def time_steps(models, data, repeats):
    """Seconds per training step on one fixed batch, per model."""
    x, y = data[0][:BATCH], data[1][:BATCH]
    calls = {}
    for label, model in models.items():
        model = copy.deepcopy(model).train()
        optimizer = make_optimizer(model)
        calls[label] = lambda m=model, o=optimizer: train_step(m, o, x, y)
    return interleaved_median(calls, repeats)


def time_bn_layers(backends, repeats, shape=BN_TIMING_SHAPE):
    """Seconds per forward + backward of one BatchNorm2d in training mode, per implementation."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).requires_grad_()
    dy = torch.randn(shape, generator=g)
    layers = {"nn": nn.BatchNorm2d(shape[1])}
    for backend in backends:
        layers[f"ours-{backend}"] = bnm.BatchNorm2d(shape[1], backend=backend)

    def call(layer):
        x.grad = None
        layer(x).backward(dy)

    return interleaved_median({label: lambda l=layer: call(l) for label, layer in layers.items()}, repeats)


def loss_differences(reference, run):
    """(largest |loss - loss_reference| in the first epoch, over the run, the step where it is)."""
    diffs = [abs(a - b) for a, b in zip(run.step_losses, reference.step_losses)]
    step = max(range(len(diffs)), key=diffs.__getitem__)
    steps_per_epoch = len(diffs) // len(run.epoch_losses)
    return max(diffs[:steps_per_epoch]), diffs[step], step + 1


def print_epochs(runs):
    headers = ["epoch"] + [f"loss {r.label}" for r in runs] + [f"acc {r.label}" for r in runs]
    rows = []
    for e in range(len(runs[0].epoch_losses)):
        losses = [f"{r.epoch_losses[e]:.5f}" for r in runs]
        accs = [f"{r.epoch_accs[e]:.2%}" for r in runs]
        rows.append([e + 1] + losses + accs)
    print("\n  mean training loss and test accuracy per epoch")
    print_table(headers, rows)


def print_lockstep(lockstep):
    def median_and_max(errors):
        return [fmt_err(statistics.median(errors)), fmt_err(max(errors))]

    rows = [["nn", "-", "-", "-"] + median_and_max(lockstep.grad_vs_exact["nn"])]
    for label in lockstep.models:
        loss = fmt_err(max(lockstep.loss[label]))
        rows.append([label, loss] + median_and_max(lockstep.grad_vs_nn[label]) + median_and_max(lockstep.grad_vs_exact[label]))
    steps = len(lockstep.grad_vs_exact["nn"])
    print(f"\n  lockstep: nn's run replayed; at each of its {steps} steps, ours and nn in float64 start from nn's")
    print("  weights and running stats and compute loss and gradients on the same batch")
    headers = ["backend", "max |loss - loss_nn|", "grads~nn median", "max", "grads~f64 median", "max"]
    print_table(headers, rows)
    print("  grads: max|g - g_ref| / max|g_ref| per parameter tensor, the largest over the tensors; median and")
    print("  max over the steps. The max comes from a step where a ReLU input lies within rounding of 0:")
    print("  nn itself against float64 shows such steps too.")


def print_free_differences(runs, baseline):
    """runs[0] is nn; baseline is nn started one ulp away, for scale."""
    rows = []
    for run in runs[1:] + [baseline]:
        first, largest, step = loss_differences(runs[0], run)
        rows.append([run.label, fmt_err(first), fmt_err(largest), step])
    print("\n  free-running: |loss - loss_nn| per step in the runs above")
    print_table(["run", "epoch 1", "whole run", "at step"], rows)
    print(f"  SGD amplifies any rounding difference step by step; {baseline.label}, nn itself started from")
    print("  weights one float32 step away, shows how far that goes.")


def print_timing(runs, step_times, bn_times, step_repeats, bn_repeats):
    rows = []
    for run in runs:
        step, bn = step_times[run.label], bn_times[run.label]
        rows.append([
            run.label,
            f"{1e3 * run.seconds / len(run.step_losses):.2f}",
            f"{1e3 * step:.2f}",
            f"{step_times['nn'] / step:.2f}x",
            f"{1e6 * bn:.0f}",
            f"{bn_times['nn'] / bn:.2f}x",
        ])
    print(f"\n  time, float32 on the CPU, {torch.get_num_threads()} threads (the machine may be shared: compare columns)")
    print(f"    step run:  training step (forward, backward, SGD; batch {BATCH}), mean over the training run above")
    print(f"    step:      the same, median of {step_repeats} steps on one batch, implementations taking turns")
    print(f"    BN layer:  one BatchNorm2d forward + backward, {tuple(BN_TIMING_SHAPE)}, median of {bn_repeats}")
    headers = ["backend", "step run ms", "step ms", "step vs nn", "BN layer us", "BN vs nn"]
    print_table(headers, rows)


# ----------------------------------------------------------------------------- parity


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def param_dtype(dtype):
    return torch.float32 if dtype in HALF else dtype


def run_train_mode(module, x, dy):
    """Forward and backward in training mode; all results as float64 on the CPU."""
    module.train()
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(dy)
    results = {"y": y, "dx": x.grad, "dweight": module.weight.grad, "dbias": module.bias.grad}
    results["running_mean"], results["running_var"] = module.running_mean, module.running_var
    return {k: v.detach().double().cpu() for k, v in results.items()}


def parity_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    c = PARITY_SHAPE[1]
    x = torch.randn(PARITY_SHAPE, generator=g, dtype=torch.float64) * 2 + 0.5
    dy = torch.randn(PARITY_SHAPE, generator=g, dtype=torch.float64)
    weight = 1 + 0.1 * torch.randn(c, generator=g, dtype=torch.float64)
    bias = 0.1 * torch.randn(c, generator=g, dtype=torch.float64)
    return x, dy, weight, bias


def make_nn_bn(weight, bias, device, dtype):
    module = nn.BatchNorm2d(len(weight), device=device, dtype=dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
        module.bias.copy_(bias)
    return module


def parity_case(backend, device, dtype, seed):
    """Relative errors of ours against nn (and of both against float64 math), or an error message."""
    x, dy, weight, bias = parity_inputs(seed)
    x, dy = x.to(device, dtype), dy.to(device, dtype)
    reference = make_nn_bn(weight, bias, device, param_dtype(dtype))
    ours = bnm.BatchNorm2d(len(weight), device=device, dtype=param_dtype(dtype), backend=backend)
    ours.load_state_dict(reference.state_dict())
    exact = run_train_mode(make_nn_bn(weight, bias, "cpu", torch.float64), x.double().cpu(), dy.double().cpu())
    try:
        theirs = run_train_mode(reference, x, dy)
    except RuntimeError as e:
        return f"nn.BatchNorm2d does not take it: {str(e).splitlines()[0][:60]}"
    try:
        mine = run_train_mode(ours, x, dy)
    except RuntimeError as e:
        return f"ERROR {type(e).__name__}: {str(e).splitlines()[0][:60]}"
    errors = {k: relative_error(mine[k], theirs[k]) for k in ("y", "dx", "dweight", "dbias")}
    errors["running"] = max(relative_error(mine[k], theirs[k]) for k in ("running_mean", "running_var"))
    errors["nn~f64"] = relative_error(theirs["y"], exact["y"])
    errors["ours~f64"] = relative_error(mine["y"], exact["y"])
    return errors


COMPARED = ("y", "dx", "dweight", "dbias", "running")


def parity_row(backend, device, dtype, seed):
    """(table row, number of errors above tolerance)."""
    head = [backend, device, dtype_name(dtype)]
    errors = parity_case(backend, device, dtype, seed)
    if isinstance(errors, str):
        failed = errors.startswith("ERROR")
        return head + [errors] + [""] * (len(COMPARED) + 3), int(failed)
    tol = TOLERANCE[dtype]
    cells = [fmt_err(errors[k]) + (" *" if errors[k] > tol else "  ") for k in COMPARED]
    over = sum(errors[k] > tol for k in COMPARED)
    status = "ok" if over == 0 else "ABOVE TOL"
    return head + cells + [fmt_err(tol), fmt_err(errors["nn~f64"]), fmt_err(errors["ours~f64"]), status], over


def print_parity(backends, seed):
    headers = ["backend", "device", "dtype"] + list(COMPARED) + ["tol", "y nn~f64", "y ours~f64", "status"]
    rows, failures = [], 0
    for backend in backends:
        for device in devices():
            for dtype in DTYPES:
                row, over = parity_row(backend, device, dtype, seed)
                rows.append(row)
                failures += over
    print(f"  training mode; input {tuple(PARITY_SHAPE)} ~ 2 N(0,1) + 0.5, random weight, bias and grad_output")
    print("  y, dx, dweight, dbias, running (running_mean and _var after the step): max|ours - nn| / max|nn|")
    print("  half dtypes with float32 weight and bias, as nn.BatchNorm2d takes them;  * = above tol")
    print("  y nn~f64, y ours~f64: the relative error of y against float64 math on the same input values")
    print_table(headers, rows)
    return failures


# ----------------------------------------------------------------------------- hard input


def float64_batch_norm(x):
    """Training-mode batch norm (weight 1, bias 0, eps 1e-5) in float64 on the given values."""
    x = x.double()
    dims = [0] + list(range(2, x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5)


def hard_input_errors(offset, backends, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = (offset + torch.randn(HARD_SHAPE, generator=g, dtype=torch.float64)).float().to(device)
    exact = float64_batch_norm(x.cpu())
    modules = {"nn": nn.BatchNorm2d(HARD_SHAPE[1], device=device)}
    for backend in backends:
        modules[f"ours-{backend}"] = bnm.BatchNorm2d(HARD_SHAPE[1], device=device, backend=backend)
    errors = {}
    for label, module in modules.items():
        with torch.no_grad():
            y = module.train()(x)
        errors[label] = (y.double().cpu() - exact).abs().max().item()
    return errors


def print_hard_input(backends, seed):
    labels = ["nn"] + [f"ours-{b}" for b in backends]
    rows, failures = [], 0
    for device in devices():
        for offset in HARD_OFFSETS:
            errors = hard_input_errors(offset, backends, device, seed)
            over = [label for label in labels[1:] if errors[label] > HARD_TOLERANCE]
            failures += len(over)
            cells = [fmt_err(errors[label]) + (" *" if label in over else "  ") for label in labels]
            rows.append([f"{offset:.0e} + N(0,1)", device] + cells)
    print(f"  float32 input {tuple(HARD_SHAPE)}, training mode: max |y - y_float64| (float64 math on the same values)")
    print(f"  ours should be <= {HARD_TOLERANCE:.0e};  * = above")
    print_table(["input", "device"] + labels, rows)
    return failures


# ----------------------------------------------------------------------------- main


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m torch_bn_manual.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 8, --quick 1)")
    parser.add_argument("--quick", action="store_true", help="a short run: 1 epoch, fewer timed steps")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, split, batch order and inputs")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 1 if args.quick else 8
    args.timing_steps = 5 if args.quick else 50
    return args


def training_section(backends, args):
    section(f"1. Training: conv net on 8x8 digits, {args.epochs} epochs, nn.BatchNorm2d vs ours")
    data = load_data(args.seed)
    print(
        f"  {len(data[0])} train / {len(data[2])} test images, batch {BATCH}, SGD lr {LR} momentum {MOMENTUM},"
        " same initial weights and batch order for every run"
    )
    models = build_models(backends, args.seed)
    nudged_nn, replayed_nn = nudged(models["nn"]), copy.deepcopy(models["nn"])
    warm_up(models, data)
    runs = [train(label, model, data, args.epochs, args.seed) for label, model in models.items()]
    baseline = train("nn +1ulp", nudged_nn, data, args.epochs, args.seed)
    lockstep = Lockstep(models)
    train("lockstep", replayed_nn, data, args.epochs, args.seed, check=lockstep)
    print_epochs(runs)
    print_lockstep(lockstep)
    print_free_differences(runs, baseline)
    step_repeats, bn_repeats = args.timing_steps, 4 * args.timing_steps
    step_times = time_steps(models, data, step_repeats)
    bn_times = time_bn_layers(backends, bn_repeats)
    print_timing(runs, step_times, bn_times, step_repeats, bn_repeats)
    return runs


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    backends = bnm.available_backends()
    print(
        f"torch {torch.__version__}, backends of ours: {', '.join(backends)}, devices: {', '.join(devices())},"
        f" {torch.get_num_threads()} CPU threads"
    )
    training_section(backends, args)
    section("2. Parity with nn.BatchNorm2d (forward and backward)")
    failures = print_parity(backends, args.seed)
    section("3. Hard input: large offsets in float32")
    failures += print_hard_input(backends, args.seed)
    verdict = "every error within tolerance" if failures == 0 else f"{failures} errors above tolerance (marked *)"
    print(f"\n{verdict}; done in {time.perf_counter() - start:.1f} s", flush=True)
    return failures


if __name__ == "__main__":
    sys.exit(1 if main() else 0)
