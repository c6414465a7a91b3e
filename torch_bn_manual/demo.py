"""Batch norm, ours against nn.BatchNorm2d: training, speed, parity, hard inputs.

    python -m torch_bn_manual.demo [--epochs N] [--quick] [--seed S] [--png FILE]

What is compared: torch.nn.BatchNorm2d against this package's BatchNorm2d, one
column per backend of ours ("python": torch ops with a hand-written backward;
"cpp": the compiled kernels). Every comparison runs the same inputs, weights
and batches through each column.

1. Training. A small conv net (three conv-BN-ReLU blocks, pooling, linear) on
   scikit-learn's 8x8 digits, trained from the same initial weights on the
   same batches with the same SGD, once with nn.BatchNorm2d and once with each
   of our backends (and with the fused BN+ReLU layers, where this version has
   them). Loss and test accuracy per epoch; per-step loss and gradient
   differences, step by step from nn's weights (lockstep) and over the free runs.
2. Speed. A training step of that net, its batch norm layer, and a ResNet-style
   layer (32x64x56x56) in both memory formats, nn time / ours.
3. Parity. Forward and backward of one BatchNorm2d in training mode against
   nn.BatchNorm2d, for every backend, device and dtype, as relative errors.
4. Hard input. float32 values with a large offset (1e4, 1e6), where a float32
   mean or E[x^2] - E[x]^2 loses digits: max abs error against float64 math.

Ends with a verdict and writes a picture (--png, default demo.png in the
current directory; needs matplotlib). Exits with status 1 when an error in 3.
or 4. is above its tolerance.
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


def threads_text(word="thread"):
    n = torch.get_num_threads()
    return f"{n} {word}{'s' if n != 1 else ''}"


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
    if hasattr(bnm, "fuse_activations"):  # fused BN+ReLU layers, in versions that have them
        backend = "cpp" if "cpp" in backends else backends[0]
        models["ours-fused"] = bnm.fuse_activations(bnm.convert_batchnorm(copy.deepcopy(base), backend=backend),
                                                    backend=backend)
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

    On the same batch, each computes its loss and gradients. Kept per step: |loss - loss_nn|, the
    relative gradient error (max|g - g_ref| / max|g_ref|, the largest over the parameters) against
    nn and against float64, and whether any ReLU input fell on the other side of 0 than in float64
    (a "flip": rounding moved a value that lies within an ulp of 0, and the ReLU's gradient there
    switches between 0 and 1, so the gradient error is no longer a rounding error).
    """

    def __init__(self, models):
        self.exact = copy.deepcopy(models["nn"]).double().train()
        self.nn = copy.deepcopy(models["nn"]).train()  # nn's pre-activations, without touching the run
        self.models = {label: copy.deepcopy(m).train() for label, m in models.items()
                       if label != "nn" and count_relus(m) == count_relus(models["nn"])}
        self.loss = {label: [] for label in self.models}
        self.grad_vs_nn = {label: [] for label in self.models}
        self.grad_vs_exact = {label: [] for label in ["nn"] + list(self.models)}
        self.flip = {label: [] for label in ["nn"] + list(self.models)}

    def __call__(self, reference, x, y, reference_loss):
        _, exact, exact_signs = self.gradients(self.exact, reference, x.double(), y)
        theirs = [p.grad.double() for p in reference.parameters()]
        self.grad_vs_exact["nn"].append(largest_relative_error(theirs, exact))
        self.flip["nn"].append(signs_differ(self.relu_signs(self.nn, reference, x), exact_signs))
        for label, model in self.models.items():
            loss, grads, signs = self.gradients(model, reference, x, y)
            self.loss[label].append(abs(loss - reference_loss))
            self.grad_vs_nn[label].append(largest_relative_error(grads, theirs))
            self.grad_vs_exact[label].append(largest_relative_error(grads, exact))
            self.flip[label].append(signs_differ(signs, exact_signs))

    @staticmethod
    def gradients(model, reference, x, y):
        """Loss, parameter gradients (as float64) and ReLU input signs of model from reference's state."""
        model.load_state_dict(reference.state_dict())
        model.zero_grad(set_to_none=True)
        with relu_inputs(model) as inputs:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss.item(), [p.grad.double() for p in model.parameters()], [t > 0 for t in inputs]

    @staticmethod
    def relu_signs(model, reference, x):
        model.load_state_dict(reference.state_dict())
        with torch.no_grad(), relu_inputs(model) as inputs:
            model(x)
        return [t > 0 for t in inputs]

    def without_flips(self, label):
        """The gradient errors against float64 at the steps where no ReLU input flipped."""
        return [e for e, flip in zip(self.grad_vs_exact[label], self.flip[label]) if not flip]


