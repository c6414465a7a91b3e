"""torch.func transforms and forward-mode AD through our batch norm, against torch.nn in float64.

Every transform (grad, vmap(grad) per-sample gradients, jacrev, jvp, jacfwd,
forward_ad dual tensors) on every backend, train and eval, through the
modules and through bnm.batch_norm; including what nn does where it refuses
(vmap with unbatched running statistics in training, running statistics
that carry a tangent in eval). The same for the fused layers
(BatchNormAct*d, bnm.batch_norm_act) against nn's batch norm, + residual,
relu / leaky_relu / identity, the residual transformed too.
"""
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vmap

import torch_bn_manual as bnm

from helpers import rel_err
from test_activation_parity import NNBlock, nn_activation

TOL = 1e-10
KINDS = {  # ours, nn, input shape
    "1d-rows": (bnm.BatchNorm1d, nn.BatchNorm1d, (6, 3)),
    "1d": (bnm.BatchNorm1d, nn.BatchNorm1d, (4, 3, 5)),
    "2d": (bnm.BatchNorm2d, nn.BatchNorm2d, (3, 4, 2, 3)),
    "3d": (bnm.BatchNorm3d, nn.BatchNorm3d, (2, 2, 2, 3, 2)),
}


def fresh(shape, offset=0.0):
    return torch.randn(shape, dtype=torch.float64) * 1.5 + offset


def pair(kind, backend, training, track_running_stats=True):
    """Our module and nn's with the same random parameters and statistics."""
    ours_cls, nn_cls, shape = KINDS[kind]
    channels = shape[1]
    ours = ours_cls(channels, backend=backend, dtype=torch.float64, track_running_stats=track_running_stats)
    ref = nn_cls(channels, dtype=torch.float64, track_running_stats=track_running_stats)
    with torch.no_grad():
        ours.weight.copy_(fresh(channels, 1.0))
        ours.bias.copy_(fresh(channels))
        if track_running_stats:
            ours.running_mean.copy_(fresh(channels))
            ours.running_var.copy_(fresh(channels).abs() + 0.5)
    ref.load_state_dict(ours.state_dict())
    ours.train(training)
    ref.train(training)
    return ours, ref, shape


