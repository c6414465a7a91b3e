"""Train a small conv net with SyncBatchNorm under DistributedDataParallel.

    torchrun --nproc_per_node=2 examples/ddp_train.py            # CPU, gloo
    torchrun --nproc_per_node=2 examples/ddp_train.py --device cuda   # one GPU per rank, NCCL

Data: scikit-learn's 8x8 digits (1797 images, 10 classes). Each step draws a
global batch and splits it unevenly over the ranks (rank r gets a different
number of images), which SyncBatchNorm handles exactly: the batch statistics
are those of the whole global batch. Rank 0 prints the loss of every step.

At the end every rank compares its parameters and batch norm buffers with
rank 0's, bit for bit, prints OK and exits 0, or names what differs and exits 1.
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64, help="global batch size, split over the ranks")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--backend", choices=["auto", "python", "cpp"], default="auto",
                        help="torch_bn_manual backend of the batch norm layers")
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
        if rank == 0:
            print(f"step {step:3d}  loss {total.item() / args.batch:.4f}", flush=True)

    ok = states_identical(model.module, rank)
    if rank == 0:
        model.eval()
        with torch.no_grad():
            accuracy = (model.module(test_x.to(device)).argmax(1).cpu() == test_y).float().mean().item()
        print(f"held-out accuracy (eval mode, running statistics): {accuracy:.3f}")
        print("OK: parameters and running statistics are identical on every rank" if ok
              else "FAILED: ranks disagree", flush=True)
    # Tear down in order: DDP (its reducer holds the group) first, then, once
    # rank 0 has finished evaluating, the group itself.
    del model, optimizer
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