def signs_differ(signs, reference):
    return any(bool((a != b).any()) for a, b in zip(signs, reference))


def count_relus(model):
    return sum(isinstance(m, nn.ReLU) for m in model.modules())


class relu_inputs:
    """Collects the input of every nn.ReLU of a model during a forward."""

    def __init__(self, model):
        self.model, self.inputs = model, []

    def __enter__(self):
        relus = [m for m in self.model.modules() if isinstance(m, nn.ReLU)]
        self.hooks = [m.register_forward_hook(lambda _m, args, _out: self.inputs.append(args[0].detach())) for m in relus]
        return self.inputs

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()


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
    print("\n  Per epoch: the mean training loss and the test accuracy of each run. Same weights, same")
    print("  batches, same SGD: the columns should agree to the last digits early on, and stay close.")
    headers = ["epoch"] + [f"loss {r.label}" for r in runs] + [f"acc {r.label}" for r in runs]
    rows = []
    for e in range(len(runs[0].epoch_losses)):
        losses = [f"{r.epoch_losses[e]:.5f}" for r in runs]
        accs = [f"{r.epoch_accs[e]:.2%}" for r in runs]
        rows.append([e + 1] + losses + accs)
    print_table(headers, rows)


def print_lockstep(lockstep):
    steps = len(lockstep.grad_vs_exact["nn"])
    print(f"\n  Lockstep: nn's run is replayed; at each of its {steps} steps, each of ours (and nn in float64)")
    print("  starts from nn's weights and running stats and computes the loss and the gradients on the same")
    print("  batch. This isolates one step of batch norm from SGD's amplification of earlier differences.")
    print("    loss:       max |loss - loss_nn| over the steps")
    print("    grads~X:    max|g - g_X| / max|g_X| per parameter tensor, the largest over the tensors,")
    print("                against nn and against float64 math (f64); median and max over the steps")
    print("    flips:      steps where some ReLU input lies on the other side of 0 than in float64")
    print("    max w/o:    max grads~f64 over the other steps: what batch norm's rounding alone does")

    def median_and_max(errors):
        return [fmt_err(statistics.median(errors)), fmt_err(max(errors))]

    def flips_and_clean_max(label):
        clean = lockstep.without_flips(label)
        return [sum(lockstep.flip[label]), fmt_err(max(clean)) if clean else "-"]

    rows = [["nn", "-", "-", "-"] + median_and_max(lockstep.grad_vs_exact["nn"]) + flips_and_clean_max("nn")]
    for label in lockstep.models:
        loss = fmt_err(max(lockstep.loss[label]))
        rows.append([label, loss] + median_and_max(lockstep.grad_vs_nn[label])
                    + median_and_max(lockstep.grad_vs_exact[label]) + flips_and_clean_max(label))
    headers = ["backend", "loss", "grads~nn median", "max", "grads~f64 median", "max", "flips", "max w/o"]
    print_table(headers, rows)
    print("  The max column is set by the flips: a ReLU input within an ulp of 0 (one float32 rounding")
    print("  apart from float64) switches that unit's gradient between 0 and 1, for nn as for ours; which")
    print("  run meets such a step depends on the inputs, not on the backend. Without those steps every")
    print("  column stays at float32 rounding (max w/o).")


