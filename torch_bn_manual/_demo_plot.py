"""The demo's picture: training loss, hard-input errors and speed ratios, one panel each.

Kept apart from demo.py so that matplotlib is imported only when a picture is asked for,
and the demo runs without it.
"""


def draw(results, path):
    """Writes the three panels to `path`; prints a line saying so, or why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"\nno picture: matplotlib is not installed (pip install matplotlib); {path} not written", flush=True)
        return False

    fig, (loss_ax, hard_ax, speed_ax) = plt.subplots(1, 3, figsize=(18, 5.6), gridspec_kw={"width_ratios": [1, 0.8, 1.3]})
    _training_loss(loss_ax, results["runs"])
    _hard_input(hard_ax, results["hard"])
    _speed(speed_ax, results["ratios"])
    fig.suptitle("torch_bn_manual BatchNorm2d against torch.nn.BatchNorm2d (python -m torch_bn_manual.demo)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"\npicture written to {path}", flush=True)
    return True


def _training_loss(ax, runs):
    styles = ["-", "--", ":", "-."]
    for k, run in enumerate(runs):
        steps = range(1, len(run.step_losses) + 1)
        ax.plot(steps, run.step_losses, styles[k % len(styles)], linewidth=2.2 - 0.5 * k, label=run.label)
    ax.set_yscale("log")
    ax.set_xlabel("training step (batch of 64 digits)")
    ax.set_ylabel("training loss (cross-entropy, log scale)")
    ax.set_title("Training: same weights, same batches\n(the curves lie on top of each other)")
    ax.legend()
    ax.grid(True, alpha=0.3)


def _hard_input(ax, hard):
    rows = [r for r in hard if r[1] == "cpu"] or hard
    labels = list(rows[0][2])
    width = 0.8 / len(labels)
    for k, label in enumerate(labels):
        xs = [i + (k - (len(labels) - 1) / 2) * width for i in range(len(rows))]
        # An error of exactly 0 has no place on a log axis: drawn at a floor of 1e-9.
        ax.bar(xs, [max(r[2][label], 1e-9) for r in rows], width=width, label=label)
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), [f"float32 input\n{r[0]}" for r in rows])
    ax.set_ylabel("max |y - y_float64| (log scale, lower is better)")
    ax.set_title("Hard input: error of the output\nagainst float64 math")
    ax.legend(loc="upper left", bbox_to_anchor=(0.0, -0.18), ncol=3, frameon=False)
    ax.grid(True, axis="y", alpha=0.3)


def _speed(ax, ratios):
    labels = list(ratios)
    values = [ratios[k] for k in labels]
    colors = ["tab:green" if v >= 1 else "tab:red" for v in values]
    ax.barh(range(len(labels)), values, color=colors)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.2f}x", va="center", fontsize=8)
    ax.set_xlim(0, max(values + [1.0]) * 1.2)
    ax.set_xlabel("time of torch.nn / time of ours  (> 1: ours faster)")
    import torch

    threads = torch.get_num_threads()
    ax.set_title(f"Speed, float32 CPU, {threads} thread{'s' if threads > 1 else ''}, glibc defaults\n"
                 "ResNet layer: 32x64x56x56")
    ax.grid(True, axis="x", alpha=0.3)
