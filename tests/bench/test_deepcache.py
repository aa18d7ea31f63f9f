"""Tools written for StableDiffusionPipeline work on the embedded model unchanged."""

import numpy as np

from stepsaver import generate


def test_deepcache_runs_on_the_embedded_model_and_disables_cleanly(embedded_pipe):
    from DeepCache import DeepCacheSDHelper

    prompt = "a cat on a blue background"
    base = np.asarray(generate(embedded_pipe, prompt, steps=9).images[0]).astype(float)
    helper = DeepCacheSDHelper(pipe=embedded_pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    try:
        cached = np.asarray(generate(embedded_pipe, prompt, steps=9).images[0]).astype(float)
    finally:
        helper.disable()
    again = np.asarray(generate(embedded_pipe, prompt, steps=9).images[0]).astype(float)
    assert cached.shape == base.shape == (64, 64, 3)
    assert np.abs(cached - base).mean() > 0  # the cache changed the computation
    np.testing.assert_array_equal(again, base)  # and disabling restored the original UNet


def test_deepcache_applied_attaches_for_the_block_and_refuses_what_it_cannot_run(embedded_pipe):
    import pytest

    from stepsaver.caches import deepcache_applied
    from stepsaver.errors import StepsaverError
    from tests import helpers

    prompt = "a cat on a blue background"
    base = np.asarray(generate(embedded_pipe, prompt, steps=9).images[0]).astype(float)
    with deepcache_applied(embedded_pipe, 3):
        cached = np.asarray(generate(embedded_pipe, prompt, steps=9).images[0]).astype(float)
    assert np.abs(cached - base).mean() > 0
    np.testing.assert_array_equal(np.asarray(generate(embedded_pipe, prompt, steps=9).images[0]).astype(float), base)
    with pytest.raises(StepsaverError, match="needs a UNet pipeline"):
        with deepcache_applied(helpers.build_flux(), 3):
            pass
    with pytest.raises(StepsaverError, match="integer >= 1"):
        with deepcache_applied(embedded_pipe, 0):
            pass
