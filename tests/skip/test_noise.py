"""Noise levels read from diffusers schedulers, and the parametrisation used by ``reuse="noise"`` (issue 17, item 9)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
)

from stepsaver.skip import AdaptiveSkipConfig, disable_adaptive_skip, enable_adaptive_skip, skip_report
from stepsaver.skip.noise import NoiseLevel, call_level, from_prediction, noise_level, to_prediction
from tests import helpers


def _ve(cumprod: float) -> float:
    return math.sqrt((1 - cumprod) / cumprod)


def _step(scheduler, t):
    x = torch.zeros(1, 4, 2, 2)
    scheduler.step(torch.zeros_like(x), t, x)


def test_ddim_level_is_the_previous_timestep_of_its_own_rule():
    s = DDIMScheduler(timestep_spacing="trailing")
    s.set_timesteps(10)
    t = s.timesteps[0]
    _step(s, t)
    level = noise_level(s, t)
    cumprod = float(s.alphas_cumprod[int(t) - 100])
    assert level.sigma == pytest.approx(_ve(cumprod)) and level.alpha == pytest.approx(math.sqrt(cumprod))


@pytest.mark.parametrize("cls,vp", [(EulerDiscreteScheduler, False), (DPMSolverMultistepScheduler, True)])
def test_sigma_schedulers_report_their_next_sigma_in_the_right_form(cls, vp):
    s = cls()
    s.set_timesteps(10)
    _step(s, s.timesteps[0])
    level = noise_level(s)
    sigma = float(s.sigmas[1])
    assert level.sigma == pytest.approx(sigma)
    assert level.alpha == pytest.approx(1 / math.sqrt(1 + sigma ** 2) if vp else 1.0)


def test_flow_matching_level_is_the_variance_exploding_form():
    s = FlowMatchEulerDiscreteScheduler()
    s.set_timesteps(10)
    x = torch.zeros(1, 4, 4)
    s.step(torch.zeros_like(x), s.timesteps[0], x)
    level = noise_level(s)
    flow = float(s.sigmas[1])
    assert level.sigma == pytest.approx(flow / (1 - flow)) and level.alpha == pytest.approx(1 - flow)
    assert call_level(s) is None  # no alphas_cumprod: the output (a velocity) is reused as it is


def test_lcm_level_follows_its_own_timesteps():
    s = LCMScheduler()
    s.set_timesteps(4)
    _step(s, s.timesteps[0])
    cumprod = float(s.alphas_cumprod[int(s.timesteps[1])])
    assert noise_level(s, s.timesteps[0]).sigma == pytest.approx(_ve(cumprod))


def test_v_and_eps_convert_exactly_at_a_known_level():
    torch.manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    level = NoiseLevel(sigma=1.7, alpha=1 / math.sqrt(1 + 1.7 ** 2))
    a, s = level.alpha, level.alpha * level.sigma  # variance-preserving alpha_t, sigma_t
    x = a * x0 + s * eps
    v = a * eps - s * x0
    torch.testing.assert_close(from_prediction(v, x, level, "v_prediction", "eps"), eps)
    torch.testing.assert_close(to_prediction(eps, x, level, "v_prediction", "eps"), v)


def test_noise_reuse_is_the_raw_reuse_on_an_epsilon_model():
    """SD-1.5 predicts epsilon: reuse="noise" must leave the outputs (and the skips) exactly as reuse="output"."""
    pipe = helpers.build_sd15()
    outs, reports = [], []
    for reuse in ("output", "noise"):
        enable_adaptive_skip(pipe, AdaptiveSkipConfig(threshold=0.3, reuse=reuse))
        outs.append(pipe("a red square", num_inference_steps=12, height=32, width=32, output_type="latent",
                         generator=torch.Generator().manual_seed(0)).images)
        reports.append(skip_report(pipe))
        disable_adaptive_skip(pipe)
    assert reports[0].calls_saved > 0 and reports[0].computed == reports[1].computed
    assert torch.equal(outs[0], outs[1])


def test_sigma_scale_differences_are_speeds_on_the_embedded_model(embedded_pipe):
    """On DDIM the scaled D_j is the mean |eps| moved per unit sigma: order 1, unlike the raw latent change."""
    enable_adaptive_skip(embedded_pipe, AdaptiveSkipConfig(threshold=0.0))
    try:
        embedded_pipe("a red cat", num_inference_steps=10, output_type="latent",
                      generator=torch.Generator().manual_seed(0))
        report = skip_report(embedded_pipe)
    finally:
        disable_adaptive_skip(embedded_pipe)
    speeds = [d[0] for d in report.diffs]
    assert report.scale == "sigma" and report.unscaled == [] and len(speeds) == 9
    assert all(0.05 < d < 5 for d in speeds), speeds


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("space", ["eps", "x0"])
def test_every_parametrisation_converts_to_eps_or_x0_and_back(prediction, space):
    torch.manual_seed(1)
    x0, eps = torch.randn(3, 4), torch.randn(3, 4)
    level = NoiseLevel(sigma=0.6, alpha=1 / math.sqrt(1 + 0.36))
    a, s = level.alpha, level.alpha * level.sigma
    x = a * x0 + s * eps
    out = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[prediction]
    torch.testing.assert_close(from_prediction(out, x, level, prediction, space), eps if space == "eps" else x0)
    torch.testing.assert_close(to_prediction(from_prediction(out, x, level, prediction, space), x, level,
                                             prediction, space), out)


def test_x0_reuse_changes_an_epsilon_model_and_stays_finite():
    pipe = helpers.build_sd15()
    outs = []
    for reuse in ("output", "x0"):
        enable_adaptive_skip(pipe, AdaptiveSkipConfig(threshold=0.3, reuse=reuse))
        outs.append(pipe("a red square", num_inference_steps=12, height=32, width=32, output_type="latent",
                         generator=torch.Generator().manual_seed(0)).images)
        assert skip_report(pipe).calls_saved > 0
        disable_adaptive_skip(pipe)
    assert torch.isfinite(outs[1]).all() and not torch.equal(outs[0], outs[1])