def assert_close(a, b):
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_close(x, y)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            try:
                assert_close(a[key], b[key])
            except AssertionError as error:
                raise AssertionError(f"{key}: {error}") from None
    else:
        assert a.shape == b.shape and a.dtype == b.dtype
        assert rel_err(a, b) <= TOL


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_module_transforms_match_nn(kind, backend, training):
    # In training, nn (and so ours) cannot count num_batches_tracked under a
    # grad transform: the training modules here do not track statistics.
    ours, ref, shape = pair(kind, backend, training, track_running_stats=not training)
    x = fresh(shape, 0.5)
    tx = fresh(shape)
    # per-sample gradients: each sample its own batch of 2 (training needs > 1 value per channel)
    samples = torch.stack([fresh((2,) + shape[1:]) for _ in range(3)])
    results = []
    for module in (ours, ref):
        params = {k: v.detach() for k, v in module.named_parameters()}

        def loss(p, inp, module=module):
            return (functional_call(module, p, (inp,)) ** 2 * torch.arange(inp.numel(), dtype=inp.dtype)
                    .view(inp.shape).cos()).sum()

        def out(inp, module=module):
            return module(inp)

        results.append({
            "grad": grad(loss)(params, x),
            "grad_input": grad(loss, argnums=1)(params, x),
            "per_sample": vmap(grad(loss), in_dims=(None, 0))(params, samples),
            "jacrev": jacrev(out)(x),
            "jvp": jvp(out, (x,), (tx,)),
            "jacfwd": jacfwd(out)(x),
            "vmap": vmap(out)(samples),
        })
    assert_close(results[0], results[1])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_ad_dual_tensors_match_nn(backend, training):
    for kind in KINDS:
        ours, ref, shape = pair(kind, backend, training)
        x, tx = fresh(shape, -0.3), fresh(shape)
        tw, tb = fresh(shape[1]), fresh(shape[1])
        outs = []
        for module in (ours, ref):
            with fwAD.dual_level():
                params = {"weight": fwAD.make_dual(module.weight.detach(), tw),
                          "bias": fwAD.make_dual(module.bias.detach(), tb)}
                y = functional_call(module, params, (fwAD.make_dual(x, tx),))
                primal, tangent = fwAD.unpack_dual(y)
                outs.append((primal.clone(), tangent.clone(), module.running_mean.clone(), module.running_var.clone()))
        assert_close(outs[0], outs[1])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_functional_transforms_update_running_stats_as_nn(backend, training):
    """bnm.batch_norm with running statistics under grad/jacrev/jvp/jacfwd: same results and buffers as F."""
    shape = (4, 3, 2, 2)
    x, tx = fresh(shape), fresh(shape)
    w, b = fresh(3, 1.0), fresh(3)
    stats = (fresh(3), fresh(3).abs() + 0.5)
    runs = []
    for bn in (lambda *a, **k: bnm.batch_norm(*a, backend=backend, **k), F.batch_norm):
        rm, rv = stats[0].clone(), stats[1].clone()

        def out(inp, bn=bn, rm=rm, rv=rv):
            return bn(inp, rm, rv, w, b, training, 0.3, 1e-5)

        def loss(inp, weight, out=out, bn=bn, rm=rm, rv=rv):
            return (bn(inp, rm, rv, weight, b, training, 0.3, 1e-5) ** 3).sum()

        runs.append([grad(loss, argnums=(0, 1))(x, w), jacrev(out)(x), jvp(out, (x,), (tx,)), jacfwd(out)(x),
                     rm, rv])
    assert_close(runs[0], runs[1])


def test_vmap_training_with_running_stats_as_nn(backend):
    """Unbatched running statistics in training: nn's error; batched ones: per-sample updates as nn."""
    x = fresh((5, 4, 3, 2))
    w, b = fresh(3, 1.0), fresh(3)
    ours = lambda *a: bnm.batch_norm(*a, w, b, True, 0.1, 1e-5, backend=backend)  # noqa: E731
    ref = lambda *a: F.batch_norm(*a, w, b, True, 0.1, 1e-5)  # noqa: E731
    messages = []
    for bn in (ours, ref):
        rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        with pytest.raises(RuntimeError) as info:
            vmap(lambda inp, bn=bn, rm=rm, rv=rv: bn(inp, rm, rv))(x)
        messages.append(str(info.value))
        assert rm.abs().sum() == 0 and (rv == 1).all()  # nothing changed
    assert messages[0] == messages[1]
    outs = []
    stats = fresh((5, 3)), fresh((5, 3)).abs() + 0.5
    for bn in (ours, ref):
        rm, rv = stats[0].clone(), stats[1].clone()
        outs.append((vmap(bn)(x, rm, rv), rm, rv))
    assert_close(outs[0], outs[1])


def test_running_stat_tangents_raise_as_nn_in_eval(backend):
    x, w, b = fresh((4, 3, 2)), fresh(3, 1.0), fresh(3)
    for training in (True, False):
        results = []
        for bn in (lambda *a: bnm.batch_norm(*a, backend=backend), F.batch_norm):
            with fwAD.dual_level():
                rm = fwAD.make_dual(fresh(3), fresh(3))
                rv = fwAD.make_dual(fresh(3).abs() + 0.5, fresh(3))
                try:
                    y = bn(fwAD.make_dual(x, fresh(x.shape)), rm, rv, w, b, training)
                    results.append(("ok", fwAD.unpack_dual(y).primal.shape))
                except RuntimeError as error:
                    results.append(("raised", str(error)))
        assert results[0] == results[1], results
        assert results[0][0] == ("ok" if training else "raised")


