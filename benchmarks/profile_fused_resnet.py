"""The share of batch norm, ReLU and the residual add in a ResNet-18 training step, nn against fused (torch.profiler, one thread).

    python benchmarks/profile_fused_resnet.py   (run from the repository root)
"""
import sys, copy, torch, torch.nn.functional as F
sys.path.insert(0, "tests")
import torch_bn_manual as bnm
from resnets import resnet18
from torch.profiler import profile, ProfilerActivity
torch.set_num_threads(1)
torch.manual_seed(0)
x = torch.randn(32, 3, 112, 112); t = torch.randint(0, 1000, (32,))
ref = resnet18(num_classes=1000)
fused = bnm.fuse_activations(bnm.convert_batchnorm(copy.deepcopy(ref), "cpp"), "cpp")
for name, m in (("nn", ref), ("fused", fused)):
    step = lambda: F.cross_entropy(m(x), t).backward()
    step()
    with profile(activities=[ProfilerActivity.CPU]) as p:
        step()
    tot = 0.0; share = {}
    for e in p.key_averages():
        tot += e.self_cpu_time_total
        k = e.key
        if any(s in k for s in ("batch_norm", "relu", "threshold", "add", "torch_bn_manual", "Batch", "Relu", "Add")):
            share[k] = share.get(k, 0) + e.self_cpu_time_total
    bn = sum(share.values())
    print(name, f"step self-CPU total {tot/1e3:.0f} ms; batch norm/relu/add ops {bn/1e3:.0f} ms ({100*bn/tot:.1f}%)")
    for k, v in sorted(share.items(), key=lambda kv: -kv[1])[:8]:
        print(f"   {k:60s} {v/1e3:8.1f} ms")
