"""The skip hook beside diffusers' own caches on a tiny Flux (issue 17, item 6).

MagCache and TaylorSeer number the calls they see; a step our hook answers from its cache never
reaches them, so the pair is refused in either order with one error naming the cache. Caches that
read the step from the pipeline (FirstBlockCache, PAB) compose: both run and our report counts
what ran.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)

from stepsaver.errors import StepsaverError
from stepsaver.skip import AdaptiveSkipConfig, disable_adaptive_skip, enable_adaptive_skip, skip_report
from stepsaver.skip.hook import HOOK_NAME
from tests import helpers

STEPS = 12
HIGH = AdaptiveSkipConfig(threshold=0.5)


def _call(pipe):
    return pipe("a red square", num_inference_steps=STEPS, guidance_scale=1.0, height=32, width=32,
                max_sequence_length=16, output_type="latent", generator=torch.Generator().manual_seed(0)).images


COUNTING = [
    ("MagCache", lambda: MagCacheConfig(num_inference_steps=STEPS, mag_ratios=[1.0] * STEPS)),
    ("TaylorSeer", lambda: TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=2)),
]


@pytest.mark.parametrize(("name", "config"), COUNTING, ids=[n for n, _ in COUNTING])
def test_a_step_counting_cache_first_is_refused_when_skip_is_enabled(name, config):
    pipe = helpers.build_flux()
    pipe.transformer.enable_cache(config())
    with pytest.raises(StepsaverError, match=f"diffusers' {name}.*disable_adaptive_skip"):
        enable_adaptive_skip(pipe, HIGH)
    registry = getattr(pipe.transformer, "_diffusers_hook", None)
    assert registry is None or HOOK_NAME not in registry.hooks  # nothing attached
    assert "step" not in pipe.scheduler.__dict__
    _call(pipe)  # the cache alone still works


@pytest.mark.parametrize(("name", "config"), COUNTING, ids=[n for n, _ in COUNTING])
def test_a_step_counting_cache_enabled_after_skip_is_refused_at_the_next_call(name, config):
    pipe = helpers.build_flux()
    enable_adaptive_skip(pipe, HIGH)
    _call(pipe)
    pipe.transformer.enable_cache(config())
    with pytest.raises(StepsaverError, match=f"diffusers' {name}"):
        _call(pipe)
    with pytest.raises(StepsaverError, match=f"diffusers' {name}"):  # still refused, not silently misaligned
        _call(pipe)
    pipe.transformer.disable_cache()
    _call(pipe)
    assert skip_report(pipe).calls_saved > 0  # skipping works again once the cache is gone


@pytest.mark.parametrize("config", [lambda: FirstBlockCacheConfig(threshold=0.05),
                                    lambda: PyramidAttentionBroadcastConfig(
                                        spatial_attention_block_skip_range=2,
                                        spatial_attention_timestep_skip_range=(-1, 1001),
                                        current_timestep_callback=lambda: 500)],
                         ids=["FirstBlockCache", "PyramidAttentionBroadcast"])
def test_caches_that_read_the_step_from_the_pipeline_compose(config):
    pipe = helpers.build_flux()
    enable_adaptive_skip(pipe, HIGH)
    pipe.transformer.enable_cache(config())
    try:
        first = _call(pipe)
        report = skip_report(pipe)
        second = _call(pipe)
    finally:
        pipe.transformer.disable_cache()
        disable_adaptive_skip(pipe)
    assert report.pipeline_calls == STEPS and 0 < report.denoiser_calls < STEPS
    assert torch.isfinite(first).all()
    torch.testing.assert_close(first, second)  # no state carried from one call into the next