def test_vmap_over_parameters_and_statistics(backend):
    """vmap over weight, bias and the running statistics (eval) and over the weight alone (training)."""
    x = fresh((4, 3, 2, 2))
    ws, bs, rms, rvs = fresh((5, 3), 1.0), fresh((5, 3)), fresh((5, 3)), fresh((5, 3)).abs() + 0.5
    ours = vmap(lambda w, b, m, v: bnm.batch_norm(x, m, v, w, b, False, backend=backend))(ws, bs, rms, rvs)
    ref = vmap(lambda w, b, m, v: F.batch_norm(x, m, v, w, b, False))(ws, bs, rms, rvs)
    assert_close(ours, ref)
    ours = vmap(lambda w: bnm.batch_norm(x, None, None, w, None, True, backend=backend))(ws)
    ref = vmap(lambda w: F.batch_norm(x, None, None, w, None, True))(ws)
    assert_close(ours, ref)


def test_plain_eager_keeps_the_compiled_autograd_nodes():
    """The routing leaves plain eager calls on the C++ autograd kernels (no Python Function)."""
    if "cpp" not in bnm.available_backends():
        pytest.skip("compiled extension not built")
    layer = bnm.BatchNorm2d(3, backend="cpp")
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    for training in (True, False):
        layer.train(training)
        assert "CppNode" in layer(x).grad_fn.name()
    with fwAD.dual_level():
        y = layer(fwAD.make_dual(x.detach(), torch.randn_like(x)))
        assert fwAD.unpack_dual(y).tangent is not None


# ---------------------------------------------------------------------------
# The fused layers: act(BN(x) + residual) against nn's batch norm, add and activation
# ---------------------------------------------------------------------------

FUSED_CLASSES = {bnm.BatchNorm1d: bnm.BatchNormAct1d, bnm.BatchNorm2d: bnm.BatchNormAct2d,
                 bnm.BatchNorm3d: bnm.BatchNormAct3d}
ACTIVATIONS = [("relu", 0.01), ("leaky_relu", 0.2), ("identity", 0.01)]


def fused_pair(kind, backend, training, activation, slope, track_running_stats=True):
    """Our fused module and nn's BatchNorm + add + activation (NNBlock), with the same random state."""
    plain, ref_bn, shape = pair(kind, backend, training, track_running_stats)
    ours = FUSED_CLASSES[type(plain)](shape[1], backend=backend, dtype=torch.float64, activation=activation,
                                      negative_slope=slope, track_running_stats=track_running_stats)
    ours.load_state_dict(plain.state_dict())
    ours.train(training)
    ref = NNBlock(ref_bn, activation, slope)
    ref.train(training)
    return ours, ref, shape


