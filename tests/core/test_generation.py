"""The core generation path: batch-first, per-image calls, UNet and transformer denoisers alike."""

import subprocess
import sys

import numpy as np
import pytest

from stepsaver import StepsaverError, generate, generate_images
from stepsaver.calls import count_denoiser_calls
from stepsaver.skip import AdaptiveSkipConfig, disable_adaptive_skip, enable_adaptive_skip

PROMPTS = ["a large apple on a blue background", "a small cat on the left and a dog on the right, red background",
           "a fox at the top, green background"]


def _pixels(result):
    return np.asarray(result.image.convert("RGB")).astype(np.int16)


def test_a_batch_equals_single_calls_images_and_calls(embedded_pipe):
    batch = generate_images(embedded_pipe, PROMPTS, steps=6, seeds=[3, 4, 5])
    singles = [generate(embedded_pipe, p, steps=6, seed=s) for p, s in zip(PROMPTS, [3, 4, 5], strict=True)]
    for b, s in zip(batch, singles, strict=True):
        assert np.abs(_pixels(b) - _pixels(s)).max() <= 1  # float tolerance of batched convolutions
        assert b.denoiser_calls == s.denoiser_calls == 6 and b.batch_size == 3 and s.batch_size == 1
        assert b.seed == s.seed and b.prompt == s.prompt and b.path is None


def test_a_batch_with_skip_reports_each_images_own_calls(embedded_pipe):
    cfg = AdaptiveSkipConfig(threshold=0.05)
    enable_adaptive_skip(embedded_pipe, cfg)
    try:
        with count_denoiser_calls(embedded_pipe) as pipeline_calls:
            batch = generate_images(embedded_pipe, PROMPTS, steps=20, seeds=0)
        singles = [generate(embedded_pipe, p, steps=20, seed=0) for p in PROMPTS]
    finally:
        disable_adaptive_skip(embedded_pipe)
    assert pipeline_calls[0] == 20
    for b, s in zip(batch, singles, strict=True):
        assert b.denoiser_calls == s.denoiser_calls == 20 - b.extra["denoiser_calls_saved"]
        assert b.path == s.path and sum(b.path) == len(b.extra["skipped_steps"])
        assert np.abs(_pixels(b) - _pixels(s)).max() <= 2
    assert any(b.extra["denoiser_calls_saved"] > 0 for b in batch)
    # the hook is gone: a later plain call reports plain calls, not the last skip report
    again = generate(embedded_pipe, PROMPTS[0], steps=5)
    assert again.denoiser_calls == 5 and "denoiser_calls_saved" not in again.extra


def test_chunks_and_step_choosers_keep_prompt_order(embedded_pipe):
    chosen = {PROMPTS[0]: 3, PROMPTS[1]: 4, PROMPTS[2]: 3}
    out = generate_images(embedded_pipe, PROMPTS, steps=lambda p: (chosen[p], {"why": "test"}), seeds=1,
                          batch_size=1)
    assert [r.prompt for r in out] == PROMPTS and [r.steps for r in out] == [3, 4, 3]
    assert [r.denoiser_calls for r in out] == [3, 4, 3] and all(r.extra["why"] == "test" for r in out)


@pytest.mark.parametrize("bad, match", [
    ({"prompts": "a cat"}, "list of prompts"), ({"prompts": ["a cat"], "steps": "auto"}, "step_chooser"),
    ({"prompts": ["a cat"], "seeds": [1, 2]}, "2 seeds for 1 prompts"), ({"prompts": [""]}, "prompt is empty"),
    ({"prompts": ["a cat"], "steps": 0}, "steps must be"), ({"prompts": ["a cat"], "batch_size": 0}, "batch size"),
])
def test_bad_requests_are_one_line_errors(embedded_pipe, bad, match):
    with pytest.raises(StepsaverError, match=match):
        generate_images(embedded_pipe, **{"steps": 3, **bad})


def test_the_cli_and_the_top_level_door_do_not_import_torch():
    code = ("import sys, stepsaver, stepsaver.cli; from stepsaver import AdaptiveSkipConfig; "
            "from stepsaver.skip import AdaptiveSkipConfig as B; assert AdaptiveSkipConfig is B; "
            "print('torch' in sys.modules, 'diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_top_level_skip_door_is_the_skip_package():
    import stepsaver
    import stepsaver.skip as skip

    assert stepsaver.enable_adaptive_skip is skip.enable_adaptive_skip
    assert stepsaver.skip_report is skip.skip_report and stepsaver.disable_adaptive_skip is skip.disable_adaptive_skip
    assert callable(stepsaver.generate) and stepsaver.generate.__module__ == "stepsaver.generation"


def test_guidance_is_true_cfg_on_a_flux_model_without_guidance_embedding():
    """FluxPipeline ignores guidance_scale without a guidance embedding: generate_images spends it as true CFG."""
    from tests import helpers

    pipe = helpers.build_flux()
    assert not pipe.transformer.config.guidance_embeds
    kw = dict(height=32, width=32, max_sequence_length=16, output_type="np")
    plain = generate_images(pipe, ["a red square"], steps=4, seeds=[0], guidance=1.0, **kw)[0]
    cfg = generate_images(pipe, ["a red square"], steps=4, seeds=[0], guidance=4.0, **kw)[0]
    assert plain.denoiser_calls == 4 and cfg.denoiser_calls == 8  # cond + uncond every step
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(cfg.images[0]))
    own = generate_images(pipe, ["a red square"], steps=4, seeds=[0], guidance=4.0, true_cfg_scale=1.0, **kw)[0]
    assert own.denoiser_calls == 4  # the caller's own true_cfg_scale wins
