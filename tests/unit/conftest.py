"""Unit tests train tiny models: one torch thread is fastest, and avoids oversubscription when other processes
share the CPU."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
