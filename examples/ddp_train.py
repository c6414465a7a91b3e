"""Train a small conv net with SyncBatchNorm under DistributedDataParallel.

    torchrun --nproc_per_node=2 examples/ddp_train.py            # CPU, gloo
    torchrun --nproc_per_node=2 examples/ddp_train.py --device cuda   # one GPU per rank, NCCL

Data: scikit-learn's 8x8 digits (1797 images, 10 classes). Each step draws a
global batch and splits it unevenly over the ranks (rank r gets a different
number of images), which SyncBatchNorm handles exactly: the batch statistics
are those of the whole global batch. Rank 0 prints the loss of every step.

At the end every rank compares its parameters and batch norm buffers with
rank 0's, bit for bit, prints OK and exits 0, or names what differs and exits 1.
Then rank 0 trains the same net again in one process with plain torch.nn
(nn.BatchNorm2d, the whole global batch per step, the same initial weights,
batches and SGD) and prints both runs side by side: the losses agree to
float32 rounding and the held-out accuracy is the same, which is what
synchronized batch norm promises (--no-compare skips this).

The default 40 steps (2560 images, under two passes over the 1500 training
images) are a quick check, not a training run: the weights still change fast,
so the running statistics (averaged over the last ~10 steps, momentum 0.1)
lag behind them, and the held-out accuracy in eval mode is about 0.69 where
the batch's own statistics would give about 0.94. The one-process nn run gets
the same 0.69. Train longer for a real result: --steps 200 reaches about 0.97.
Without torchrun it runs as a single process (world size 1).
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch_bn_manual as bnm  # noqa: E402


def make_net() -> nn.Module:
    """Plain torch.nn layers; convert_sync_batchnorm swaps the batch norms."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def load_digits():
    """(train_x, train_y, test_x, test_y): images (N, 1, 8, 8) scaled to [0, 1]; a fixed split."""
    from sklearn.datasets import load_digits as sklearn_digits
    data = sklearn_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return x[:1500], y[:1500], x[1500:], y[1500:]