def print_free_differences(runs, baseline):
    """runs[0] is nn; baseline is nn started one ulp away, for scale."""
    print("\n  Free-running: |loss - loss_nn| per step in the training runs above, where each run keeps its")
    print(f"  own weights. SGD amplifies any rounding difference step by step; {baseline.label}, nn itself")
    print("  started from weights one float32 step (ulp) away, shows how far that goes on its own.")
    rows = []
    for run in runs[1:] + [baseline]:
        first, largest, step = loss_differences(runs[0], run)
        rows.append([run.label, fmt_err(first), fmt_err(largest), step])
    print_table(["run", "epoch 1", "whole run", "at step"], rows)


def print_timing(runs, step_times, bn_times, step_repeats, bn_repeats):
    print(f"\n  Time of the demo net, float32 on the CPU, {threads_text()}; nn time / ours,")
    print("  > 1 means ours is faster (the machine may be shared: compare columns, not runs).")
    print(f"    step run:  training step (forward, backward, SGD; batch {BATCH}), mean over the training run above")
    print(f"    step:      the same, median of {step_repeats} steps on one batch, implementations taking turns")
    print(f"    BN layer:  one BatchNorm2d forward + backward, {tuple(BN_TIMING_SHAPE)}, median of {bn_repeats}")
    rows = []
    for run in runs:
        step, bn = step_times[run.label], bn_times.get(run.label)
        rows.append([
            run.label,
            f"{1e3 * run.seconds / len(run.step_losses):.2f}",
            f"{1e3 * step:.2f}",
            f"{step_times['nn'] / step:.2f}x",
            "-" if bn is None else f"{1e6 * bn:.0f}",
            "-" if bn is None else f"{bn_times['nn'] / bn:.2f}x",
        ])
    headers = ["backend", "step run ms", "step ms", "step vs nn", "BN layer us", "BN vs nn"]
    print_table(headers, rows)
    print("  This net is tiny (64x32x8x8 is 131k values): a step is mostly per-call overhead (Python, the")
    print("  dispatcher, autograd), which nn and the cpp backend pay alike. The python backend runs about")
    print("  ten torch ops per pass where nn runs one kernel: it is the readable version, not the fast one.")


# ----------------------------------------------------------------------------- speed at ResNet size

RESNET_SHAPE = (32, 64, 56, 56)  # the input of ResNet-18/50's first batch norms, batch 32
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def fused_available():
    """The fused batch norm + activation layers, in versions of this package that have them."""
    return hasattr(bnm, "BatchNormAct2d")


def layer_call(module, x, dy, mode, activation=False):
    """One timed call: train forward + backward, or eval forward without autograd."""
    if mode == "eval":
        module.eval()
        xe = x.detach()

        def call():
            with torch.no_grad():
                y = module(xe)
                return F.relu(y) if activation else y
    else:
        module.train()

        def call():
            x.grad = None
            module.zero_grad(set_to_none=True)
            y = module(x)
            (F.relu(y) if activation else y).backward(dy)
    return call


def resnet_layers(backends, repeats, shape=RESNET_SHAPE):
    """[(layout, mode, {label: seconds})]: one BatchNorm2d of a ResNet, nn and our compiled backend.

    The python backend is left out here: at this size it takes 10-25 times nn's time (the demo net's
    table shows it), which would only make the demo slow.

    glibc's allocator is left at its defaults, as in a user's training loop (benchmarks/bench.py
    also reports the kernels' own speed with freed memory kept).
    """
    g = torch.Generator().manual_seed(0)
    results = []
    for layout, fmt in LAYOUTS.items():
        x = torch.randn(shape, generator=g).contiguous(memory_format=fmt).requires_grad_()
        dy = torch.randn(shape, generator=g).contiguous(memory_format=fmt)
        for mode in ("train fwd+bwd", "eval"):
            calls = {"nn": layer_call(nn.BatchNorm2d(shape[1]), x, dy, mode)}
            for backend in backends:
                calls[f"ours-{backend}"] = layer_call(bnm.BatchNorm2d(shape[1], backend=backend), x, dy, mode)
            results.append((layout, mode, interleaved_median(calls, repeats, warmup=2)))
    return results


