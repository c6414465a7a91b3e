"""Output strides equal torch.nn's for every input layout (ATen's rules, _layout.py).

CPU: nn allocates its output (and the input's gradient) in the first memory
format the input is dense in when every per-channel tensor is contiguous,
else in the input's suggested format; ambiguous strides (size-1 dims) give
channels_last where suggest_memory_format() says contiguous. Both backends,
the compiled kernels and their fake (meta) kernels must agree with it.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import torch_bn_manual as bnm
from torch_bn_manual import _layout

from helpers import rel_err

SHAPES = [(1, 2, 3, 1), (2, 3, 4, 5), (2, 3, 1, 1), (1, 3, 1, 4), (1, 1, 2, 2), (4, 3), (1, 3), (2, 3, 4),
          (2, 1, 3), (2, 3, 1, 2, 2), (1, 2, 1, 1, 3)]


def _orders(nd):
    """Memory orders (outermost first): all of them up to 4 dims, a few telling ones for 5."""
    if nd <= 4:
        return list(itertools.permutations(range(nd)))
    return [(0, 1, 2, 3, 4), (0, 2, 3, 4, 1), (1, 0, 2, 3, 4), (4, 3, 2, 1, 0), (2, 0, 3, 1, 4), (0, 3, 1, 2, 4)]


def layouts(x):
    """x in many orders of its dims (dense), and a non-dense slice."""
    nd = x.dim()
    for perm in _orders(nd):
        yield f"order{perm}", x.permute(perm).contiguous().permute([perm.index(i) for i in range(nd)])
    wide = torch.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
    wide[..., ::2] = x
    yield "strided", wide[..., ::2]


# Fewer shapes for the slower checks: an ambiguous 4-D one, 2-D, 3-D and 5-D.
FEW_SHAPES = [(1, 2, 3, 1), (4, 3), (2, 3, 4), (2, 3, 1, 2, 2)]


def cases(shapes=SHAPES):
    for shape in shapes:
        x = torch.randn(shape, dtype=torch.float64) + 0.5
        for name, layout in layouts(x):
            for training in (True, False):
                if training and x.numel() // shape[1] == 1:
                    continue
                yield shape, name, layout, training


@pytest.mark.parametrize("contiguous_weight", [True, False], ids=["weight", "strided_weight"])
def test_output_and_grad_strides_match_nn(backend, contiguous_weight):
    checked = 0
    for shape, name, x, training in cases(SHAPES if contiguous_weight else FEW_SHAPES):
        channels = shape[1]
        w = torch.randn(channels if contiguous_weight else 2 * channels, dtype=torch.float64)
        w = w if contiguous_weight else w[::2]
        b = torch.randn(channels, dtype=torch.float64)
        stats = torch.randn(channels, dtype=torch.float64), torch.rand(channels, dtype=torch.float64) + 0.5
        dy = torch.randn(shape, dtype=torch.float64)
        outs = []
        # nn on x for the strides; values from nn on a contiguous copy: nn's CPU backward
        # computes wrong gradients for ambiguous strides (e.g. (1, 2, 3, 1) with strides
        # (6, 1, 2, 1) in training: its kernel walks the input as contiguous while it is
        # laid out channels_last); ours are right there.
        # Likewise nn's CPU kernels read a strided weight as if it were contiguous.
        for bn, inp, weight in ((F.batch_norm, x, w), (F.batch_norm, x.contiguous(), w.contiguous()),
                                (lambda *a: bnm.batch_norm(*a, backend=backend), x, w)):
            xr = inp.detach().requires_grad_()
            y = bn(xr, stats[0].clone(), stats[1].clone(), weight, b, training)
            (grad,) = torch.autograd.grad(y, xr, dy)
            outs.append((y, grad))
        (y_nn, g_nn), (y_ref, g_ref), (y, g) = outs
        assert y.stride() == y_nn.stride(), (shape, name, training)
        assert rel_err(y, y_ref) <= 1e-12 and rel_err(g, g_ref) <= 1e-10, (shape, name, training)
        if backend == "cpp":  # the python backend's gradients follow torch's elementwise ops
            assert g.stride() == g_nn.stride(), (shape, name, training)
        checked += 1
    assert checked > (200 if contiguous_weight else 40)


def test_pytorch_batchnorm_non_contig(backend):
    """PyTorch's test_batchnorm_non_contig (test_nn.py), on our module."""
    x = torch.arange(6, dtype=torch.float).reshape(1, 3, 2, 1).permute(0, 2, 1, 3)
    bn = bnm.BatchNorm2d(2, backend=backend).eval()
    bn.weight.data.uniform_()
    bn.bias.data.uniform_()
    ref = torch.nn.BatchNorm2d(2).eval()
    ref.load_state_dict(bn.state_dict())
    out, ref_out = bn(x), ref(x.detach().clone().contiguous())
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert ref_out.is_contiguous()
    torch.testing.assert_close(out, ref_out)
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.arange(24, dtype=dtype).reshape(1, 3, 2, 4).permute(0, 2, 1, 3)
        mixed = bnm.BatchNorm2d(2, backend=backend).eval()
        ref = torch.nn.BatchNorm2d(2).eval()
        torch.testing.assert_close(ref(x.float()), mixed(x).float(), atol=0.05, rtol=0.05)