def shard_sizes(batch: int, world_size: int) -> list:
    """An uneven split of `batch` over the ranks: rank r's share grows with r."""
    weights = [r + 1 for r in range(world_size)]
    sizes = [batch * w // sum(weights) for w in weights]
    sizes[-1] += batch - sum(sizes)
    return sizes


def init_distributed(device: str):
    if "RANK" not in os.environ:  # not under torchrun: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def states_identical(model: nn.Module, rank: int) -> bool:
    """Compare every parameter and buffer with rank 0's copy, exactly."""
    ok = True
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        reference = tensor.detach().clone()
        dist.broadcast(reference, src=0)
        if not torch.equal(tensor.detach(), reference):
            print(f"rank {rank}: {name} differs from rank 0", flush=True)
            ok = False
    flag = torch.tensor([0 if ok else 1], device=reference.device)
    dist.all_reduce(flag)
    return int(flag.item()) == 0


def train_in_one_process(args, train_x, train_y, test_x, test_y):
    """The same run with plain torch.nn in this process: (loss per step, held-out accuracy)."""
    torch.manual_seed(0)  # the initial weights of the distributed run
    model = make_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    sampler = torch.Generator().manual_seed(1)  # the same global batches
    losses = []
    for _ in range(args.steps):
        batch = torch.randint(0, len(train_y), (args.batch,), generator=sampler)
        loss = F.cross_entropy(model(train_x[batch]), train_y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, held_out_accuracy(model, test_x, test_y)


def held_out_accuracy(model, test_x, test_y) -> float:
    model.eval()
    with torch.no_grad():
        return (model(test_x).argmax(1).cpu() == test_y).float().mean().item()


def print_comparison(ddp_losses, ddp_accuracy, nn_losses, nn_accuracy, args, world_size):
    print(f"\nthe same run in one process with torch.nn (nn.BatchNorm2d, the whole batch of {args.batch} per step):")
    print("  step  loss DDP+SyncBatchNorm  loss nn, one process")
    shown = sorted({0, 1, 2, len(nn_losses) // 2, len(nn_losses) - 2, len(nn_losses) - 1} & set(range(len(nn_losses))))
    for step in shown:
        print(f"  {step:4d}  {ddp_losses[step]:20.6f}  {nn_losses[step]:20.6f}")
    largest = max(abs(a - b) for a, b in zip(ddp_losses, nn_losses))
    print(f"  largest loss difference over the {len(nn_losses)} steps: {largest:.1e} (float32 rounding: the"
          f" {world_size} ranks sum in a different order)")
    print(f"  held-out accuracy: DDP+SyncBatchNorm {ddp_accuracy:.3f}, nn in one process {nn_accuracy:.3f}")
    images = args.steps * args.batch
    passes = f"{args.steps} steps show the net {images} images, {images / 1500:.1f} passes over the 1500 training images"
    if ddp_accuracy >= 0.95:
        print(f"\n{passes}: trained.", flush=True)
        return
    print(f"\n{passes}. While the weights still")
    print("change fast, the running statistics (momentum 0.1: about the last 10 steps) lag behind them, and eval"
          " mode pays for it;")
    print("the nn run gets the same accuracy, so it is the short training, not the batch norm. For a trained net"
          " (about 0.97), run longer:")
    print(f"  torchrun --nproc_per_node={world_size} examples/ddp_train.py --steps 200", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64, help="global batch size, split over the ranks")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--backend", choices=["auto", "python", "cpp"], default="auto",
                        help="torch_bn_manual backend of the batch norm layers")
    parser.add_argument("--no-compare", action="store_true",
                        help="skip the one-process torch.nn run that rank 0 prints next to this one")
    args = parser.parse_args()

    rank, world_size = init_distributed(args.device)
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)

    model = bnm.convert_sync_batchnorm(make_net())
    for layer in model.modules():
        if isinstance(layer, bnm.SyncBatchNorm):
            layer.backend = args.backend
    model = DDP(model.to(device))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    train_x, train_y, test_x, test_y = load_digits()
    sizes = shard_sizes(args.batch, world_size)
    start = sum(sizes[:rank])
    if rank == 0:
        print(f"world size {world_size}, global batch {args.batch} split {sizes}, "
              f"backends {bnm.available_backends()}", flush=True)

    sampler = torch.Generator().manual_seed(1)  # the same global batches on every rank
    losses = []
    for step in range(args.steps):
        batch = torch.randint(0, len(train_y), (args.batch,), generator=sampler)
        mine = batch[start:start + sizes[rank]]
        x, y = train_x[mine].to(device), train_y[mine].to(device)
        # DDP averages gradients over ranks; scaling each shard's summed loss by
        # world_size / batch makes that average the gradient of the global mean loss.
        loss_sum = F.cross_entropy(model(x), y, reduction="sum")
        optimizer.zero_grad()
        (loss_sum * (world_size / args.batch)).backward()
        optimizer.step()
        total = loss_sum.detach().clone()
        dist.all_reduce(total)  # for printing only
        losses.append(total.item() / args.batch)
        if rank == 0:
            print(f"step {step:3d}  loss {losses[-1]:.4f}", flush=True)

    ok = states_identical(model.module, rank)
    if rank == 0:
        accuracy = held_out_accuracy(model.module, test_x.to(device), test_y)
        print(f"held-out accuracy (eval mode, running statistics): {accuracy:.3f}")
        print("OK: parameters and running statistics are identical on every rank" if ok
              else "FAILED: ranks disagree", flush=True)
        if not args.no_compare:
            nn_losses, nn_accuracy = train_in_one_process(args, train_x, train_y, test_x, test_y)
            print_comparison(losses, accuracy, nn_losses, nn_accuracy, args, world_size)
    # Tear down in order: DDP (its reducer holds the group) first, then, once
    # rank 0 has finished evaluating, the group itself.
    del model, optimizer
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
