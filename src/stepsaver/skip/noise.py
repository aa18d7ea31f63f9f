"""The noise level of the latent a diffusers scheduler just produced, in one form for every scheduler.

Why: the ``"sigma"`` scale of the skip criterion compares the *speed* of the sampling trajectory
across steps, ``|y_j - y_{j-1}| / |sigma_j - sigma_{j-1}|``, and that needs the latent in one
variable and the noise level it sits at. Diffusers schedulers keep latents in three forms:

* variance exploding (Euler, Euler-a, Heun, DPM2, LMS: ``init_noise_sigma > 1``): ``x = x0 + sigma * eps``;
* variance preserving (DDIM, DDPM, PNDM, LCM, DPM-Solver++, UniPC): ``x = alpha * (x0 + sigma * eps)``
  with ``alpha = 1 / sqrt(1 + sigma^2)``;
* flow matching (FlowMatchEuler: no ``alphas_cumprod``): ``x = (1 - s) * x0 + s * eps``, i.e. ``alpha = 1 - s``
  and ``sigma = s / (1 - s)``.

Dividing by ``alpha`` puts all three in the variance-exploding form, the probability-flow ODE
variable of Karras et al. (2022), where a first-order step moves the latent by ``dsigma`` times
the noise estimate. The level is read from the scheduler's own state after ``step``: ``sigmas``
at ``step_index`` where the scheduler keeps them, else ``alphas_cumprod`` at the next timestep:
``timesteps[step_index]`` for schedulers that index their own timesteps (LCM, TCD), else
``t - num_train_timesteps // num_inference_steps`` (the rule of DDIM, DDPM and PNDM).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["NoiseLevel", "call_level", "from_prediction", "noise_level", "to_prediction"]

PREDICTIONS = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class NoiseLevel:
    """``sigma``: variance-exploding noise level; ``alpha``: the factor that divides the latent into that form."""

    sigma: float
    alpha: float


def _value(x: Any) -> float:
    return float(x.item() if hasattr(x, "item") else x)


def noise_level(scheduler: Any, timestep: Any = None) -> NoiseLevel | None:
    """The level of ``scheduler``'s output latent right after a ``step`` call at ``timestep``.

    ``None`` when the scheduler exposes neither sigmas nor ``alphas_cumprod`` (the criterion then
    falls back to raw latent differences, which the hook reports).
    """
    sigmas = getattr(scheduler, "sigmas", None)
    index = getattr(scheduler, "step_index", None)
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if sigmas is not None and isinstance(index, int) and 0 <= index < len(sigmas):
        sigma = _value(sigmas[index])
        if alphas is None:  # flow matching: x = (1 - s) x0 + s eps
            if sigma >= 1.0:
                return None
            return NoiseLevel(sigma=sigma / (1.0 - sigma), alpha=1.0 - sigma)
        if _value(getattr(scheduler, "init_noise_sigma", 1.0)) > 1.0:
            return NoiseLevel(sigma=sigma, alpha=1.0)
        return NoiseLevel(sigma=sigma, alpha=1.0 / math.sqrt(1.0 + sigma * sigma))
    steps = getattr(scheduler, "num_inference_steps", None)
    train = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None)
    timesteps = getattr(scheduler, "timesteps", None)
    if alphas is None:
        return None
    if isinstance(index, int) and timesteps is not None:  # LCM, TCD: the next entry of its own timesteps
        prev = int(_value(timesteps[index])) if index < len(timesteps) else -1
    elif timestep is None or not steps or not train:
        return None
    else:
        prev = int(_value(timestep)) - train // steps
    if prev >= 0:
        cumprod = _value(alphas[prev])
    else:
        cumprod = _value(getattr(scheduler, "final_alpha_cumprod", alphas[0]))
    if not 0.0 < cumprod <= 1.0:
        return None
    return NoiseLevel(sigma=math.sqrt((1.0 - cumprod) / cumprod), alpha=math.sqrt(cumprod))


def call_level(scheduler: Any, timestep: Any = None) -> NoiseLevel | None:
    """The level of the latent the denoiser is called on now (before this step's ``scheduler.step``).

    ``alpha`` here is the variance-preserving factor ``1 / sqrt(1 + sigma^2)``: the denoiser's input
    is always the variance-preserving latent (``scale_model_input`` divides Euler-type latents into
    it), so this is what converts its output between parametrisations. ``None`` before the
    scheduler has an index (the first step) or when the level cannot be read.
    """
    sigmas = getattr(scheduler, "sigmas", None)
    index = getattr(scheduler, "step_index", None)
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        return None
    if sigmas is not None and hasattr(scheduler, "step_index"):
        if not isinstance(index, int) or not 0 <= index < len(sigmas):
            return None
        sigma = _value(sigmas[index])
    else:
        if timestep is None:
            return None
        t = int(_value(timestep.flatten()[0] if hasattr(timestep, "flatten") and timestep.ndim else timestep))
        if not 0 <= t < len(alphas):
            return None
        cumprod = _value(alphas[t])
        if not 0.0 < cumprod <= 1.0:
            return None
        sigma = math.sqrt((1.0 - cumprod) / cumprod)
    if not math.isfinite(sigma):
        return None
    return NoiseLevel(sigma=sigma, alpha=1.0 / math.sqrt(1.0 + sigma * sigma))


def from_prediction(out: Any, x: Any, level: NoiseLevel, prediction_type: str, space: str) -> Any:
    """The denoiser output ``out`` (made at input ``x``) as a noise (``space="eps"``) or data (``"x0"``) prediction.

    Variance-preserving form: ``x = a x0 + s eps`` and ``v = a eps - s x0`` with ``a^2 + s^2 = 1``.
    """
    a, s = level.alpha, level.alpha * level.sigma
    if prediction_type == "epsilon":
        return out if space == "eps" else (x - s * out) / a
    if prediction_type == "v_prediction":
        return s * x + a * out if space == "eps" else a * x - s * out
    if prediction_type == "sample":
        return (x - a * out) / s if space == "eps" else out
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def to_prediction(pred: Any, x: Any, level: NoiseLevel, prediction_type: str, space: str) -> Any:
    """Inverse of :func:`from_prediction`: the output the denoiser would give at ``x`` for this eps or x0."""
    a, s = level.alpha, level.alpha * level.sigma
    eps = pred if space == "eps" else (x - a * pred) / s
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return (eps - s * x) / a if space == "eps" else (a * x - pred) / s
    if prediction_type == "sample":
        return (x - s * pred) / a if space == "eps" else pred
    raise ValueError(f"unknown prediction type {prediction_type!r}")
