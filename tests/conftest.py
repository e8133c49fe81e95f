"""Shared fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module of tiny-tensor tests single-threaded: torch's intra-op pool only adds latency there
    (a [4, 5] softmax took ~10 ms with 2 threads on a busy 2-core machine, 2 us with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
