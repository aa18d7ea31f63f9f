"""Skip tests compare paths and latents bit for bit: run them on one torch thread (deterministic reductions)."""

import pytest

from tests.helpers import one_torch_thread


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield
