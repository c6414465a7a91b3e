"""SyncBatchNorm over real torch.distributed process groups (gloo on 127.0.0.1).

Each world size is spawned once per test session (a module fixture): every
rank runs all scenarios, saves what it computed to a file, and the checks run
here in the parent, against nn.BatchNorm*d on the concatenated global batch in
float64. A worker that fails, or a group that hangs, makes every test that
needs its results fail with the worker's traceback.
"""
import collections
import datetime
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import torch_bn_manual as bnm
from torch_bn_manual import SyncBatchNorm, convert_sync_batchnorm

BACKENDS = bnm.available_backends()   # conftest.py parametrizes `backend` over the same list
GROUP_TIMEOUT_S = 120        # the whole spawned group, start to finish
COLLECTIVE_TIMEOUT_S = 40    # gloo: a rank stuck in a collective raises after this

# ---------------------------------------------------------------------------
# The cases: data and layer options shared by the workers and the reference
# ---------------------------------------------------------------------------

# Global batch sizes, split over the ranks in rank order (uneven, empty ranks).
SPLITS = {2: [3, 5], 3: [4, 0, 3]}

# feature shape (C, *spatial); dtype of input; options of the layer.
CASES = {
    "2d": dict(shape=(4, 3, 3), steps=3),
    "1d_momentum_none": dict(shape=(4, 5), momentum=None, steps=3),
    "flat_one_sample_rank": dict(shape=(3,), affine=False, steps=2, splits={2: [1, 4], 3: [4, 0, 1]}),
    "3d_no_bias": dict(shape=(2, 2, 2, 3), bias=False, steps=2),
    "no_running_stats": dict(shape=(3, 4, 4), track_running_stats=False, steps=2),
    "float32_channels_last": dict(shape=(4, 3, 3), dtype=torch.float32, channels_last=True, steps=2),
    "half_input": dict(shape=(4, 3, 3), dtype=torch.float16, steps=2),
}
DEFAULTS = dict(momentum=0.1, affine=True, bias=True, track_running_stats=True,
                dtype=torch.float64, channels_last=False)


def _case(name):
    return {**DEFAULTS, **CASES[name]}


def _splits(case, world_size):
    return case.get("splits", SPLITS)[world_size]


def _shard(tensor, splits, rank):
    start = sum(splits[:rank])
    return tensor[start:start + splits[rank]]


def _param_dtype(case):
    return torch.float32 if case["dtype"] in (torch.float16, torch.bfloat16) else case["dtype"]


def _batch(case, splits, step):
    """Global input and output gradient of one step, float64 values representable in case dtype."""
    g = torch.Generator().manual_seed(1000 + step)
    n = sum(splits)
    x = (3.0 + 2.0 * torch.randn((n,) + case["shape"], generator=g, dtype=torch.float64))
    dy = torch.randn((n,) + case["shape"], generator=g, dtype=torch.float64)
    return x.to(case["dtype"]).double(), dy.to(case["dtype"]).double()