def fused_layers(backend, repeats, shape=RESNET_SHAPE):
    """[(layout, mode, {label: seconds})] for batch norm + ReLU: nn, ours unfused, ours fused."""
    g = torch.Generator().manual_seed(1)
    results = []
    for layout, fmt in LAYOUTS.items():
        x = torch.randn(shape, generator=g).contiguous(memory_format=fmt).requires_grad_()
        dy = torch.randn(shape, generator=g).contiguous(memory_format=fmt)
        for mode in ("train fwd+bwd", "eval"):
            calls = {
                "nn BN+ReLU": layer_call(nn.BatchNorm2d(shape[1]), x, dy, mode, activation=True),
                f"ours-{backend} BN+ReLU": layer_call(bnm.BatchNorm2d(shape[1], backend=backend), x, dy, mode,
                                                      activation=True),
                f"ours-{backend} fused": layer_call(bnm.BatchNormAct2d(shape[1], backend=backend), x, dy, mode),
            }
            results.append((layout, mode, interleaved_median(calls, repeats, warmup=2)))
    return results


def print_layer_table(results, explanation):
    labels = list(results[0][2])
    print(explanation)
    headers = ["layout", "mode"] + [f"{label} ms" for label in labels] + [f"nn/{label}" for label in labels[1:]]
    rows = []
    for layout, mode, times in results:
        rows.append([layout, mode] + [f"{1e3 * times[label]:.2f}" for label in labels]
                    + [f"{times[labels[0]] / times[label]:.2f}x" for label in labels[1:]])
    print_table(headers, rows)


def speed_section(backends, args, runs, step_times, bn_times):
    """Prints the speed tables; returns {row label: nn time / ours} for the plot and the verdict."""
    section("2. Speed: the demo net, and a ResNet-style layer where the kernels are meant to win")
    step_repeats, bn_repeats = args.timing_steps, 4 * args.timing_steps
    print_timing(runs, step_times, bn_times, step_repeats, bn_repeats)
    ratios = {f"demo net step {label}": step_times["nn"] / t for label, t in step_times.items() if label != "nn"}
    ratios.update({f"demo net BN {label}": bn_times["nn"] / t for label, t in bn_times.items() if label != "nn"})

    repeats = args.layer_repeats
    fast = [b for b in backends if b != "python"]
    if not fast:
        print("\n  No compiled backend is built: the ResNet-style layer is not timed (the python backend is the")
        print("  readable version, not the fast one).")
        return ratios
    layers = resnet_layers(fast, repeats)
    print_layer_table(layers, (
        f"\n  One BatchNorm2d at {'x'.join(map(str, RESNET_SHAPE))} float32 (a ResNet's first batch norm at batch 32,\n"
        f"  25.7 MB per tensor): train forward + backward, and eval (no autograd), in both memory formats;\n"
        f"  median of {repeats} calls, the columns taking turns; nn/X > 1 means X is faster. glibc's allocator at its\n"
        "  defaults, as a training loop has it. Here the work is the memory passes, not the per-call overhead.\n"
        "  On contiguous input the kernels make fewer passes than nn; on channels_last both make the same\n"
        "  passes at the memory's speed (docs/performance.md)."))
    for layout, mode, times in layers:
        for label, t in times.items():
            if label != "nn":
                ratios[f"ResNet {layout} {mode} {label}"] = times["nn"] / t
    if fused_available():
        backend = "cpp" if "cpp" in backends else backends[0]
        fused = fused_layers(backend, repeats)
        print_layer_table(fused, (
            "\n  The same layer followed by a ReLU, as in every conv block: nn (BatchNorm2d then ReLU), ours\n"
            "  unfused (then ReLU), and ours fused (BatchNormAct2d: the ReLU applied inside the batch norm's\n"
            "  passes, so no extra pass over memory)."))
        for layout, mode, times in fused:
            label = f"ours-{backend} fused"
            ratios[f"ResNet {layout} {mode} BN+ReLU {label}"] = times["nn BN+ReLU"] / times[label]
    return ratios


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
    """(table row, number of errors above tolerance, the errors or a message)."""
    head = [backend, device, dtype_name(dtype)]
    errors = parity_case(backend, device, dtype, seed)
    if isinstance(errors, str):
        failed = errors.startswith("ERROR")
        return head + [errors] + [""] * (len(COMPARED) + 3), int(failed), errors
    tol = TOLERANCE[dtype]
    cells = [fmt_err(errors[k]) + (" *" if errors[k] > tol else "  ") for k in COMPARED]
    over = sum(errors[k] > tol for k in COMPARED)
    status = "ok" if over == 0 else "ABOVE TOL"
    return head + cells + [fmt_err(tol), fmt_err(errors["nn~f64"]), fmt_err(errors["ours~f64"]), status], over, errors


