"""torch.autocast (AMP) on CPU: our layers inside a bfloat16 autocast region behave as nn's do."""
import copy

import torch
from torch import nn

import torch_bn_manual as bnm

from helpers import randn, rel_err


def test_autocast_training_step_matches_nn(backend, generator):
    torch.manual_seed(0)
    nn_model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                             nn.Linear(8 * 4 * 4, 4), nn.BatchNorm1d(4))
    ours = bnm.convert_batchnorm(copy.deepcopy(nn_model), backend=backend)
    x = randn((6, 3, 6, 6), generator, offset=0.5)
    outputs = []
    for model in (nn_model, ours):
        for training in (True, False):
            model.train(training)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            outputs.append(out)
            if training:
                out.float().square().sum().backward()
    for a, b in zip(outputs[:2], outputs[2:]):
        assert a.dtype == b.dtype == torch.bfloat16  # nn's batch norm keeps the conv's bfloat16
        assert rel_err(b, a) < 2e-2
    # The conv bias gradient is zero in exact arithmetic (training-mode BN follows): errors are
    # measured against the model's largest gradient.
    scale = max(p.grad.abs().max().item() for p in nn_model.parameters())
    for (name, p), q in zip(nn_model.named_parameters(), ours.parameters()):
        assert q.grad.dtype == p.grad.dtype, name
        torch.testing.assert_close(q.grad, p.grad, rtol=5e-2, atol=2e-2 * scale, msg=name)
    for (name, b), c in zip(nn_model.named_buffers(), ours.buffers()):
        assert rel_err(c, b) < 1e-2 if b.is_floating_point() else torch.equal(c, b), name
