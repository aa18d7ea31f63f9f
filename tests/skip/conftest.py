"""Skip tests compare paths and latents bit for bit: run them on one torch thread (deterministic reductions)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
