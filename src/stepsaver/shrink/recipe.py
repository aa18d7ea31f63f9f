"""The two training recipes as plain functions: DeciDiffusion's and the SD-1.5-style baseline.

Each piece is small and pure so it can be tested against its formula:

* :func:`noise_scheduler_config` - betas, parametrisation and timestep spacing per recipe
  (Deci: ``squaredcos_cap_v2`` betas, ``v_prediction``, zero terminal SNR, ``trailing`` spacing
  so sampling never visits step 0; SD: ``scaled_linear``, ``epsilon``, ``leading``).
* :func:`snr` and :func:`min_snr_weights` - Min-SNR-gamma loss weights (Hang et al. 2023):
  ``min(SNR, gamma) / SNR`` for epsilon, ``min(SNR, gamma) / (SNR + 1)`` for v-prediction.
* :func:`ema_start_step` - DeciDiffusion keeps an EMA only in the last phase of training;
  the SD baseline keeps one throughout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

Recipe = Literal["deci", "sd"]
RECIPES: tuple[str, ...] = ("deci", "sd")


@dataclass(frozen=True)
class RecipeSpec:
    """Everything that differs between the two recipes (compute is identical)."""

    name: str
    scheduler: dict[str, Any]
    min_snr_gamma: float | None  # None: uniform loss weights
    ema_fraction: float  # fraction of training (at the end) that keeps an EMA; 1.0 = throughout


def noise_scheduler_config(recipe: str) -> dict[str, Any]:
    """DDIM scheduler kwargs shared by training and the saved pipeline."""
    if recipe == "deci":
        return dict(
            num_train_timesteps=1000,
            beta_schedule="squaredcos_cap_v2",
            prediction_type="v_prediction",
            rescale_betas_zero_snr=True,
            timestep_spacing="trailing",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,  # unused by trailing spacing; 1 keeps diffusers from warning
        )
    if recipe == "sd":
        return dict(
            num_train_timesteps=1000,
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            prediction_type="epsilon",
            rescale_betas_zero_snr=False,
            timestep_spacing="leading",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )
    raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")


def recipe_spec(recipe: str, ema_fraction: float = 0.1, min_snr_gamma: float = 5.0) -> RecipeSpec:
    sched = noise_scheduler_config(recipe)
    if recipe == "deci":
        return RecipeSpec("deci", sched, min_snr_gamma, ema_fraction)
    return RecipeSpec("sd", sched, None, 1.0)


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at the given timesteps."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1.0 - a).clamp_min(1e-20)


def min_snr_weights(snr_t: torch.Tensor, gamma: float | None, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-gamma for an MSE on the model's own target.

    With zero terminal SNR the last timestep has SNR = 0: the v-prediction weight is then
    0 / 1 = 0, while the epsilon weight would divide by zero, so it is defined as 1 there.
    """
    if gamma is None:
        return torch.ones_like(snr_t)
    clipped = torch.minimum(snr_t, torch.full_like(snr_t, gamma))
    if prediction_type == "v_prediction":
        return clipped / (snr_t + 1.0)
    if prediction_type == "epsilon":
        return torch.where(snr_t > 0, clipped / snr_t.clamp_min(1e-20), torch.ones_like(snr_t))
    if prediction_type == "sample":
        return clipped
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def ema_start_step(total_steps: int, ema_fraction: float) -> int:
    """First step at which the EMA is created and updated (0 = EMA throughout)."""
    if not 0.0 <= ema_fraction <= 1.0:
        raise ValueError(f"ema_fraction must be in [0, 1], got {ema_fraction}")
    return int(round(total_steps * (1.0 - ema_fraction)))