def _init_params(module, seed=7):
    """Deterministic non-trivial weight and bias, identical in workers and reference."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if module.weight is not None:
            module.weight.copy_(1.0 + 0.3 * torch.randn(module.weight.shape, generator=g, dtype=torch.float64))
        if module.bias is not None:
            module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=g, dtype=torch.float64))


def _reference_cls(dim):
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[dim]


def _reference_layer(case):
    """The nn layer that the synced layers together must equal, in float64."""
    cls = _reference_cls(len(case["shape"]) + 1)
    layer = cls(case["shape"][0], momentum=case["momentum"], affine=case["affine"],
                track_running_stats=case["track_running_stats"], bias=case["bias"], dtype=torch.float64)
    _init_params(layer)
    return layer


def _sync_layer(case, backend, process_group=None, device="cpu"):
    layer = SyncBatchNorm(case["shape"][0], momentum=case["momentum"], affine=case["affine"],
                          track_running_stats=case["track_running_stats"], process_group=process_group,
                          dtype=_param_dtype(case), backend=backend, bias=case["bias"]).to(device)
    _init_params(layer)
    return layer


def _cpu(t):
    return None if t is None else t.detach().to("cpu").clone()


def _train_steps(layer, case, splits, rank, device):
    """Forward/backward on this rank's shard for each step, then eval; what it computed."""
    steps = []
    for step in range(case["steps"]):
        x, dy = _batch(case, splits, step)
        x = _shard(x, splits, rank).to(device=device, dtype=case["dtype"])
        dy = _shard(dy, splits, rank).to(device=device, dtype=case["dtype"])
        if case["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
            dy = dy.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        y = layer(x)
        y.backward(dy)
        steps.append(dict(
            y=_cpu(y), dx=_cpu(x.grad), y_dtype=y.dtype,
            y_channels_last=y.is_contiguous(memory_format=torch.channels_last) and y.dim() == 4,
            dw=_cpu(None if layer.weight is None else layer.weight.grad),
            db=_cpu(None if layer.bias is None else layer.bias.grad)))
        layer.zero_grad(set_to_none=True)
    layer.eval()
    with torch.no_grad():
        y_eval = layer(x.detach())
    layer.train()
    return dict(steps=steps, y_eval=_cpu(y_eval),
                running_mean=_cpu(layer.running_mean), running_var=_cpu(layer.running_var),
                num_batches_tracked=_cpu(layer.num_batches_tracked))


# ---------------------------------------------------------------------------
# Scenarios, run in every rank of a spawned group
# ---------------------------------------------------------------------------

def scenario_exact(rank, world_size, device, backend):
    """Every case: shards of the global batch through one synced layer per rank."""
    out = {}
    for name in CASES:
        case = _case(name)
        layer = _sync_layer(case, backend, device=device)
        out[name] = _train_steps(layer, case, _splits(case, world_size), rank, device)
    return out


def scenario_subgroup(rank, world_size, device, backend):
    """world 3: ranks {0, 2} sync with each other, rank 1 is a group of its own."""
    pair = dist.new_group([0, 2])
    alone = dist.new_group([1])
    case = _case("2d")
    layer = _sync_layer(case, backend, process_group=alone if rank == 1 else pair, device=device)
    return _train_steps(layer, case, [4, 2, 3], rank, device)


_COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce",
                "reduce_scatter_tensor", "reduce_scatter", "broadcast", "reduce", "gather", "scatter",
                "all_to_all_single", "all_to_all", "all_gather_object", "broadcast_object_list", "barrier")


def scenario_collectives(rank, world_size, device, backend):
    """How many collectives (by torch.distributed function) each phase of a two-layer net makes."""
    torch.manual_seed(0)
    net = nn.Sequential(SyncBatchNorm(3, backend=backend), nn.Conv2d(3, 4, 1),
                        SyncBatchNorm(4, momentum=None, backend=backend)).double().to(device)
    counts = collections.Counter()
    originals = {}
    for name in _COLLECTIVES:
        if hasattr(dist, name):
            originals[name] = getattr(dist, name)

            def counting(*args, _name=name, **kwargs):
                counts[_name] += 1
                return originals[_name](*args, **kwargs)
            setattr(dist, name, counting)
    phases = {}
    try:
        n = [2, 0, 3][rank] if world_size == 3 else [2, 3][rank]
        x = torch.randn(n, 3, 4, 4, dtype=torch.float64, device=device, requires_grad=True)
        y = net(x)
        phases["forward"] = dict(counts)
        counts.clear()
        y.square().sum().backward()
        phases["backward"] = dict(counts)
        counts.clear()
        net.eval()
        with torch.no_grad():
            net(x)
        phases["eval"] = dict(counts)
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return phases


def _ddp_net():
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8, momentum=None), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    ).double()


DDP_STEPS = 5
DDP_SPLITS = {2: [3, 5], 3: [5, 0, 3]}