def print_parity(backends, seed):
    """Prints the parity table; returns (errors above tolerance, {dtype: largest error of ours vs nn})."""
    headers = ["backend", "device", "dtype"] + list(COMPARED) + ["tol", "y nn~f64", "y ours~f64", "status"]
    rows, failures, worst = [], 0, {}
    for backend in backends:
        for device in devices():
            for dtype in DTYPES:
                row, over, errors = parity_row(backend, device, dtype, seed)
                rows.append(row)
                failures += over
                if isinstance(errors, dict):
                    largest = max(errors[k] for k in COMPARED)
                    worst[dtype] = max(worst.get(dtype, 0.0), largest)
    print(f"  One BatchNorm2d in training mode, input {tuple(PARITY_SHAPE)} ~ 2 N(0,1) + 0.5, random weight, bias")
    print("  and grad_output, for every backend, device and dtype. Each column is max|ours - nn| / max|nn|:")
    print("    y, dx, dweight, dbias: the output and the three gradients;  running: running_mean and _var")
    print("    after the step. Half dtypes take float32 weight and bias, as nn.BatchNorm2d does.")
    print("    tol: the largest accepted (* = above); y nn~f64, y ours~f64: each one's y against float64 math")
    print("    on the same input values. Differences of about one rounding step of the dtype are expected:")
    print("    nn and ours round at different points.")
    print_table(headers, rows)
    return failures, worst


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
    """Prints the hard-input table; returns (errors above tolerance, [(input, device, {label: error})])."""
    labels = ["nn"] + [f"ours-{b}" for b in backends]
    rows, failures, results = [], 0, []
    for device in devices():
        for offset in HARD_OFFSETS:
            errors = hard_input_errors(offset, backends, device, seed)
            over = [label for label in labels[1:] if errors[label] > HARD_TOLERANCE]
            failures += len(over)
            cells = [fmt_err(errors[label]) + (" *" if label in over else "  ") for label in labels]
            rows.append([f"{offset:.0e} + N(0,1)", device] + cells)
            results.append((f"{offset:.0e} + N(0,1)", device, errors))
    print(f"  float32 input {tuple(HARD_SHAPE)} far from 0, training mode; each column is max |y - y_float64|,")
    print("  float64 math on the same float32 values. Batch norm's output is about N(0, 1) whatever the offset,")
    print("  so an error of 1e-2 is 1% of the signal. A float32 mean of values near 1e6 is off by up to half")
    print("  an ulp of 1e6 (0.03); ours keep the statistics in float64 and a two-pass (or Welford) variance.")
    print(f"  Ours should be <= {HARD_TOLERANCE:.0e};  * = above.")
    print_table(["input", "device"] + labels, rows)
    return failures, results


# ----------------------------------------------------------------------------- main


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m torch_bn_manual.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 8, --quick 1)")
    parser.add_argument("--quick", action="store_true", help="a short run: 1 epoch, fewer timed steps")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, split, batch order and inputs")
    parser.add_argument("--png", default="demo.png", help="picture to write (default demo.png; '' for none)")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 1 if args.quick else 8
    args.timing_steps = 5 if args.quick else 50
    args.layer_repeats = 3 if args.quick else 15
    return args


