"""Fixtures shared by several test files."""

import pytest
import torch


@pytest.fixture()
def one_thread():
    """Tiny models: intra-op threads only add overhead on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