def _ddp_batch(step, n):
    g = torch.Generator().manual_seed(50 + step)
    x = torch.randn(n, 3, 6, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (n,), generator=g)
    return x, labels


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def scenario_ddp(rank, world_size, device, backend):
    """A small conv net under DDP; the loss of each shard is scaled so that DDP's
    gradient average equals the gradient of the mean loss over the global batch."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    splits = DDP_SPLITS[world_size]
    n = sum(splits)
    net = convert_sync_batchnorm(_ddp_net())
    for m in net.modules():
        if isinstance(m, SyncBatchNorm):
            m.backend = backend
    model = DDP(net.to(device))
    opt = _sgd(model.parameters())
    for step in range(DDP_STEPS):
        x, labels = _ddp_batch(step, n)
        x, labels = _shard(x, splits, rank).to(device), _shard(labels, splits, rank).to(device)
        loss = F.cross_entropy(model(x), labels, reduction="sum") * (world_size / n)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: _cpu(v) for k, v in model.module.state_dict().items()}


SCENARIOS = {"exact": scenario_exact, "subgroup": scenario_subgroup,
             "collectives": scenario_collectives, "ddp": scenario_ddp}


def _worker(rank, world_size, init_method, jobs, out_dir, device):
    """One rank: join the group, run every (scenario, backend) job, save the results."""
    results, status = {}, 0
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        for scenario, backend in jobs:
            results[(scenario, backend)] = SCENARIOS[scenario](rank, world_size, device, backend)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        results["error"] = f"rank {rank}:\n{traceback.format_exc()}"
        status = 1
    path = os.path.join(out_dir, f"rank{rank}.pt")
    torch.save(results, path + ".tmp")
    os.replace(path + ".tmp", path)
    os._exit(status)  # no lingering gloo threads keep the process alive


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(world_size, jobs, out_dir, device="cpu", timeout=GROUP_TIMEOUT_S):
    """Spawn `world_size` ranks, wait (bounded), and return their results in rank order.

    Every process is gone when this returns: on a failure the others get a few
    seconds to finish, then are killed.
    """
    ctx = mp.get_context("spawn")
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    procs = [ctx.Process(target=_worker, args=(r, world_size, init_method, jobs, str(out_dir), device),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    try:
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            if any(p.exitcode not in (None, 0) for p in procs):
                deadline = min(deadline, time.monotonic() + 5)
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
    errors, results = [], []
    for r, p in enumerate(procs):
        path = os.path.join(str(out_dir), f"rank{r}.pt")
        result = torch.load(path, weights_only=False) if os.path.exists(path) else {}
        if "error" in result:
            errors.append(result["error"])
        elif p.exitcode != 0:
            errors.append(f"rank {r}: exit code {p.exitcode} (killed after {timeout} s, or crashed)")
        results.append(result)
    if errors:
        raise AssertionError("distributed workers failed:\n" + "\n".join(errors))
    return results


def _group_fixture(world_size, jobs, tmp_path_factory, device="cpu"):
    try:
        return run_group(world_size, jobs, tmp_path_factory.mktemp(f"world{world_size}"), device), None
    except AssertionError as error:
        return None, str(error)


def _need(results_and_error):
    results, error = results_and_error
    if error is not None:
        pytest.fail(error, pytrace=False)
    return results


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    jobs = [(s, b) for b in BACKENDS for s in ("exact", "collectives")] + [("ddp", BACKENDS[-1])]
    return _group_fixture(2, jobs, tmp_path_factory)


@pytest.fixture(scope="module")
def world3(tmp_path_factory):
    jobs = [(s, b) for b in BACKENDS for s in ("exact", "subgroup", "collectives")] + [("ddp", BACKENDS[-1])]
    return _group_fixture(3, jobs, tmp_path_factory)


# ---------------------------------------------------------------------------
# Checks against the global batch
# ---------------------------------------------------------------------------

def _tolerances(dtype):
    return {torch.float64: dict(rtol=1e-10, atol=1e-10),
            torch.float32: dict(rtol=1e-5, atol=2e-5),
            torch.float16: dict(rtol=1e-2, atol=1e-2)}[dtype]


def _reference_run(case, splits, batches):
    """nn in float64 on the concatenated batch: per step (y, dx, dw, db); then eval outputs per shard."""
    layer = _reference_layer(case)
    steps = []
    for x, dy in batches:
        x.requires_grad_(True)
        y = layer(x)
        y.backward(dy)
        steps.append(dict(y=y.detach(), dx=x.grad,
                          dw=None if layer.weight is None else layer.weight.grad.clone(),
                          db=None if layer.bias is None else layer.bias.grad.clone()))
        layer.zero_grad(set_to_none=True)
    layer.eval()
    with torch.no_grad():
        # Eval is not synced: without running stats each shard uses its own batch statistics.
        y_eval = [layer(_shard(x.detach(), splits, r)) for r in range(len(splits))]
    return layer, steps, y_eval


def _assert_close(actual, expected, tol, what):
    torch.testing.assert_close(actual.double(), expected.double(), **tol, msg=lambda m: f"{what}: {m}")


def _check_case(name, per_rank, splits, batches=None):
    """per_rank[r]: what rank r computed on shard r of the global batch (split by `splits`);
    batches: the global (x, dy) of each step, by default those the workers drew."""
    case = _case(name)
    tol = _tolerances(case["dtype"])
    if batches is None:
        batches = [_batch(case, splits, step) for step in range(case["steps"])]
    ref, ref_steps, ref_eval = _reference_run(case, splits, batches)
    world_size = len(splits)
    for step, expected in enumerate(ref_steps):
        for rank in range(world_size):
            got = per_rank[rank]["steps"][step]
            where = f"{name} step {step} rank {rank}"
            assert got["y_dtype"] == case["dtype"], where
            if case["channels_last"] and splits[rank] > 1:
                assert got["y_channels_last"], f"{where}: output lost channels_last"
            _assert_close(got["y"], _shard(expected["y"], splits, rank), tol, f"{where} output")
            _assert_close(got["dx"], _shard(expected["dx"], splits, rank), tol, f"{where} grad_input")
        for key in ("dw", "db"):
            shares = [per_rank[r]["steps"][step][key] for r in range(world_size)]
            if expected[key] is None:
                assert all(s is None for s in shares), f"{name} {key}: unexpected gradient"
                continue
            # Each rank holds its own share; DDP sums them.
            _assert_close(torch.stack([s.double() for s in shares]).sum(0), expected[key],
                          tol, f"{name} step {step} {key} summed over ranks")
    for rank in range(world_size):
        got = per_rank[rank]
        where = f"{name} rank {rank}"
        if case["track_running_stats"]:
            _assert_close(got["running_mean"], ref.running_mean, tol, f"{where} running_mean")
            _assert_close(got["running_var"], ref.running_var, tol, f"{where} running_var")
            assert int(got["num_batches_tracked"]) == case["steps"], where
            # Not only close: the same bits on every rank.
            assert torch.equal(got["running_mean"], per_rank[0]["running_mean"]), where
            assert torch.equal(got["running_var"], per_rank[0]["running_var"]), where
        else:
            assert got["running_mean"] is None and got["running_var"] is None, where
        _assert_close(got["y_eval"], ref_eval[rank], tol, f"{where} eval output")


@pytest.mark.parametrize("case", list(CASES))
def test_world2_matches_global_batch(world2, backend, case):
    results = _need(world2)
    _check_case(case, [r[("exact", backend)][case] for r in results], _splits(_case(case), 2))


@pytest.mark.parametrize("case", list(CASES))
def test_world3_with_empty_rank_matches_global_batch(world3, backend, case):
    results = _need(world3)
    assert 0 in _splits(_case(case), 3)
    _check_case(case, [r[("exact", backend)][case] for r in results], _splits(_case(case), 3))


def test_subgroup_syncs_only_its_ranks(world3, backend):
    results = _need(world3)
    per_rank = [r[("subgroup", backend)] for r in results]
    # Ranks 0 and 2 form one batch of 4 + 3; rank 1 is a batch of 2 on its own.
    case, splits = _case("2d"), [4, 2, 3]
    batches = [_batch(case, splits, step) for step in range(case["steps"])]
    pair = [tuple(torch.cat([_shard(t, splits, 0), _shard(t, splits, 2)]) for t in b) for b in batches]
    alone = [tuple(_shard(t, splits, 1) for t in b) for b in batches]
    _check_case("2d", [per_rank[0], per_rank[2]], [4, 3], pair)
    _check_case("2d", [per_rank[1]], [2], alone)


@pytest.mark.parametrize("world", ["world2", "world3"])
def test_one_collective_per_forward_and_per_backward(world, backend, request):
    results = _need(request.getfixturevalue(world))
    layers = 2
    for rank, r in enumerate(results):
        phases = r[("collectives", backend)]
        gathers = {k: v for k, v in phases["forward"].items()}
        assert sum(gathers.values()) == layers, (rank, phases)
        assert set(gathers) <= {"all_gather_single", "all_gather_into_tensor", "all_gather"}, (rank, phases)
        assert phases["backward"] == {"all_reduce": layers}, (rank, phases)
        assert phases["eval"] == {}, (rank, phases)


def _ddp_reference(world_size):
    """The same net with nn.BatchNorm2d, one process, the full batch, mean loss."""
    net = _ddp_net()
    opt = _sgd(net.parameters())
    n = sum(DDP_SPLITS[world_size])
    for step in range(DDP_STEPS):
        x, labels = _ddp_batch(step, n)
        loss = F.cross_entropy(net(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.state_dict()


@pytest.mark.parametrize("world", ["world2", "world3"])
def test_ddp_training_matches_single_process_full_batch(world, request):
    results = _need(request.getfixturevalue(world))
    world_size = len(results)
    expected = _ddp_reference(world_size)
    for rank, r in enumerate(results):
        got = r[("ddp", BACKENDS[-1])]
        assert set(got) == set(expected)
        for key, value in expected.items():
            if value.is_floating_point():
                torch.testing.assert_close(got[key], value, rtol=1e-9, atol=1e-9,
                                           msg=lambda m, k=key: f"rank {rank} {k}: {m}")
            else:
                assert torch.equal(got[key], value), (rank, key)
            assert torch.equal(got[key], results[0][("ddp", BACKENDS[-1])][key]), (rank, key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_two_ranks_one_gpu_gloo(tmp_path):
    backends = []
    for backend in BACKENDS:
        try:
            bnm.backends.get_backend(backend, torch.device("cuda"))
            backends.append(backend)
        except RuntimeError:
            pass
    jobs = [("exact", b) for b in backends] + [("collectives", backends[-1])]
    results = run_group(2, jobs, tmp_path, device="cuda")
    for backend in backends:
        for case in CASES:
            _check_case(case, [r[("exact", backend)][case] for r in results], _splits(_case(case), 2))


# ---------------------------------------------------------------------------
# In this process (no process group): the layer is an ordinary batch norm
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("momentum", [0.1, None])
def test_without_process_group_matches_batchnorm(backend, momentum):
    assert not dist.is_initialized()
    torch.manual_seed(0)
    ours = SyncBatchNorm(3, momentum=momentum, dtype=torch.float64, backend=backend)
    ref = nn.BatchNorm2d(3, momentum=momentum, dtype=torch.float64)
    _init_params(ours)
    _init_params(ref)
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
        xr = x.detach().clone().requires_grad_(True)
        y, yr = ours(x), ref(xr)
        dy = torch.randn_like(y)
        y.backward(dy)
        yr.backward(dy)
        torch.testing.assert_close(y, yr)
        torch.testing.assert_close(x.grad, xr.grad)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert ours.num_batches_tracked == ref.num_batches_tracked
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x.detach()), ref(x.detach()))


@pytest.mark.parametrize("shape, message", [
    ((3,), "expected at least 2D input (got 1D input)"),
    ((), "expected at least 2D input (got 0D input)"),
    ((4, 0, 2), "SyncBatchNorm number of input channels should be non-zero"),
])
def test_input_errors_like_nn(shape, message):
    for layer in (SyncBatchNorm(3), nn.SyncBatchNorm(3)):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            layer(torch.randn(shape))
        assert layer.num_batches_tracked == 0


def test_channel_mismatch_and_single_value_errors_leave_buffers():
    layer = SyncBatchNorm(3)
    with pytest.raises(RuntimeError, match="running_mean should contain 4 elements not 3"):
        layer(torch.randn(2, 4))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        layer(torch.randn(1, 3))
    assert layer.num_batches_tracked == 0
    assert torch.equal(layer.running_mean, torch.zeros(3))


def test_constructor_signature_and_backend_check():
    layer = SyncBatchNorm(5, 1e-3, None, False, False, None, "cpu", torch.float64, "python")
    assert (layer.eps, layer.momentum, layer.affine, layer.track_running_stats) == (1e-3, None, False, False)
    assert layer.backend == "python" and "backend='python'" in repr(layer)
    # nn.SyncBatchNorm's base, not nn.SyncBatchNorm: DDP rejects those in CPU modules.
    assert isinstance(layer, nn.modules.batchnorm._BatchNorm) and not isinstance(layer, nn.SyncBatchNorm)
    assert layer.state_dict() == {}
    ours, theirs = SyncBatchNorm(5), nn.SyncBatchNorm(5)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict())
    assert repr(ours).replace(type(ours).__name__, "") == repr(theirs).replace(type(theirs).__name__, "")
    assert SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm2d(2)).__class__ is SyncBatchNorm
    with pytest.raises(ValueError, match="backend"):
        SyncBatchNorm(5, backend="fortran")


def test_convert_sync_batchnorm_keeps_state():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4),
                        nn.Sequential(bnm.BatchNorm1d(4, backend="python", momentum=None)),
                        nn.SyncBatchNorm(4, affine=False), nn.BatchNorm3d(4, bias=False))
    net[1].weight.requires_grad_(False)
    net[1].running_mean.fill_(0.5)
    net.eval()
    originals = [net[1], net[2][0], net[3], net[4]]
    group = object()  # any process group object is only stored
    converted = convert_sync_batchnorm(net, process_group=group)
    assert converted is net
    new = [net[1], net[2][0], net[3], net[4]]
    for old, layer in zip(originals, new):
        assert type(layer) is SyncBatchNorm
        assert layer.process_group is group
        assert not layer.training
        for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
            assert getattr(layer, attr) == getattr(old, attr), attr
        for attr in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert getattr(layer, attr) is getattr(old, attr), attr
    assert not net[1].weight.requires_grad and net[1].bias.requires_grad
    assert net[2][0].backend == "python" and net[1].backend == "auto"
    single = nn.BatchNorm1d(2)
    assert type(convert_sync_batchnorm(single)) is SyncBatchNorm