INTRO = """\
What is compared: torch.nn.BatchNorm2d against this package's BatchNorm2d, one column per backend
of ours: "python" (batch norm in torch ops with a hand-written backward, the readable version) and
"cpp" (compiled kernels), where built. 1. trains the same small conv net with each, from the same
weights on the same batches, and shows how closely the runs agree; 2. times a step of that net and a
ResNet-sized layer; 3. compares one layer's outputs and gradients with nn's in every dtype; 4. feeds
float32 inputs far from 0, where batch norm's statistics lose digits, and measures the error against
float64 math. It ends with a verdict and a picture."""


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
    step_times = time_steps(models, data, args.timing_steps)
    bn_times = time_bn_layers(backends, 4 * args.timing_steps)
    return runs, baseline, lockstep, step_times, bn_times


def print_verdict(results):
    """A few lines that sum up the run, from its own measurements."""
    runs, baseline, failures = results["runs"], results["baseline"], results["failures"]
    section("Verdict")
    worst = results["parity"]
    float32 = f"largest float32 difference {fmt_err(worst[torch.float32])}" if torch.float32 in worst else ""
    free = max(loss_differences(runs[0], run)[1] for run in runs[1:]) if len(runs) > 1 else 0.0
    print(f"- Parity: {'every output and gradient within tolerance' if failures == 0 else f'{failures} above tolerance'}"
          f" of nn.BatchNorm2d ({float32}).")
    print(f"  Training from the same weights gives the same losses; the runs drift apart by {fmt_err(free)} at most,")
    print(f"  where nn against itself one ulp away drifts by {fmt_err(loss_differences(runs[0], baseline)[1])}:"
          " rounding amplified by SGD, not a different batch norm.")
    hard = [r for r in results["hard"] if r[1] == "cpu"][-1]
    ours_hard = max(v for k, v in hard[2].items() if k != "nn")
    print(f"- Accuracy: at {hard[0]} in float32, nn's output is off by {fmt_err(hard[2]['nn'])} and ours by at most"
          f" {fmt_err(ours_hard)}")
    print(f"  ({hard[2]['nn'] / max(ours_hard, 1e-30):.0e} times less), from float64 statistics and a stable variance.")
    speed = results["ratios"]
    layer = {k: v for k, v in speed.items() if k.startswith("ResNet") and "python" not in k}
    demo_steps = [v for k, v in speed.items() if k.startswith("demo net step") and "python" not in k]
    if layer and demo_steps:
        print(f"- Speed: on the ResNet-style layer, nn time / ours = {min(layer.values()):.2f}x to"
              f" {max(layer.values()):.2f}x in this run (glibc defaults);")
        print(f"  on the tiny demo net, where per-call overhead dominates, {min(demo_steps):.2f}x. The python backend")
        print("  is the readable version, not the fast one. Timings on a shared machine move from run to run.")
    else:
        print("- Speed: no compiled backend is built; the python backend is the readable version, not the fast one.")
    print("- Read next: README.md (usage, what is tested), docs/performance.md (where the time goes, `make bench`),")
    print("  docs/derivation.md (the math of the forward and backward).")


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    backends = bnm.available_backends()
    print(INTRO)
    print(
        f"\ntorch {torch.__version__}, backends of ours: {', '.join(backends)}, devices: {', '.join(devices())},"
        f" {threads_text('CPU thread')}"
    )
    runs, baseline, lockstep, step_times, bn_times = training_section(backends, args)
    ratios = speed_section(backends, args, runs, step_times, bn_times)
    section("3. Parity with nn.BatchNorm2d (forward and backward)")
    failures, worst = print_parity(backends, args.seed)
    section("4. Hard input: large offsets in float32")
    hard_failures, hard = print_hard_input(backends, args.seed)
    failures += hard_failures
    results = {"runs": runs, "baseline": baseline, "failures": failures, "parity": worst, "hard": hard,
               "ratios": ratios, "lockstep": lockstep}
    print_verdict(results)
    if args.png:
        from ._demo_plot import draw

        draw(results, args.png)
    verdict = "every error within tolerance" if failures == 0 else f"{failures} errors above tolerance (marked *)"
    print(f"\n{verdict}; done in {time.perf_counter() - start:.1f} s", flush=True)
    return failures


if __name__ == "__main__":
    sys.exit(1 if main() else 0)
