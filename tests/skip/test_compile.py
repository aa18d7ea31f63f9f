"""torch.compile and the skip hook in every order (issue 17, item 5).

The hook's decisions run outside any compiled graph (``new_forward`` is skipped by dynamo, its
bookkeeping disabled), so the network is compiled once, whichever of the two was applied first,
and the skips still happen. A counting backend (``tests.helpers.counting_backend``) sees every
graph dynamo hands over, first compile and recompiles alike.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stepsaver.skip import AdaptiveSkipConfig, disable_adaptive_skip, enable_adaptive_skip, skip_report
from tests import helpers

STEPS, CALLS = 50, 5
CONFIG = AdaptiveSkipConfig(threshold=0.2)


def _run(pipe, seed: int = 0) -> np.ndarray:
    out = pipe("a red square", num_inference_steps=STEPS, guidance_scale=5.0, output_type="np",
               generator=torch.Generator().manual_seed(seed), height=32, width=32)
    return out.images[0]


def _hook_then_torch_compile(pipe, backend):
    enable_adaptive_skip(pipe, CONFIG)
    pipe.unet = torch.compile(pipe.unet, backend=backend)


def _hook_then_module_compile(pipe, backend):
    enable_adaptive_skip(pipe, CONFIG)
    pipe.unet.compile(backend=backend)


def _compile_then_hook(pipe, backend):
    pipe.unet = torch.compile(pipe.unet, backend=backend)
    enable_adaptive_skip(pipe, CONFIG)


@pytest.fixture(scope="module")
def eager():
    """The hooked eager run: images of CALLS seeds and the calls each made."""
    pipe = helpers.build_sd15()
    enable_adaptive_skip(pipe, CONFIG)
    images, calls = [], []
    for seed in range(CALLS):
        images.append(_run(pipe, seed))
        calls.append(skip_report(pipe).denoiser_calls)
    return images, calls


@pytest.mark.parametrize("order", [_hook_then_torch_compile, _hook_then_module_compile, _compile_then_hook],
                         ids=["hook-then-torch.compile", "hook-then-module.compile", "torch.compile-then-hook"])
def test_compiled_at_most_twice_over_five_runs_of_fifty_steps_in_any_order(order, eager):
    torch._dynamo.reset()
    pipe = helpers.build_sd15()
    stats, backend = helpers.counting_backend()
    order(pipe, backend)
    images, calls = [], []
    for seed in range(CALLS):
        images.append(_run(pipe, seed))
        calls.append(skip_report(pipe).denoiser_calls)
    assert 1 <= stats.graphs <= 2, f"{stats.graphs} graphs compiled over {CALLS} runs of {STEPS} steps"
    assert calls == eager[1] and all(c < STEPS for c in calls)  # the same skips as eager, and some happened
    assert stats.runs == sum(calls)  # every network run went through the compiled graph, none ran eagerly
    for got, want in zip(images, eager[0], strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4)
    disable_adaptive_skip(pipe)
    assert skip_report(pipe) is not None  # the last report stays readable after disabling