@pytest.mark.skipif("cpp" not in bnm.available_backends(), reason="compiled extension not built")
def test_fake_kernels_give_the_kernels_strides():
    ops = torch.ops.torch_bn_manual
    for shape, name, x, training in cases(FEW_SHAPES):
        channels = shape[1]
        w, b = torch.randn(channels, dtype=torch.float64), torch.randn(channels, dtype=torch.float64)
        rm, rv = torch.zeros(channels, dtype=torch.float64), torch.ones(channels, dtype=torch.float64)
        dy = torch.randn(shape, dtype=torch.float64).permute(*reversed(range(len(shape)))).contiguous().permute(
            *reversed(range(len(shape))))
        calls = {
            "train": lambda t, w, b, rm, rv, dy: ops.batch_norm_train_forward(t, w, b, 1e-5)[0],
            "eval": lambda t, w, b, rm, rv, dy: ops.batch_norm_eval_forward(t, w, b, rm, rv, 1e-5),
            "elementwise": lambda t, w, b, rm, rv, dy: ops.batch_norm_elementwise(t, w, b, rm, rv),
            "backward": lambda t, w, b, rm, rv, dy: ops.batch_norm_backward(dy, t, w, rm, rv, training, 1e-5,
                                                                            [True, True, True])[0],
        }
        for op, call in calls.items():
            real = call(x, w, b, rm, rv, dy)
            with FakeTensorMode() as mode:
                fakes = [mode.from_tensor(t) for t in (x, w, b, rm, rv, dy)]
                fake = call(*fakes)
            assert fake.stride() == real.stride(), (op, shape, name)


def test_nn_cpu_gradient_is_wrong_for_ambiguous_strides():
    """Documents the nn defect the test above steps around (docs/architecture.md)."""
    x = torch.randn(1, 3, 2, 1, dtype=torch.float64).permute(0, 2, 1, 3)
    dy = torch.randn(1, 2, 3, 1, dtype=torch.float64)
    grads = []
    for inp in (x, x.contiguous()):
        xr = inp.detach().requires_grad_()
        grads.append(torch.autograd.grad(F.batch_norm(xr, None, None, training=True), xr, dy)[0])
    assert rel_err(grads[0], grads[1]) > 1e-3


def test_cuda_rule_keeps_dense_strides_unless_cudnn(monkeypatch):
    """The CUDA rule (checked against nn on a GPU by tests/test_cuda.py), on meta tensors."""
    rows = torch.empty(5, 3, device="meta").t().contiguous().t()  # (N, C) with the samples innermost
    ncl_last = torch.empty(4, 6, 3, device="meta").transpose(1, 2)  # (N, C, L) with the channels innermost
    w = torch.empty(3, device="meta")
    strided = torch.empty(4, 3, 10, device="meta")[..., ::2]
    rule = _layout.cuda_output_strides
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: False)
    assert rule(rows, w, w, True) == rows.stride()
    assert rule(ncl_last, w, w, True) == ncl_last.stride()
    assert rule(strided, None, None, True) == (15, 5, 1)
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 90000)
    assert rule(ncl_last, w, w, True) == (18, 6, 1)  # cuDNN: the suggested (contiguous) format
    assert rule(ncl_last, None, None, True) == ncl_last.stride()  # no weight: ATen's kernels
    assert rule(ncl_last.bfloat16(), w, w, False) == ncl_last.stride()  # bfloat16: ATen's kernels
    assert rule(rows, w, w, True) == rows.stride()  # 2-D: never cuDNN