def _renamed(tree):
    """Parameter names without NNBlock's "bn." prefix, anywhere in a result."""
    if isinstance(tree, dict):
        return {key.removeprefix("bn."): _renamed(value) for key, value in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(_renamed(value) for value in tree)
    return tree


@pytest.mark.parametrize("activation, slope", ACTIVATIONS, ids=[a for a, _ in ACTIVATIONS])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_fused_module_transforms_match_nn(kind, backend, training, activation, slope):
    ours, ref, shape = fused_pair(kind, backend, training, activation, slope, track_running_stats=not training)
    x, z = fresh(shape, 0.5), fresh(shape)
    tx, tz = fresh(shape), fresh(shape)
    samples = torch.stack([fresh((2,) + shape[1:]) for _ in range(3)])
    residuals = torch.stack([fresh((2,) + shape[1:]) for _ in range(3)])
    shared_residual = fresh((2,) + shape[1:])
    results = []
    for module in (ours, ref):
        params = {k: v.detach() for k, v in module.named_parameters()}

        def loss(p, inp, res, module=module):
            return (functional_call(module, p, (inp, res)) ** 2 * torch.arange(inp.numel(), dtype=inp.dtype)
                    .view(inp.shape).cos()).sum()

        def out(inp, res, module=module):
            return module(inp, res)

        results.append(_renamed({
            "grad": grad(loss)(params, x, z),
            "grad_inputs": grad(loss, argnums=(1, 2))(params, x, z),
            "per_sample": vmap(grad(loss, argnums=(0, 1, 2)), in_dims=(None, 0, 0))(params, samples, residuals),
            "jacrev": jacrev(out, argnums=(0, 1))(x, z),
            "jvp": jvp(out, (x, z), (tx, tz)),
            "jacfwd": jacfwd(out, argnums=(0, 1))(x, z),
            "vmap": vmap(out)(samples, residuals),
            "vmap_input_only": vmap(out, in_dims=(0, None))(samples, shared_residual),
            "vmap_residual_only": vmap(out, in_dims=(None, 0))(samples[0], residuals),
        }))
    assert_close(results[0], results[1])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_forward_ad_dual_tensors_match_nn(backend, training):
    for kind in KINDS:
        for activation, slope in ACTIVATIONS:
            ours, ref, shape = fused_pair(kind, backend, training, activation, slope)
            x, tx, z, tz = fresh(shape, -0.3), fresh(shape), fresh(shape), fresh(shape)
            tw, tb = fresh(shape[1]), fresh(shape[1])
            outs = []
            for module, prefix in ((ours, ""), (ref, "bn.")):
                with fwAD.dual_level():
                    params = {prefix + "weight": fwAD.make_dual(ours.weight.detach(), tw),
                              prefix + "bias": fwAD.make_dual(ours.bias.detach(), tb)}
                    y = functional_call(module, params, (fwAD.make_dual(x, tx), fwAD.make_dual(z, tz)))
                    primal, tangent = fwAD.unpack_dual(y)
                    bn = getattr(module, "bn", module)
                    outs.append((primal.clone(), tangent.clone(), bn.running_mean.clone(), bn.running_var.clone()))
            assert_close(outs[0], outs[1])


def _fused_functional(backend, activation="leaky_relu", slope=0.2):
    """bnm.batch_norm_act and its nn counterpart, with F.batch_norm's positional arguments and a residual."""
    def ours(*args, residual=None):
        return bnm.batch_norm_act(*args, residual=residual, activation=activation, negative_slope=slope,
                                  backend=backend)

    def ref(*args, residual=None):
        t = F.batch_norm(*args)
        return nn_activation(t if residual is None else t + residual, activation, slope)
    return ours, ref


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_functional_transforms_update_running_stats_as_nn(backend, training):
    shape = (4, 3, 2, 2)
    x, tx, z = fresh(shape), fresh(shape), fresh(shape)
    w, b = fresh(3, 1.0), fresh(3)
    stats = (fresh(3), fresh(3).abs() + 0.5)
    runs = []
    for bn in _fused_functional(backend):
        rm, rv = stats[0].clone(), stats[1].clone()

        def out(inp, res, bn=bn, rm=rm, rv=rv):
            return bn(inp, rm, rv, w, b, training, 0.3, 1e-5, residual=res)

        def loss(inp, weight, res, bn=bn, rm=rm, rv=rv):
            return (bn(inp, rm, rv, weight, b, training, 0.3, 1e-5, residual=res) ** 3).sum()

        runs.append([grad(loss, argnums=(0, 1, 2))(x, w, z), jacrev(out)(x, z), jvp(out, (x, z), (tx, tx)),
                     jacfwd(out, argnums=1)(x, z), rm, rv])
    assert_close(runs[0], runs[1])


def test_fused_vmap_training_with_running_stats_as_nn(backend):
    x, z = fresh((5, 4, 3, 2)), fresh((5, 4, 3, 2))
    w, b = fresh(3, 1.0), fresh(3)
    messages = []
    for bn in _fused_functional(backend):
        rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        with pytest.raises(RuntimeError) as info:
            vmap(lambda inp, res, bn=bn, rm=rm, rv=rv: bn(inp, rm, rv, w, b, True, 0.1, 1e-5, residual=res))(x, z)
        messages.append(str(info.value))
        assert rm.abs().sum() == 0 and (rv == 1).all()  # nothing changed
    assert messages[0] == messages[1]
    outs = []
    stats = fresh((5, 3)), fresh((5, 3)).abs() + 0.5
    for bn in _fused_functional(backend):
        rm, rv = stats[0].clone(), stats[1].clone()
        outs.append((vmap(lambda inp, m, v, res, bn=bn: bn(inp, m, v, w, b, True, 0.1, 1e-5, residual=res))(
            x, rm, rv, z), rm, rv))
    assert_close(outs[0], outs[1])


def test_fused_running_stat_tangents_raise_as_nn_in_eval(backend):
    x, w, b, z = fresh((4, 3, 2)), fresh(3, 1.0), fresh(3), fresh((4, 3, 2))
    for training in (True, False):
        for input_tangent in (True, False):  # with the residual's tangent alone, nn's batch norm has none to refuse
            results = []
            for bn in _fused_functional(backend):
                with fwAD.dual_level():
                    rm = fwAD.make_dual(fresh(3), fresh(3))
                    rv = fwAD.make_dual(fresh(3).abs() + 0.5, fresh(3))
                    inp = fwAD.make_dual(x, fresh(x.shape)) if input_tangent else x
                    try:
                        y = bn(inp, rm, rv, w, b, training, residual=fwAD.make_dual(z, fresh(z.shape)))
                        results.append(("ok", fwAD.unpack_dual(y).primal.shape))
                    except RuntimeError as error:
                        results.append(("raised", str(error)))
            assert results[0] == results[1], results
            assert results[0][0] == ("ok" if training or not input_tangent else "raised")


def test_fused_vmap_over_parameters_statistics_and_residual(backend):
    x = fresh((4, 3, 2, 2))
    ws, bs, rms, rvs = fresh((5, 3), 1.0), fresh((5, 3)), fresh((5, 3)), fresh((5, 3)).abs() + 0.5
    zs = fresh((5, 4, 3, 2, 2))
    results = []
    for bn in _fused_functional(backend, "relu"):
        results.append([
            vmap(lambda w, b, m, v, z, bn=bn: bn(x, m, v, w, b, False, residual=z))(ws, bs, rms, rvs, zs),
            vmap(lambda w, z, bn=bn: bn(x, None, None, w, None, True, residual=z))(ws, zs),
            vmap(lambda w, bn=bn: bn(x, None, None, w, None, True))(ws),
        ])
    assert_close(results[0], results[1])


def test_plain_eager_keeps_the_compiled_fused_autograd_nodes():
    """The routing leaves plain eager fused calls on their C++ autograd kernels too."""
    if "cpp" not in bnm.available_backends():
        pytest.skip("compiled extension not built")
    layer = bnm.BatchNormAct2d(3, backend="cpp")
    x, z = torch.randn(4, 3, 2, 2, requires_grad=True), torch.randn(4, 3, 2, 2)
    for training in (True, False):
        layer.train(training)
        assert "CppNode" in layer(x, z).grad_fn.name()
    with fwAD.dual_level():
        y = layer(fwAD.make_dual(x.detach(), torch.randn_like(x)), z)
        assert fwAD.unpack_dual(y).tangent is not None


@pytest.mark.parametrize("activation, slope", ACTIVATIONS, ids=[a for a, _ in ACTIVATIONS])
def test_fused_backward_under_vmap_without_graph(backend, activation, slope):
    """jacrev under no_grad: the first-order backward runs under vmap (the compiled one has a batching rule)."""
    for training in (True, False):
        ours, ref, shape = fused_pair("2d", backend, training, activation, slope, track_running_stats=not training)
        x, z = fresh(shape, 0.5), fresh(shape)
        results = []
        for module in (ours, ref):
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("error")  # e.g. functorch's "performance drop" of a missing batching rule
                results.append(jacrev(lambda inp, res, module=module: module(inp, res), argnums=(0, 1))(x, z))
        assert_close(results[0], results[1])
