"""The DeciDiffusion recipe pieces, checked against their formulas."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from stepsaver.shrink.recipe import (
    ema_start_step,
    min_snr_weights,
    noise_scheduler_config,
    recipe_spec,
    snr,
)


def test_min_snr_weights_match_formula_for_each_parametrisation():
    s = torch.tensor([0.0, 0.01, 1.0, 5.0, 50.0])
    gamma = 5.0
    v = min_snr_weights(s, gamma, "v_prediction")
    eps = min_snr_weights(s, gamma, "epsilon")
    for i, x in enumerate(s.tolist()):
        assert v[i].item() == pytest.approx(min(x, gamma) / (x + 1))
        if x > 0:
            assert eps[i].item() == pytest.approx(min(x, gamma) / x)
    assert eps[0].item() == 1.0  # SNR = 0 (zero terminal SNR): defined, not inf
    assert v[0].item() == 0.0
    assert torch.all(min_snr_weights(s, None, "v_prediction") == 1)


def test_snr_from_alphas_cumprod():
    ac = torch.tensor([0.99, 0.5, 0.0])
    out = snr(ac, torch.tensor([0, 1, 2]))
    assert out[0].item() == pytest.approx(99.0, rel=1e-5)
    assert out[1].item() == pytest.approx(1.0)
    assert out[2].item() == 0.0


def test_deci_schedule_has_zero_terminal_snr_and_sd_does_not():
    deci = DDIMScheduler(**noise_scheduler_config("deci"))
    sd = DDIMScheduler(**noise_scheduler_config("sd"))
    assert deci.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert sd.alphas_cumprod[-1].item() > 1e-3
    assert deci.config.prediction_type == "v_prediction"
    assert sd.config.prediction_type == "epsilon"
    # cosine betas: alpha_bar falls slower early than scaled_linear at the same t
    assert deci.alphas_cumprod[100] > sd.alphas_cumprod[100]


@pytest.mark.parametrize("steps", [10, 30, 50])
def test_trailing_timesteps_start_at_999_and_never_sample_step_0(steps):
    sched = DDIMScheduler(**noise_scheduler_config("deci"))
    sched.set_timesteps(steps)
    t = sched.timesteps.numpy()
    assert t[0] == 999
    assert t.min() > 0
    assert np.all(np.diff(t) < 0)
    lead = DDIMScheduler(**noise_scheduler_config("sd"))
    lead.set_timesteps(steps)
    assert lead.timesteps.numpy()[-1] == 1  # leading spacing starts near 0 instead


def test_ema_start_step():
    assert ema_start_step(1000, 0.1) == 900
    assert ema_start_step(1000, 1.0) == 0
    assert ema_start_step(1000, 0.0) == 1000
    with pytest.raises(ValueError):
        ema_start_step(10, 1.5)
    assert recipe_spec("sd").ema_fraction == 1.0
    assert recipe_spec("deci", ema_fraction=0.2).ema_fraction == 0.2
    with pytest.raises(ValueError):
        noise_scheduler_config("nope")
