"""Shared fixtures: every parametrized test runs once per available backend."""
import pytest
import torch

import torch_bn_manual as bnm


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", bnm.available_backends())


@pytest.fixture
def generator(request):
    """A generator seeded from the test's name: fresh inputs per test, reproducible per run."""
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(request.node.nodeid)) % (2**31)
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def one_thread():
    """torch at one intra-op thread for the test, restored after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
